// Shared by the QUICK GEMM kernels (quick_gemm.cu: mma.sync and wgmma tiles; quick_gemm_ws.cuh:
// the warp-specialised wgmma tiles): stage constants, the kernel parameters, the output store
// and the split-K reduction. Included by csrc/quick_gemm.cu only.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quick_act_scale.cuh"
#include "quick_layout.cuh"
#include "quick_ptx.cuh"

namespace quick {
namespace {

constexpr int kStageK = 64;                 // k rows per stage = 4 mma k-steps
constexpr int kStageKTiles = kStageK / kTileK;
constexpr int kWarpsN = 4;                  // warps along N (one 64-column tile each for mma.sync)
constexpr int kBlockTiles = 4;              // 64-column tiles per block: 256 columns
constexpr int kMaxGroupRowsPerStage = 2;    // group size 32 -> two groups in a 64-row stage

struct KernelParams {
  const void* x;
  const uint4* qweight;  // 32 uint4 (one per lane) per 16 x 64 tile
  const uint32_t* qzeros;
  const __half* scales;
  const void* bias;
  void* y;
  float* partials;
  int* counters;
  int m, k, n, size_n, group_size;
  int stages_per_split, splits;
  // ws tiles (quick_stream_k.cuh, ws_block_work): blocks [0, dp_blocks) compute whole output
  // tiles; the following sk_blocks blocks share out the K stages of the next sk_tiles tiles, a
  // tile's pieces in max_pieces partial slots.
  int dp_blocks, sk_tiles, sk_blocks, max_pieces;
  bool weights_evict_first;
  bool weights_by_map;  // ws tiles: a stage's weights by one 2-D TMA copy (else a bulk copy per k-tile row)
  bool lean_fixup;  // ws tiles' shared-tile fix-up: thread 0's release / acquire only (else every thread fences)
  int timeline_slot;  // ws tiles, diagnostic builds only (QUICK_WS_TIMELINE): where the blocks record
  bool split_major;     // mma.sync tiles, global split-K: grid (splits, grid_n, grid_m), see split_block
  bool cluster_reduce;  // the splits of a tile form one cluster and reduce in shared memory
  // bf16 through an fp16 tile (GemmArgs::act_row_abs_max): row i of x holds x[i] * 2^e_i, and
  // y[i] gets acc * 2^-e_i.
  const unsigned* act_row_abs_max;
};

// bf16 calls through an fp16 tile: the factor 2^-e_row that undoes row `row`'s scaling into fp16
// (quick_act_scale.cu), exact, from that row's max|x| bits. Rows past M (a tile's padding rows,
// never stored) take the last row's.
__device__ __forceinline__ float row_unscale(const KernelParams& p, int row) {
  return __uint_as_float(pow2_bits(-fp16_shift_of_bf16(__ldg(p.act_row_abs_max + min(row, p.m - 1)))));
}

// A split's fp32 partial tile in shared memory for the cluster reduction: rows of the block's 256
// columns, padded by 8 floats. Without the pad the eight rows an mma accumulator store touches at
// once (lane / 4) sit 1 KB apart, all in the same banks (8-way conflict); 8 floats = 32 B shift
// each row by 8 banks, so a warp's 256-byte float2 store takes the minimum of two wavefronts.
constexpr int kPartialStride = kBlockTiles * kTileN + 8;
__host__ __device__ constexpr int partial_tile_bytes(int block_rows) { return block_rows * kPartialStride * 4; }
// The largest cluster plan() forms (16 CTAs is Hopper's non-portable maximum; 8 is portable).
constexpr int kMaxClusterSplits = 16;

// y[row, col], y[row, col + 1] = v0, v1 (+ bias), for rows < M and columns < size_n.
template <typename T>
__device__ __forceinline__ void store_pair(const KernelParams& p, int row, int col, float v0, float v1) {
  if (row < p.m && col < p.size_n) {
    const T* bias = static_cast<const T*>(p.bias);
    if (bias != nullptr) {
      v0 += Act<T>::to_float(bias[col]);
      v1 += Act<T>::to_float(bias[col + 1]);
    }
    *reinterpret_cast<uint32_t*>(static_cast<T*>(p.y) + static_cast<size_t>(row) * p.size_n + col) =
        Act<T>::pack(v0, v1);
  }
}

// One output of a wgmma tile (the product is computed transposed, so each accumulator register
// is a single element): store_output writes y[row, col] (+ bias), skipping rows >= M and columns
// >= size_n; store_element writes this split's fp32 partial (`part`) instead when K is split.
template <typename T>
__device__ __forceinline__ void store_output(const KernelParams& p, int row, int col, float v) {
  if (row < p.m && col < p.size_n) {
    const T* bias = static_cast<const T*>(p.bias);
    if (bias != nullptr) v += Act<T>::to_float(bias[col]);
    static_cast<T*>(p.y)[static_cast<size_t>(row) * p.size_n + col] = Act<T>::from_float(v);
  }
}

template <typename T>
__device__ __forceinline__ void store_element(const KernelParams& p, float* part, int row, int col, float v) {
  if (p.splits == 1) {
    store_output<T>(p, row, col, v);
  } else if (row < p.m) {
    __stcg(part + static_cast<size_t>(row) * p.n + col, v);
  }
}

// Accumulators [kRows][8][4] (mma.sync tiles, or wgmma D operands seen that way) set to zero.
template <int kRows>
__device__ __forceinline__ void zero_accumulators(float (&acc)[kRows][8][4]) {
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][nb][e] = 0.f;
}

// part_barrier<kThreads>: __syncthreads() for kThreads == 0, else named barrier 1 over the block's
// first kThreads threads (a multiple of 32), for code the rest of the block does not reach (the ws
// tiles, whose producer warpgroup has left).
template <int kThreads>
__device__ __forceinline__ void part_barrier() {
  if constexpr (kThreads == 0) {
    __syncthreads();
  } else {
    asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
  }
}

// The mma.sync tiles' global split-K reduction, called by every thread of every split of an
// output tile (rows [row0, row0 + block_rows), columns [col0, col0 + cols)) once it has stored
// its share of its fp32 partial tile into partials [split][m][n]. Every split counts in on the
// tile's counter. Then, in one of two ways, the tile's quads (four columns each) are summed over
// the splits in split order (deterministic: the same sums, bit for bit, whoever adds them) and y
// is written:
//  - p.split_major (session 13): every split waits until all have counted in, then sums its own
//    slice of the tile (a contiguous 1 / splits of its quads); a second count, taken past the
//    wait, lets the last split reset the counter. The splits may wait for each other because
//    plan() launches at most one wave (splits x tiles <= the GPU's block slots) and the grid is
//    then split-major (split_block: a tile's splits are consecutive blocks, and blocks start in
//    index order), so even if another kernel holds some SMs the blocks that run form whole tiles
//    first and free their slots for the rest;
//  - otherwise the last split to count in sums the whole tile alone and resets the counter. plan()
//    keeps this where a tile has too few rows for the slices to pay (M < kSliceMinRows), and it
//    is the only way for the wgmma tiles of quick_gemm_kernel (w64 / w128 / w128n / w64x, in no
//    plan since sessions 9-11: w128n's registers have no room for the other; kSplitMajor = false).
// H100, session 13, A/B in one run against the last split alone (results/
// kernel_h100_s13_slices_final_tiles.md, this code): s16m / x16 1.02-1.03x at M = 4, 1.06-1.07x
// at M = 8 (up to 1.26x on the "down" layers), 1.02x at 16, 1.02-1.03x at 32; s32m 1.02-1.04x at
// M = 8-32, 1.40x on 4096 x 12288 at M = 32 (geomeans of 12 shapes, fp16; bf16 alike). Slices at
// every M (results/kernel_h100_s13_slices_tiles.md) lost 3-4% at M = 1, where one split sums the
// tile's 64 quads in one round trip anyway and the wait only adds latency: hence kSliceMinRows.
//
// Both: release and acquire are thread 0's around the block barrier (the pattern of cooperative
// groups' grid sync: bar.sync orders the other threads' stores before thread 0's fence, which is
// cumulative), and a thread has every load of its next kReduceItems quads in flight before the
// first add, each into its own registers. (Found with ncu source counters of s16m at M = 16 on
// 4096 x 22016, 6 splits, where a third of the warps' samples sat in the reduction: the first
// version summed `for sp: sum += load(sp)` with a runtime trip count, and ptxas loaded every
// split into one register, one L2 round trip each.)
constexpr int kReduceSplitsInFlight = 8;  // splits loaded at once (more are summed in chunks)
constexpr int kSliceMinRows = 4;          // rows of a tile from which plan() takes the slices

__device__ __forceinline__ void add_f4(float4& sum, const float4& v) {
  sum.x += v.x;
  sum.y += v.y;
  sum.z += v.z;
  sum.w += v.w;
}

// Which split, column block and row block a block computes: grids are (grid_n, grid_m, splits),
// or split-major (splits, grid_n, grid_m) with p.split_major, so that a tile's splits are
// consecutive blocks (blocks start in index order, x fastest). (A first version flattened
// splits x grid_n into x and divided: the division's registers made w128n spill.)
struct SplitBlock {
  int split, col_block, row_block;
};
template <bool kSplitMajor>  // false: never split-major (the wgmma tiles, see reduce_split_k)
__device__ __forceinline__ SplitBlock split_block(const KernelParams& p) {
  if (kSplitMajor && p.split_major)
    return {static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.z)};
  return {static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y)};
}

// kReduceItems: quads per thread per round trip (2 for the 32-row tiles, whose slice is 2 quads
// per thread at M = 32 with 8 splits; more registers made the 16-row tiles, capped at 128, spill).
template <typename T, int kReduceItems, bool kSplitMajor>
__device__ __forceinline__ void reduce_split_k(const KernelParams& p, int split, int* counter, int row0,
                                               int block_rows, int col0, int cols) {
  const int tid = threadIdx.x;
  __shared__ int reduces;  // 0: nothing (a split that is not the last), 1: its slice, 2: the whole tile
  int count_out = 0;       // thread 0, slices: what the second count returned
  __syncthreads();         // every thread's partial stores come before thread 0's release
  if (tid == 0) {
    __threadfence();  // release: this split's partial, device-wide, before its count
    const int arrived = atomicAdd(counter, 1);
    if (kSplitMajor && p.split_major) {
      while (*reinterpret_cast<volatile int*>(counter) < p.splits) __nanosleep(32);
      __threadfence();  // acquire: the other splits' partials
      // Past the wait: count out (the result is first needed at the end, so the atomic's round
      // trip overlaps the slice); the last of the 2 x splits counts resets the counter.
      count_out = atomicAdd(counter, 1);
      reduces = 1;
    } else {
      reduces = arrived == p.splits - 1 ? 2 : 0;
      if (reduces) {
        __threadfence();  // acquire: the other splits' partials
        *counter = 0;     // every split has counted in: ready for the next launch / graph replay
      }
    }
  }
  __syncthreads();
  if (reduces == 0) return;
  const float* base = p.partials + static_cast<size_t>(row0) * p.n + col0;
  const size_t split_stride = static_cast<size_t>(p.m) * p.n;
  const int rows = min(block_rows, p.m - row0);
  const int quads = cols / 4, items = rows * quads;
  const int per_slice = reduces == 2 ? items : (items + p.splits - 1) / p.splits;
  const int slice = reduces == 2 ? 0 : split;
  const int end = min(items, (slice + 1) * per_slice);
  const int stride = blockDim.x;
  for (int first = slice * per_slice + tid; first < end; first += kReduceItems * stride) {
    const float* src[kReduceItems];
    float4 sum[kReduceItems];
#pragma unroll
    for (int i = 0; i < kReduceItems; ++i) {
      const int idx = min(first + i * stride, end - 1);  // (past the end: not loaded, not stored)
      src[i] = base + static_cast<size_t>(idx / quads) * p.n + (idx % quads) * 4;
      sum[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int sp0 = 0; sp0 < p.splits; sp0 += kReduceSplitsInFlight) {
      float4 v[kReduceItems][kReduceSplitsInFlight];
#pragma unroll
      for (int i = 0; i < kReduceItems; ++i)
#pragma unroll
        for (int j = 0; j < kReduceSplitsInFlight; ++j)
          if (sp0 + j < p.splits && first + i * stride < end)
            v[i][j] = __ldcg(reinterpret_cast<const float4*>(src[i] + (sp0 + j) * split_stride));
#pragma unroll
      for (int i = 0; i < kReduceItems; ++i)
#pragma unroll
        for (int j = 0; j < kReduceSplitsInFlight; ++j)  // split order per element: deterministic
          if (sp0 + j < p.splits && first + i * stride < end) add_f4(sum[i], v[i][j]);
    }
#pragma unroll
    for (int i = 0; i < kReduceItems; ++i) {
      const int idx = first + i * stride;
      if (idx < end) {
        const int row = row0 + idx / quads, col = col0 + (idx % quads) * 4;
        store_pair<T>(p, row, col, sum[i].x, sum[i].y);
        store_pair<T>(p, row, col + 2, sum[i].z, sum[i].w);
      }
    }
  }
  // Every split has read the counter past its wait once all 2 x splits counts are in.
  if (kSplitMajor && tid == 0 && reduces == 1 && count_out == 2 * p.splits - 1) *counter = 0;
}

// Split-K inside a thread-block cluster (sm_90): the p.splits CTAs of one output tile are one
// cluster (dims 1 x 1 x splits), and each has stored its fp32 partial tile at `tile` in its own
// shared memory (kPartialStride floats per row). No global workspace, no counters, no fences: CTA
// `rank` sums slice `rank` of the tile over every CTA's copy (distributed shared memory), in rank
// = split order (deterministic), and writes y. Every thread of every CTA must call this.
template <typename T>
__device__ __forceinline__ void reduce_split_k_in_cluster(const KernelParams& p, const float* tile, int row0,
                                                          int block_rows, int col0, int cols) {
#if QUICK_CLUSTERS
  cluster_sync();  // every split's partial tile is written (release / acquire)
  const int rows = min(block_rows, p.m - row0);
  const int quads = cols / 4;
  const int items = rows * quads;
  const int per_cta = (items + p.splits - 1) / p.splits;
  const int rank = static_cast<int>(cluster_ctarank());
  const int end = min(items, (rank + 1) * per_cta);
  const uint32_t base = smem_u32(tile);
  for (int idx = rank * per_cta + threadIdx.x; idx < end; idx += blockDim.x) {
    const int r = idx / quads, c = (idx % quads) * 4;
    const uint32_t addr = base + static_cast<uint32_t>(r * kPartialStride + c) * 4;
    // All loads first, then the sums: the remote loads (a few hundred cycles each) overlap.
    float4 v[kMaxClusterSplits];
#pragma unroll
    for (int sp = 0; sp < kMaxClusterSplits; ++sp)
      if (sp < p.splits) v[sp] = ld_shared_cluster_f4(addr, sp);
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int sp = 0; sp < kMaxClusterSplits; ++sp) {  // fixed order: deterministic
      if (sp < p.splits) add_f4(sum, v[sp]);
    }
    store_pair<T>(p, row0 + r, col0 + c, sum.x, sum.y);
    store_pair<T>(p, row0 + r, col0 + c + 2, sum.z, sum.w);
  }
  cluster_sync();  // no CTA exits (freeing its shared memory) while another still reads it
#else
  __trap();  // plan() asks for clusters on sm_90 only
#endif
}

}  // namespace
}  // namespace quick
