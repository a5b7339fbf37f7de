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

// The mma.sync tiles' global split-K reduction, called by every thread of the block once it has
// stored its share of this split's fp32 partial tile (rows [row0, row0 + block_rows), columns
// [col0, col0 + cols)) into partials [split][m][n]: one counter per block of the (grid_n, grid_m,
// splits) grid; the last split to count in sums the tile in split order (deterministic) and
// writes y, then resets the counter, so the counters stay zero between launches and CUDA-graph
// replays.
//
// Two things keep its latency down (session 13, ncu source counters of s16m at M = 16 on
// 4096 x 22016, 6 splits: a third of the warps' samples sat here, every FADD waiting on L2):
//  - release and acquire by thread 0 alone, around the block barrier (the pattern of cooperative
//    groups' grid sync: bar.sync orders the other threads' stores before thread 0's fence, which
//    is cumulative), instead of a fence in every thread;
//  - every load a thread needs for its next kReduceItems quads of the tile issued before the
//    first add, each into its own registers. The first version summed `for sp: sum += load(sp)`
//    with a runtime trip count: ptxas loaded every split into the same register, i.e. one L2
//    round trip per split per quad, 48 in a row at M = 16 with 6 splits.
// H100 A/B in one run (results/kernel_h100_s13_reduce_tiles.md): s16m on 4096 x 22016 (6 splits)
// at M = 16 38.1 -> 29.5 us; geomean of the 12 shapes 1.03x at M = 8-32 for s16m and x16, s32m
// unchanged; 0.98x at M = 1, where that run still loaded a padding quad twice (now predicated off).
constexpr int kReduceSplitsInFlight = 8;  // splits loaded at once (more are summed in chunks)
constexpr int kReduceItems = 2;           // quads per thread per round trip: 16 float4 in flight

__device__ __forceinline__ void add_f4(float4& sum, const float4& v) {
  sum.x += v.x;
  sum.y += v.y;
  sum.z += v.z;
  sum.w += v.w;
}

template <typename T>
__device__ __forceinline__ void reduce_split_k(const KernelParams& p, int row0, int block_rows, int col0, int cols) {
  __shared__ int is_last;
  const int tid = threadIdx.x;
  int* counter = p.counters + blockIdx.y * gridDim.x + blockIdx.x;
  __syncthreads();  // every thread's partial stores come before thread 0's release
  if (tid == 0) {
    __threadfence();  // release: the block's partials, device-wide, before the count
    const bool last = atomicAdd(counter, 1) == p.splits - 1;
    if (last) __threadfence();  // acquire: the other splits' partials
    is_last = last;
  }
  __syncthreads();
  if (!is_last) return;
  // The whole block reduces the tile, four columns (one quad) per item. (A first version let each
  // thread reduce its own accumulator fragment: for M = 1 only 4 lanes had rows, and their ~180
  // dependent L2 loads took ~25 us.)
  const float* base = p.partials + static_cast<size_t>(row0) * p.n + col0;
  const size_t split_stride = static_cast<size_t>(p.m) * p.n;
  const int rows = min(block_rows, p.m - row0);
  const int quads = cols / 4, items = rows * quads;
  const int stride = blockDim.x;
  for (int first = tid; first < items; first += kReduceItems * stride) {
    const float* src[kReduceItems];
    float4 sum[kReduceItems];
#pragma unroll
    for (int i = 0; i < kReduceItems; ++i) {
      const int idx = min(first + i * stride, items - 1);  // (past the end: not loaded, not stored)
      src[i] = base + static_cast<size_t>(idx / quads) * p.n + (idx % quads) * 4;
      sum[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int sp0 = 0; sp0 < p.splits; sp0 += kReduceSplitsInFlight) {
      float4 v[kReduceItems][kReduceSplitsInFlight];
#pragma unroll
      for (int i = 0; i < kReduceItems; ++i)
#pragma unroll
        for (int j = 0; j < kReduceSplitsInFlight; ++j)
          if (sp0 + j < p.splits && first + i * stride < items)
            v[i][j] = __ldcg(reinterpret_cast<const float4*>(src[i] + (sp0 + j) * split_stride));
#pragma unroll
      for (int i = 0; i < kReduceItems; ++i)
#pragma unroll
        for (int j = 0; j < kReduceSplitsInFlight; ++j)  // split order per element: deterministic
          if (sp0 + j < p.splits && first + i * stride < items) add_f4(sum[i], v[i][j]);
    }
#pragma unroll
    for (int i = 0; i < kReduceItems; ++i) {
      const int idx = first + i * stride;
      if (idx < items) {
        const int row = row0 + idx / quads, col = col0 + (idx % quads) * 4;
        store_pair<T>(p, row, col, sum[i].x, sum[i].y);
        store_pair<T>(p, row, col + 2, sum[i].z, sum[i].w);
      }
    }
  }
  if (tid == 0) *counter = 0;  // ready for the next launch / graph replay
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
