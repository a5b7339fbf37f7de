// QUICK W4A16 GEMM: y[m, n] = x[m, k] @ ((q - z) * s)[k, n] (+ bias), int4 weights in the
// interleaved layout of vllm_quick/layout.py (mirrored in quick_layout.cuh).
//
// Reading order: quick_ptx.cuh (PTX helpers), quick_fragments.cuh (nibbles -> mma.sync
// fragments), quick_wgmma.cuh (the Hopper wgmma tiles), then here the kernel and the launcher.
//
// The idea (QUICK, arXiv 2402.10076): the weights were interleaved once at load time so that the
// 16 bytes each lane copies out of shared memory are exactly the nibbles of its own
// mma.m16n8k16 B fragments for a 16 x 64 tile. A lane turns them into fragment registers with a
// few lop3 and subtractions; nothing is written back to shared memory and no ldmatrix is needed
// for B (the AutoAWQ kernel dequantises into shared memory and reads back, with bank conflicts).
//
// Numerics: the exact ("x") tiles' B fragments hold the integers (q - z) (|q - z| <= 15 is exact
// in fp16 and bf16), so the tensor cores produce exact per-group partial sums in fp32; each
// group's sum is scaled by the fp32 scale on the accumulator (acc += group_sum * s). The only
// rounding left is the fp32 accumulation and the final cast, which matters for bf16 (see
// layout.py). The fp16 scaled ("s", and most "w") tiles put (q - z) * s into the fragments.
//
// Work split: a thread block computes block_m rows x 256 columns (4 warps along N, one 64-column
// tile each, and 1, 2 or 4 warps along M; the wgmma tiles cut it as quick_wgmma.cuh says) over a
// range of K in stages of 64. When M is small the (M, N) grid cannot fill the GPU, so K is split
// too (split-K): every split writes an fp32 partial tile and counts in on an atomic counter per
// output tile; then the splits each sum a slice of the tile over the partials, in split order
// (deterministic), or, for tiles of 1-3 rows, the last split to count in sums all of it
// (reduce_split_k in quick_common.cuh). The counters are left at zero for the next launch and
// CUDA-graph replay.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "quick_common.cuh"
#include "quick_fragments.cuh"
#include "quick_gemm.h"
#include "quick_gemm_ws.cuh"
#include "quick_layout.cuh"
#include "quick_ptx.cuh"
#include "quick_wgmma.cuh"

namespace quick {
namespace {

template <int kBlockM, bool kWgmma>
struct SmemLayout {
  static constexpr int kBlockN = kBlockTiles * kTileN;
  // Per stage, in bytes. Weights: 4 k-tiles x 4 n-tiles x 512 B, copied verbatim (already in
  // lane order). Activations: kBlockM rows x 64 k (128 B per row), 16-byte chunks XOR-swizzled.
  // Scales / zeros: up to two group rows of the block's 256 columns.
  static constexpr int kWeightBytes = kStageKTiles * kBlockTiles * kWordsPerTile * 4;
  static constexpr int kActBytes = kBlockM * kStageK * 2;
  static constexpr int kScaleBytes = kMaxGroupRowsPerStage * kBlockN * 2;
  static constexpr int kZeroBytes = kMaxGroupRowsPerStage * kBlockN / 2;
  // wgmma reads the activation tile through a 128-byte-swizzle descriptor, which needs it on a
  // 1024-byte boundary: for those tiles the activations come first and a stage is padded to 1 KB.
  static constexpr int kActOffset = kWgmma ? 0 : kWeightBytes;
  static constexpr int kWeightOffset = kWgmma ? kActBytes : 0;
  static constexpr int kScaleOffset = kWeightBytes + kActBytes;
  static constexpr int kZeroOffset = kScaleOffset + kScaleBytes;
  static constexpr int kStageBytes = kWgmma ? (kZeroOffset + kZeroBytes + 1023) / 1024 * 1024
                                            : kZeroOffset + kZeroBytes;
  // cp.async pipeline: kStages slots, the copies run kAhead stages ahead of the maths (3 stages in
  // flight while one is computed for mma.sync). wgmma keeps one k-step group running past the
  // barrier, so it may still be reading the previous stage: its copies stay one more slot behind.
  static constexpr int kStages = kWgmma ? 5 : 4;
  static constexpr int kAhead = kWgmma ? kStages - 2 : kStages - 1;
  static constexpr int kAlignSlack = kWgmma ? 1024 : 0;  // the dynamic window's start is aligned by hand
  static constexpr int kTotalBytes = kStages * kStageBytes + kAlignSlack;
  // After the K loop the pipeline's slots can hold the block's fp32 partial tile for the cluster
  // split-K reduction: true up to 64 rows (a 128-row tile needs 135 KB).
  static constexpr bool kHoldsPartialTile = partial_tile_bytes(kBlockM) <= kStages * kStageBytes;
};

// Activation tile in shared memory: row r has 8 chunks of 16 B (8 values); chunk c is stored at
// c ^ (r % 8). ldmatrix reads one chunk column from 8 consecutive rows at a time; without the XOR
// all 8 addresses would sit 128 B apart, i.e. in the same 4 banks (an 8-way conflict); with it
// they cover all 32 banks.
__device__ __forceinline__ int swizzled_chunk(int row, int chunk) { return row * 8 + (chunk ^ (row & 7)); }

// kWarpTilesM: 16-row mma tiles per warp; kWarpsM: warps along M; kScaled: scaled fp16 fragments
// (dequant_tile<T, true>) instead of exact integers + per-group accumulator scaling; kMinBlocks:
// blocks per SM the register allocation must allow; kLean: the 16x magic for odd nibble pairs,
// and group boundaries looked for on even k-tiles only (scaled tiles); kWgWords: 0 = mma.sync, 4 or
// 2 = the warpgroup MMA with that many weight words per warp and k-step (sm_90a; see wgmma_step);
//
// Out: y's type. T, except for bf16 calls of the lean mma.sync tiles s16m / s32m (Out = bf16,
// T = fp16): x is then the exact fp16 copy of a bf16 x, row i times 2^e_i (quick_act_scale.cu,
// as for the ws tiles), and the accumulators of row i are multiplied by 2^-e_i before the output.
template <typename T, int kWarpTilesM, int kWarpsM, bool kScaled, int kMinBlocks, bool kLean, int kWgWords,
          typename Out = T>
__global__ void __launch_bounds__(32 * kWarpsN * kWarpsM, kMinBlocks)
    quick_gemm_kernel(const KernelParams p) {
  static_assert(std::is_same_v<Out, T> || (kWgWords == 0 && std::is_same_v<T, __half>),
                "a bf16 output from fp16 activations: mma.sync tiles only");
  static_assert(!kScaled || std::is_same_v<T, __half>, "scaled fragments are fp16 only");
  static_assert(!kLean || kScaled, "lean tiles are scaled tiles");
  constexpr bool kWgmma = kWgWords > 0;
  constexpr int kWW = kWgmma ? kWgWords : 1;  // (array sizes)
  static_assert(kWgWords == 0 || kWgWords == 2 || kWgWords == 4, "wgmma words per warp: 4 or 2");
  static_assert(kWgWords != 4 || (kLean && kWarpTilesM == 4), "4-word wgmma tiles: lean, 64 rows per warpgroup");
  constexpr int kThreads = 32 * kWarpsN * kWarpsM;
  constexpr int kBlockM = 16 * kWarpTilesM * kWarpsM;
  constexpr int kBlockN = kBlockTiles * kTileN;
  static_assert(kWgWords != 2 || (2 * kWarpsM == kBlockTiles && kBlockM == (kScaled ? 128 : 64)),
                "2-word wgmma tiles: a warpgroup per two tiles, 128 (scaled) or 64 (exact) tokens");
  constexpr int kWgTokens = kWW == 4 ? 64 : kBlockM;  // wgmma N: tokens per instruction
  // Accumulator rows of 32 floats per thread: the mma.sync tiles' 16-row tiles, or the wgmma
  // D operands (kWW of them, kWgTokens / 2 floats each).
  constexpr int kAccRows = kWgmma ? kWW * kWgTokens / 64 : kWarpTilesM;
  using Smem = SmemLayout<kBlockM, kWgmma>;
  constexpr int kStages = Smem::kStages, kAhead = Smem::kAhead;
  extern __shared__ __align__(16) unsigned char smem_window[];
  unsigned char* smem = smem_window;
  if constexpr (kWgmma) smem += (1024 - (smem_u32(smem_window) & 1023)) & 1023;

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warp_n = warp % kWarpsN;
  const int warp_m = warp / kWarpsN;
  // The 64-column tile this warp dequantises, and its first weight word: warp_n and 0, except for
  // 2-word wgmma tiles, where warpgroup g takes tiles 2g, 2g + 1 and warp r of it half a tile.
  const int my_tile = kWgWords == 2 ? (warp / 4) * 2 + (warp % 4) / 2 : warp_n;
  const int first_word = kWgWords == 2 ? 2 * (warp % 2) : 0;

  const int n_tiles = p.n / kTileN;
  const SplitBlock sb = split_block<!kWgmma>(p);
  const int tile_n0 = sb.col_block * kBlockTiles;               // first 64-column tile of the block
  const int block_tiles = min(kBlockTiles, n_tiles - tile_n0);  // tiles this block really has
  const int row0 = sb.row_block * kBlockM;
  const int total_stages = p.k / kStageK;
  const int stage_begin = sb.split * p.stages_per_split;
  const int stage_count = min(total_stages - stage_begin, p.stages_per_split);

  const T* x = static_cast<const T*>(p.x);
  // Weights read once per call stream past L2; when several row blocks re-read them, keep them.
  const uint64_t policy = p.weights_evict_first ? evict_first_policy() : evict_normal_policy();

  // ---- Copy plan: fixed per thread for the whole K loop; each stage steps the pointers. ----
  // Weights: a stage is kStageKTiles k-tile rows of the block's 4 tiles, each row 2 KB
  // contiguous in global memory and stored as-is in shared memory (chunk c = kt * 128 + lane
  // chunk). Thread tid copies chunk tid % 128 of rows tid / 128 + i * kRowsPerIter.
  constexpr int kChunksPerKTile = kBlockTiles * 32;
  constexpr int kWeightIters = kStageKTiles * kChunksPerKTile / kThreads;
  constexpr int kRowsPerIter = kThreads / kChunksPerKTile;
  const size_t w_row_stride = static_cast<size_t>(n_tiles) * 32;  // uint4 per k-tile row
  const bool w_valid = (tid % kChunksPerKTile) / 32 < block_tiles;
  // The copy pointers walk K: each load_stage() copies the next stage and steps them forward, so
  // the K loop does no 64-bit address arithmetic and no division (SASS of the first version:
  // ~100 of its ~700 instructions per stage were address and group-index arithmetic).
  const uint4* w_src = p.qweight + static_cast<size_t>(tile_n0) * 32 + tid % kChunksPerKTile +
                       (tid / kChunksPerKTile) * w_row_stride +
                       static_cast<size_t>(stage_begin) * kStageKTiles * w_row_stride;
  // Activations: kBlockM rows x 8 chunks of 16 B; rows past M are zero-filled.
  constexpr int kActIters = kBlockM * 8 / kThreads;
  static_assert(kActIters * kThreads == kBlockM * 8, "activation chunks must divide evenly");
  const T* a_src[kActIters];
  int a_dst[kActIters];
  bool a_valid[kActIters];
#pragma unroll
  for (int i = 0; i < kActIters; ++i) {
    const int c = tid + i * kThreads, r = c / 8, chunk = c % 8;
    a_valid[i] = row0 + r < p.m;
    a_src[i] = x + static_cast<size_t>(a_valid[i] ? row0 + r : 0) * p.k + chunk * 8 + stage_begin * kStageK;
    a_dst[i] = swizzled_chunk(r, chunk);
  }
  // Scales and zeros: per group row 32 scale chunks + 8 zero chunks of the block's 256
  // columns; threads 0..79 own one chunk each of (up to) two group rows.
  constexpr int kScaleChunks = kBlockN * 2 / 16, kZeroChunks = kBlockN / 2 / 16;
  constexpr int kGroupChunks = kScaleChunks + kZeroChunks;
  static_assert(kMaxGroupRowsPerStage * kGroupChunks <= kThreads, "one chunk per thread");
  const int sz_row = tid / kGroupChunks, sz_chunk = tid % kGroupChunks;
  const bool sz_is_scale = sz_chunk < kScaleChunks;
  const bool sz_valid = sz_row < kMaxGroupRowsPerStage &&
                        (sz_is_scale ? sz_chunk < block_tiles * 8 : sz_chunk - kScaleChunks < block_tiles * 2);
  const char* sz_src = sz_is_scale
      ? reinterpret_cast<const char*>(p.scales + tile_n0 * kTileN + sz_chunk * 8)
      : reinterpret_cast<const char*>(p.qzeros + tile_n0 * 8 + (sz_chunk - kScaleChunks) * 4);
  const size_t sz_row_bytes = sz_is_scale ? static_cast<size_t>(p.n) * 2 : static_cast<size_t>(p.n) / 2;
  const int sz_dst = sz_is_scale ? Smem::kScaleOffset + (sz_row * kScaleChunks + sz_chunk) * 16
                                 : Smem::kZeroOffset + (sz_row * kZeroChunks + sz_chunk - kScaleChunks) * 16;
  // Group rows per stage: the binding admits K % 64 == 0 and group sizes 32 or multiples of 64,
  // so a stage holds two whole groups (group 32) or lies inside one group. The group row of the stage being copied is tracked, not divided out.
  const bool two_groups = p.group_size == 32;
  const int stages_per_group = two_groups ? 1 : p.group_size / kStageK;
  const bool sz_copies = sz_valid && (two_groups || sz_row == 0);
  const char* sz_next = sz_src + static_cast<size_t>(two_groups ? 2 * stage_begin + sz_row : stage_begin / stages_per_group) * sz_row_bytes;
  int sz_stages_left = stages_per_group - stage_begin % stages_per_group;  // in the current group

  // Issue the copies of the next stage into shared-memory slot `slot`, then step the pointers.
  auto load_stage = [&](int slot) {
    unsigned char* base = smem + slot * Smem::kStageBytes;
    if (w_valid) {
      uint4* dst = reinterpret_cast<uint4*>(base + Smem::kWeightOffset) + tid;
#pragma unroll
      for (int i = 0; i < kWeightIters; ++i)
        cp_async_16_hint(dst + i * kThreads, w_src + i * kRowsPerIter * w_row_stride, policy);
    }
    w_src += kStageKTiles * w_row_stride;
    uint4* a_base = reinterpret_cast<uint4*>(base + Smem::kActOffset);
#pragma unroll
    for (int i = 0; i < kActIters; ++i) {
      cp_async_16_zfill(a_base + a_dst[i], a_src[i], a_valid[i]);
      a_src[i] += kStageK;
    }
    if (sz_copies) cp_async_16_zfill(base + sz_dst, sz_next, true);
    if (two_groups) {
      sz_next += 2 * sz_row_bytes;
    } else if (--sz_stages_left == 0) {
      sz_next += sz_row_bytes;
      sz_stages_left = stages_per_group;
    }
  };

  constexpr int kGroupTiles = kScaled ? 1 : kAccRows;  // scaled tiles need no group sums
  float acc[kAccRows][8][4];           // scaled running sum
  float group_acc[kGroupTiles][8][4];  // exact partial sum of the current group (exact tiles)
  zero_accumulators(acc);
  zero_accumulators(group_acc);

  if constexpr (kWgmma) {  // zeros materialised here, not sunk past the first wgmma (C7515)
#pragma unroll
    for (int r = 0; r < kAccRows; ++r) fence_registers(reinterpret_cast<float(&)[32]>(acc[r]));
    if constexpr (!kScaled) {
#pragma unroll
      for (int r = 0; r < kGroupTiles; ++r) fence_registers(reinterpret_cast<float(&)[32]>(group_acc[r]));
    }
  }

  uint32_t biased_zero[8];
  uint32_t neg_zero16[8];  // lean tiles: -(64 + z) per n8 block (unused otherwise)
  // Exact tiles: this lane's two accumulator columns in each n8 block (fp16 as stored).
  // Scaled tiles: the lane's B-fragment column in each n8 block, broadcast to both halves.
  __half2 scale[8];
  uint32_t frag_scale[8];
  const bool warp_active = my_tile < block_tiles;
  uint32_t wg_zero[2 * kWW], wg_neg_zero[2 * kWW], wg_scale[2 * kWW];  // wgmma tiles' group params

  // First k row of the next group: a group starts where k_row reaches it (no division per
  // k-tile). A split may begin inside a group: its first boundary is computed once.
  int next_group_row = stage_begin * kStageK;
  const int first_boundary = (stage_begin * kStageK / p.group_size + 1) * p.group_size;

  // acc += group_acc * scale, then start a new group sum.
  auto flush_group = [&]() {
    if constexpr (kWgmma && !kScaled) {
      // The group's wgmmas must have finished; each accumulator row (an output feature) has the
      // one scale of its block: wg_scale[2 j + e / 2] (unpack_word_params), fp16 -> fp32 exact.
      wgmma_wait<0>();
#pragma unroll
      for (int r = 0; r < kGroupTiles; ++r) fence_registers(reinterpret_cast<float(&)[32]>(group_acc[r]));
      auto& sums = reinterpret_cast<float(&)[kWW][kWgTokens / 8][4]>(group_acc);
      auto& total = reinterpret_cast<float(&)[kWW][kWgTokens / 8][4]>(acc);
#pragma unroll
      for (int j = 0; j < kWW; ++j) {
        const float s_lo = __half2float(__ushort_as_half(static_cast<unsigned short>(wg_scale[2 * j] & 0xffffu)));
        const float s_hi = __half2float(__ushort_as_half(static_cast<unsigned short>(wg_scale[2 * j + 1] & 0xffffu)));
#pragma unroll
        for (int i = 0; i < kWgTokens / 8; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            total[j][i][e] = fmaf(sums[j][i][e], e < 2 ? s_lo : s_hi, total[j][i][e]);
            sums[j][i][e] = 0.f;
          }
      }
    } else if constexpr (!kScaled) {  // (scaled tiles: the scale is already inside the fragments)
#pragma unroll
      for (int mi = 0; mi < kWarpTilesM; ++mi)
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
          const float2 s = __half22float2(scale[nb]);  // fp16 -> fp32 is exact
          acc[mi][nb][0] = fmaf(group_acc[mi][nb][0], s.x, acc[mi][nb][0]);
          acc[mi][nb][1] = fmaf(group_acc[mi][nb][1], s.y, acc[mi][nb][1]);
          acc[mi][nb][2] = fmaf(group_acc[mi][nb][2], s.x, acc[mi][nb][2]);
          acc[mi][nb][3] = fmaf(group_acc[mi][nb][3], s.y, acc[mi][nb][3]);
#pragma unroll
          for (int e = 0; e < 4; ++e) group_acc[mi][nb][e] = 0.f;
        }
    }
  };

#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < stage_count) load_stage(s);
    cp_async_commit();  // always commit, so wait_group counts stay uniform
  }

  for (int s = 0; s < stage_count; ++s) {
    cp_async_wait<kAhead - 1>();
    if constexpr (kWgmma) fence_async_proxy_smem();
    // Stage s has landed for everyone, and slot (s + kAhead) % kStages is free again: mma.sync
    // finished stage s - 1 before the barrier; wgmma finished stage s - 2 (its wait_group in the
    // first k-step of stage s - 1 leaves only that k-step's group running).
    __syncthreads();
    if (s + kAhead < stage_count) load_stage((s + kAhead) % kStages);
    cp_async_commit();

    const int slot = s % kStages;
    const int gs = stage_begin + s;
    const unsigned char* base = smem + slot * Smem::kStageBytes;
    if (kWgmma || warp_active) {  // (a wgmma needs all four warps of its warpgroup)
      const uint4* w_src = reinterpret_cast<const uint4*>(base + Smem::kWeightOffset);
      const uint4* a_src = reinterpret_cast<const uint4*>(base + Smem::kActOffset);
      const unsigned char* s_src = base + Smem::kScaleOffset;
      const uint32_t* z_src = reinterpret_cast<const uint32_t*>(base + Smem::kZeroOffset);
#pragma unroll
      for (int kt = 0; kt < kStageKTiles; ++kt) {
        const int k_row = gs * kStageK + kt * kTileK;
        // Groups are 32 rows or a multiple of 64 (the binding refuses others) and every split
        // starts on a 64-row stage, so a group can only start on an even k-tile (16 rows each):
        // lean tiles skip the test on odd ones at compile time.
        if ((!kLean || kt % 2 == 0) && k_row == next_group_row) {
          const bool first = s == 0 && kt == 0;
          if (!first) flush_group();
          next_group_row = first ? first_boundary : k_row + p.group_size;
          const int r = two_groups ? kt / 2 : 0;  // group row of this stage in shared memory
          // Zeros: word (lane / 4) of this warp's tile (8 words per tile).
          const uint32_t zero_word = z_src[r * (kBlockN / 8) + my_tile * 8 + lane / 4];
          const __half* tile_scales = reinterpret_cast<const __half*>(s_src + r * kBlockN * 2) + my_tile * kTileN;
          if constexpr (kWgmma) {
            unpack_word_params<T, kWW, kLean>(zero_word, tile_scales, lane, first_word, wg_zero, wg_neg_zero, wg_scale);
          } else {
            unpack_zeros<T>(zero_word, biased_zero);
            if constexpr (kLean) unpack_neg_zeros16(zero_word, neg_zero16);
            if constexpr (kScaled) {
              load_fragment_scales(tile_scales, lane, frag_scale);
            } else {
              // Scales: 16 halves at 16 * (lane % 4) of this warp's tile, half2 nb = block nb.
              const __half2* sc = reinterpret_cast<const __half2*>(tile_scales + 16 * (lane % 4));
#pragma unroll
              for (int nb = 0; nb < 8; ++nb) scale[nb] = sc[nb];
            }
          }
        }
        if constexpr (kWgmma) {
          const uint4* lane_words = w_src + (kt * kBlockTiles + my_tile) * 32 + lane;
          uint32_t w[kWW];
          if constexpr (kWW == 4) {
            const uint4 v = *lane_words;
            w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
          } else {
            const uint2 v = reinterpret_cast<const uint2*>(lane_words)[first_word / 2];
            w[0] = v.x, w[1] = v.y;
          }
          uint32_t a[kWW][4];
          dequant_a_fragments<T, kWW, kScaled, kLean>(w, wg_zero, wg_neg_zero, wg_scale, a);
          // B: the warpgroup's tokens (its 64 rows for 4 words, all of the block's for 2), k-step
          // kt: +32 B per k16 inside the 128 B rows.
          const int b_row0 = kWW == 4 ? warp_m * 64 : 0;
          const uint64_t desc = sw128_kmajor_desc(smem_u32(a_src) + b_row0 * 128 + kt * 32);
          if constexpr (kScaled)
            wgmma_step<T, kWW, kWgTokens>(acc, a, desc);
          else
            wgmma_step<T, kWW, kWgTokens>(group_acc, a, desc);
        } else {
          uint32_t frag[8][2];
          dequant_tile<T, kScaled, kLean>(w_src[(kt * kBlockTiles + warp_n) * 32 + lane], biased_zero, neg_zero16,
                                          frag_scale, frag);
#pragma unroll
          for (int mi = 0; mi < kWarpTilesM; ++mi) {
            // A fragment of rows [16 mi, 16 mi + 16) of this warp, k-tile kt: lanes 0-15 give
            // rows 0-15 of chunk 2 kt, lanes 16-31 rows 0-15 of chunk 2 kt + 1 (a0..a7 order).
            const int r = (warp_m * kWarpTilesM + mi) * 16 + lane % 16;
            uint32_t a[4];
            ldmatrix_x4(a, a_src + swizzled_chunk(r, 2 * kt + lane / 16));
#pragma unroll
            for (int nb = 0; nb < 8; ++nb) {
              if constexpr (kScaled)
                Act<T>::mma(acc[mi][nb], a, frag[nb][0], frag[nb][1]);
              else
                Act<T>::mma(group_acc[mi][nb], a, frag[nb][0], frag[nb][1]);
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  if (kWgmma || warp_active) flush_group();
  if constexpr (kWgmma) {
    wgmma_wait<0>();
#pragma unroll
    for (int r = 0; r < kAccRows; ++r) fence_registers(reinterpret_cast<float(&)[32]>(acc[r]));
  }
  if constexpr (!std::is_same_v<Out, T>) {
    // Row r of x came scaled by 2^e_r: undo it (row_unscale). Accumulator [mi][nb][e]: row
    // 16 mi + lane / 4 + 8 (e / 2).
#pragma unroll
    for (int mi = 0; mi < kWarpTilesM; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float unscale = row_unscale(p, row0 + (warp_m * kWarpTilesM + mi) * 16 + lane / 4 + 8 * h);
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
          acc[mi][nb][2 * h] *= unscale;
          acc[mi][nb][2 * h + 1] *= unscale;
        }
      }
  }

  // ---------------------------------------------------------------------------------------
  // Epilogue. The accumulators by (row, column) in the block's tile:
  //  - mma.sync fragments in pairs of adjacent columns: c0, c1 at row lane / 4, columns
  //    2 (lane % 4) + {0, 1} of each n8 block; c2, c3 eight rows below;
  //  - wgmma D elements one by one (the product is computed transposed): D of wgmma j
  //    (wgmma_step), element [i][e] at column 16 j + 8 (e / 2) + lane / 4 of the warp's words,
  //    row 8 i + e % 2 + 2 (lane % 4).
  // ---------------------------------------------------------------------------------------
  auto for_each_pair = [&](auto&& f) {  // f(row, col, v0, v1), mma.sync tiles
    const int r0 = warp_m * kWarpTilesM * 16 + lane / 4;
    const int c0 = warp_n * kTileN + 2 * (lane % 4);
#pragma unroll
    for (int mi = 0; mi < kWarpTilesM; ++mi)
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int h = 0; h < 2; ++h) f(r0 + mi * 16 + 8 * h, c0 + nb * 8, acc[mi][nb][2 * h], acc[mi][nb][2 * h + 1]);
  };
  auto for_each_element = [&](auto&& f) {  // f(row, col, v), wgmma tiles
    const auto& d = reinterpret_cast<const float(&)[kWW][kWgTokens / 8][4]>(acc);
    const int r0 = (kWW == 4 ? warp_m * 64 : 0) + 2 * (lane % 4);
    const int c0 = my_tile * kTileN + 16 * first_word + lane / 4;
#pragma unroll
    for (int j = 0; j < kWW; ++j)
#pragma unroll
      for (int i = 0; i < kWgTokens / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) f(r0 + 8 * i + e % 2, c0 + 16 * j + 8 * (e / 2), d[j][i][e]);
  };
  const int col0 = tile_n0 * kTileN;

  // Split-K in a thread-block cluster (sm_90, plan.cluster_reduce): the pipeline's shared memory
  // is free now and takes this split's partial tile; the cluster sums the tiles.
  if constexpr (Smem::kHoldsPartialTile) {
    if (p.cluster_reduce) {
      __syncthreads();  // every warp is done with the last stage
      float* tile = reinterpret_cast<float*>(smem);
      if (warp_active) {
        if constexpr (kWgmma)
          for_each_element([&](int r, int c, float v) { tile[r * kPartialStride + c] = v; });
        else
          for_each_pair([&](int r, int c, float v0, float v1) {
            *reinterpret_cast<float2*>(tile + r * kPartialStride + c) = make_float2(v0, v1);
          });
      }
      reduce_split_k_in_cluster<Out>(p, tile, row0, kBlockM, col0, block_tiles * kTileN);
      return;
    }
  }

  // Otherwise y directly (one split), or this split's fp32 partial tile and the reduction
  // (reduce_split_k).
  float* part = p.partials + static_cast<size_t>(sb.split) * p.m * p.n;
  if (warp_active) {
    if constexpr (kWgmma) {
      for_each_element(
          [&](int r, int c, float v) { store_element<Out>(p, part, row0 + r, col0 + c, v); });
    } else if (p.splits == 1) {
      for_each_pair([&](int r, int c, float v0, float v1) { store_pair<Out>(p, row0 + r, col0 + c, v0, v1); });
    } else {
      for_each_pair([&](int r, int c, float v0, float v1) {
        if (row0 + r < p.m)
          __stcg(reinterpret_cast<float2*>(part + static_cast<size_t>(row0 + r) * p.n + col0 + c), make_float2(v0, v1));
      });
    }
  }
  if (p.splits == 1) return;
  const int grid_n = (n_tiles + kBlockTiles - 1) / kBlockTiles;
  reduce_split_k<Out, kBlockM == 32 ? 2 : 1, !kWgmma>(p, sb.split, p.counters + sb.row_block * grid_n + sb.col_block,
                                                      row0, kBlockM, col0, block_tiles * kTileN);
}

// ------------------------------------------------------------------------------------------
// Launcher
// ------------------------------------------------------------------------------------------
// Blocks of configuration Cfg one SM holds at once (registers / shared memory permitting); also
// raises the kernel's dynamic shared-memory limit, once.
template <typename Cfg>
int blocks_per_sm() {
  static int cached = -1;
  if (cached < 0) {
    cudaFuncSetAttribute(Cfg::kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
    int n = 1;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Cfg::kernel, Cfg::kThreads, Cfg::kSmem);
    cached = std::max(n, 1);
  }
  return cached;
}

// A launch with the K splits of each output tile as one cluster (1 x 1 x splits), for
// reduce_split_k_in_cluster. (Clusters of more than 8 CTAs need the kernel's non-portable opt-in:
// max_active_clusters gives it once, before any plan can ask for such a cluster.)
// (The cluster scheduling policies -- default, spread, load-balancing -- timed the same on the
// H100, session 7.)
struct ClusterLaunch {
  cudaLaunchAttribute cluster{};
  cudaLaunchConfig_t config{};

  ClusterLaunch(dim3 grid, int threads, int smem, int splits, cudaStream_t stream) {
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 1;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = static_cast<unsigned>(splits);
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = static_cast<size_t>(smem);
    config.stream = stream;
    config.attrs = &cluster;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // config.attrs points into this object
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// How many clusters of `splits` CTAs of configuration Cfg the GPU holds at once (0: none fits).
// Every cluster size is queried on the first call, so that a later plan (a new M, perhaps while
// a CUDA graph is being captured) only reads the cache.
template <typename Cfg>
int max_active_clusters(int splits) {
  static int cached[kMaxClusterSplits + 1] = {};  // -1: no such cluster fits
  if (splits < 2 || splits > kMaxClusterSplits) return 0;
  if (cached[splits] == 0) {
    blocks_per_sm<Cfg>();  // (sets the shared-memory limit the query needs)
    cudaFuncSetAttribute(Cfg::kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);  // sizes 9-16
    for (int size = 2; size <= kMaxClusterSplits; ++size) {
      const ClusterLaunch launch(dim3(1, 1, size), Cfg::kThreads, Cfg::kSmem, size, nullptr);
      int n = 0;
      if (cudaOccupancyMaxActiveClusters(&n, Cfg::kernel, &launch.config) != cudaSuccess) {
        cudaGetLastError();  // clear the error; plans of this size use the global reduction
        n = 0;
      }
      cached[size] = n > 0 ? n : -1;
    }
  }
  return std::max(cached[splits], 0);
}

template <typename T, int kWarpTilesM, int kWarpsM, bool kScaled, int kMinBlocks, bool kLean = false,
          int kWgWords = 0, typename Out = T>
struct Config {
  static constexpr int kThreads = 32 * kWarpsN * kWarpsM;
  static constexpr int kBlockM = 16 * kWarpTilesM * kWarpsM;
  static constexpr int kTilesN = kBlockTiles;  // 64-column tiles per block
  static constexpr bool kWgmma = kWgWords > 0;
  static constexpr bool kStreamK = false;  // K splits every tile: grid (grid_n, grid_m, splits)
  static constexpr int kSmem = SmemLayout<kBlockM, kWgmma>::kTotalBytes;
  static constexpr bool kClusterReduce = SmemLayout<kBlockM, kWgmma>::kHoldsPartialTile;
  static constexpr auto kernel =
      quick_gemm_kernel<T, kWarpTilesM, kWarpsM, kScaled, kMinBlocks, kLean, kWgWords, Out>;

  static cudaError_t launch(const GemmPlan& plan, const KernelParams& params, cudaStream_t stream) {
    if (!std::is_same_v<Out, T> && params.act_row_abs_max == nullptr) return cudaErrorInvalidValue;
    blocks_per_sm<Config>();  // raises the dynamic shared-memory limit once
    // Global split-K: split-major (the splits of a tile are consecutive blocks, reduce_split_k).
    const dim3 grid = params.split_major ? dim3(plan.splits, plan.grid_n, plan.grid_m)
                                         : dim3(plan.grid_n, plan.grid_m, plan.splits);
    if (!params.cluster_reduce) {
      kernel<<<grid, kThreads, kSmem, stream>>>(params);
      return cudaGetLastError();
    }
    const ClusterLaunch launch(grid, kThreads, kSmem, plan.splits, stream);
    return cudaLaunchKernelEx(&launch.config, kernel, params);
  }
};

// cuTensorMapEncodeTiled, a driver API function, found through the runtime so that the extension
// needs no link to libcuda (nullptr where the driver lacks it).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiledFn tensor_map_encoder() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const bool ok = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                                     &found) == cudaSuccess &&
                    found == cudaDriverEntryPointSuccess;
    return ok ? reinterpret_cast<EncodeTiledFn>(f) : nullptr;
  }();
  return fn;
}

// An on-by-default A/B switch of the ws tiles: off only where the variable is "0". Read on every
// launch. VLLM_QUICK_WS_WEIGHT_MAP: "0" moves the weights by one bulk copy per k-tile row instead
// of one 2-D TMA copy per stage; VLLM_QUICK_PDL: "0" launches without programmatic dependent launch;
// VLLM_QUICK_WS_LEAN_FIXUP: "0" fixes up shared tiles with every thread's fences (the old way).
bool switch_setting(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// An integer tuning knob from the environment: its value when it parses as an integer in
// [lo, hi], else `fallback` (unset, empty or out of range). Read on every plan or launch, so a
// benchmark may change it between calls; std::strtol parses in the C locale.
int int_setting(const char* name, int lo, int hi, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const long n = std::strtol(v, nullptr, 10);
  return n >= lo && n <= hi ? static_cast<int>(n) : fallback;
}

// The ws tiles (quick_gemm_ws.cuh): the Config interface, plus the activations' TMA map: x
// [m, k] fp16, k fastest, read in boxes of 64 k x kTokens rows with the 128-byte swizzle that
// the wgmma descriptor expects (sw128_kmajor_desc); rows past m read as zeros. Out: y's type
// (bf16 calls give the wgmma tiles the fp16 copy of x and its per-row scales,
// GemmArgs::act_row_abs_max; the mma.sync tiles read the bf16 x itself through a bf16 map).
template <int kWGs, int kTokens, int kStages, typename Out, int kBlocksPerSm = 1, int kWarpWords = 1>
struct WsConfig {
  static constexpr int kThreads = 128 * (kWGs + 1);  // consumer warpgroups + the producer warpgroup
  static constexpr int kBlockM = kTokens;
  static constexpr int kTilesN = kWGs * kWarpWords;  // a warp takes kWarpWords words (ws_warp_word)
  static constexpr int kSmem = WsSmem<kTilesN, kTokens, kStages>::kTotalBytes;
  static constexpr bool kClusterReduce = false;  // (256 tokens: no room for the partial tile)
  static constexpr bool kWgmma = true;
  static constexpr bool kStreamK = true;  // stream-K over the last wave's tiles (ws_block_work)
  static constexpr bool kMmaSync = ws_tile_uses_mma_sync(kTokens);  // ws8 .. ws32b2, ws8w .. ws32w
  // Group size 32 (two group rows per stage) and every other group size: two kernels.
  static constexpr auto kernel = quick_gemm_ws_kernel<kWGs, kTokens, kStages, false, Out, kBlocksPerSm, kWarpWords>;
  static constexpr auto kernel_two_groups =
      quick_gemm_ws_kernel<kWGs, kTokens, kStages, true, Out, kBlocksPerSm, kWarpWords>;

  static cudaError_t launch(const GemmPlan& plan, const KernelParams& params, cudaStream_t stream) {
    const EncodeTiledFn encode = tensor_map_encoder();
    if (encode == nullptr) return cudaErrorNotSupported;
    // bf16 calls: the mma.sync tiles read x as it is, the wgmma ones its fp16 copy (with row scales).
    constexpr bool kBf16 = !std::is_same_v<Out, __half>;
    if (kBf16 && !kMmaSync && params.act_row_abs_max == nullptr) return cudaErrorInvalidValue;
    CUtensorMap map;
    const cuuint64_t dims[2] = {static_cast<cuuint64_t>(params.k), static_cast<cuuint64_t>(params.m)};
    const cuuint64_t row_bytes[1] = {static_cast<cuuint64_t>(params.k) * 2};
    const cuuint32_t box[2] = {kStageK, kTokens};
    const cuuint32_t element_strides[2] = {1, 1};
    const CUtensorMapDataType type = kBf16 && kMmaSync ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    if (encode(&map, type, 2, const_cast<void*>(params.x), dims, row_bytes, box,
               element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
               CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
      return cudaErrorInvalidValue;
    // The weights as a 2-D tensor of 8-byte elements: a row per 16-row k-tile (N / 64 tiles of
    // 512 B, vllm_quick/layout.py), a box of the block's tiles x the stage's 4 k-tiles -- one
    // copy per stage. Where it cannot be encoded (or VLLM_QUICK_WS_WEIGHT_MAP=0), the bulk copies.
    KernelParams kp = params;
    CUtensorMap weight_map{};
    const cuuint64_t w_dims[2] = {static_cast<cuuint64_t>(params.n / kTileN) * 64, static_cast<cuuint64_t>(params.k / 16)};
    const cuuint64_t w_row_bytes[1] = {static_cast<cuuint64_t>(params.n / kTileN) * 512};
    const cuuint32_t w_box[2] = {kTilesN * 64, 4};
    kp.weights_by_map = switch_setting("VLLM_QUICK_WS_WEIGHT_MAP") &&
                        encode(&weight_map, CU_TENSOR_MAP_DATA_TYPE_UINT64, 2, const_cast<uint4*>(params.qweight), w_dims,
                               w_row_bytes, w_box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                               CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
    kp.lean_fixup = switch_setting("VLLM_QUICK_WS_LEAN_FIXUP");
#ifdef QUICK_WS_TIMELINE
    // VLLM_QUICK_WS_TIMELINE_SLOT: the launch slot the blocks record into (quick_gemm_ws.cuh).
    kp.timeline_slot = int_setting("VLLM_QUICK_WS_TIMELINE_SLOT", 0, kTimelineSlots - 1, -1);
#endif
    blocks_per_sm<WsConfig>();
    static const bool two_groups_ready =
        cudaFuncSetAttribute(kernel_two_groups, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) == cudaSuccess;
    (void)two_groups_ready;
    // Whole tiles, then the stream-K blocks (ws_block_work); with programmatic dependent launch
    // (the kernel waits for the previous one in the stream itself: wait_for_previous_grid).
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(plan.blocks);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = kSmem;
    config.stream = stream;
    cudaLaunchAttribute pdl{};
    pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    pdl.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &pdl;
    config.numAttrs = switch_setting("VLLM_QUICK_PDL") ? 1 : 0;
    return cudaLaunchKernelEx(&config, params.group_size == 32 ? kernel_two_groups : kernel, map, weight_map, kp);
  }
};

// The tile configurations (quick_gemm.h, enum Tile): calls f.template operator()<Cfg>().
//   x16 / x32 / x64: exact fragments, blocks of 16 rows (1 warp tile, 128 threads, 4 blocks per
//     SM at <= 128 registers), 32 rows (2 warp tiles) and 64 rows (2 x 2 warps, 256 threads).
//     A 128-row exact block (512 threads) was tried: at 512 threads a thread may keep only 128
//     registers and the two accumulator sets spilled.
//   s16 / s32 / s64 / s128 (fp16): scaled fragments, one accumulator set; s64 is one warp of 4
//     mma tiles along M (64 rows, 128 registers of accumulators, 2 blocks per SM), s128 two.
//     (s32 at 4 blocks per SM, i.e. 128 registers, spilled 32 bytes: it asks for 3.)
//   s16m / s32m / s64m (fp16): s16 / s32 / s64 with the 16x magic (dequant_tile, kLean): one
//     shift per weight word instead of three, group tests on even k-tiles only. s16m and s32m
//     take bf16 calls too, like the ws tiles: x's exact fp16 copy in, bf16 y out (session 11).
//   w64 / w128 / w128n (fp16, sm_90a only): the lean fragments fed to wgmma instead of mma.sync
//     (wgmma_step): 4 words per warp and k-step, one warpgroup of 64 rows (2 blocks per SM) or two
//     (128 rows, 1 block per SM); w128n: 2 words per warp, two warpgroups along N sharing 128 rows.
//   w64x (fp16 and bf16, sm_90a only): exact fragments q - z through wgmma, 2 words per warp, two
//     warpgroups along N sharing 64 rows, per-group fp32 scaling like the x tiles.
//   ws256 (sm_90a only): warp-specialised (quick_gemm_ws.cuh): a TMA producer warpgroup and
//     two consumer warpgroups of one 64-column tile each, 256 tokens; fp16 fragments, so bf16
//     calls hand it x scaled exactly into fp16 (tile_takes_fp16_activations) and get bf16 y.
//   ws128: ws256 with 128 tokens per block (m64n128k16: no wgmma work on empty rows at M <= 128,
//     two row blocks at M <= 256) and 8 stages of 21 KB instead of 5 of 37 KB.
//   ws64: 64 tokens per block (m64n64k16) and 12 stages of 13 KB, for decode-sized M (session 10);
//     ws64b2: two such blocks per SM (8 stages each, consumers at 104 registers): at M <= 64 a
//     ws64 block waits on its k-step chain, not on the tensor cores or on issue slots.
//   ws128w4: ws128 with four consumer warpgroups, i.e. 256-column blocks (7 stages of 26 KB,
//     consumers at 112 registers): a ws128 block also waits on its k-step chain (the same time
//     at M = 64 and 128, session 12), and four warpgroups per SM keep the tensor cores twice as
//     busy; on layers with little work per block the fewer, wider tiles lose (session 12).
//   ws16 / ws8 (session 14): the ws producer (TMA, mbarriers, stream-K) feeding mma.sync
//     consumers for small M: 16 / 8 tokens per block, each warp's 16 features of the wgmma A
//     fragments times the tokens as m16n8k16 products, B by ldmatrix from the TMA tile, exact
//     q - z with fp32 group scaling (quick_gemm_ws.cuh); 2 consumer warpgroups (128 columns),
//     10 stages of 7 KB, 3 blocks per SM (consumers at 72 registers). Their partial wave is split
//     into up to 8 K ranges per tile or shared out by one stream-K wave (small_tile_schedule).
//     ws16b2: ws16 at two blocks per SM (14 stages, consumers at 104 registers); ws32b2 the same
//     with 32 tokens (12 stages of 9 KB).
//   ws8w / ws16w (session 15): ws8 / ws16 whose warps take two words per k-step (32
//     features, two A fragments against one B; ws_warp_word): one consumer warpgroup over the
//     block's 128 columns, 4 blocks per SM (consumers at 104 registers), 8 / 7 stages.
//   ws32w (sessions 15-16; the plans' tile from M = 17 to 32): the same with 32 tokens at 3
//     blocks per SM (consumers at 136 registers for 2 x 32 accumulator floats), 8 stages of 9 KB.
//     (Session 15 saw it differ between calls, now and then: its consumers released a stage's
//     slot before their ldmatrix reads had landed; session 16 moved the release, see the K loop.)
//   ws64w / ws128w (session 17): the wgmma tiles ws64 / ws128 with two words per warp: one
//     consumer warpgroup over 128 columns issues two wgmmas per k-step, one per word, into their
//     own accumulators (quick_wgmma.cuh, kWords = 2), so each k-step chain of dequantise -> wgmma
//     -> wait carries twice the work (ncu, session 17: ws64b2 at M = 64 keeps the tensor pipe 31%
//     busy and its DRAM 28%, its warps waiting on the chain). 3 blocks per SM for ws64w
//     (consumers at 136 registers, 5 stages of 13 KB), 2 for ws128w (232 registers, 5 of 21 KB).
//   ws192 (session 20): ws256 with 192 tokens per block (m64n192k16, 96 accumulator floats per
//     consumer thread, 7 stages of 29 KB): three row blocks of 192 cover M = 576 (vLLM's mixed
//     step at concurrency 64: 512 prefill tokens + 63 decodes), where ws256 pads a row block or
//     takes a second launch for the remainder (the row split, vllm_quick/dispatch.py).
// A tile the activation type does not support (the other scaled tiles for bf16) falls back to x64.
template <typename T, typename F>
auto with_tile(int tile, F&& f) {
  constexpr bool kHalf = std::is_same_v<T, __half>;
  switch (tile) {
    case kTileX16: return f.template operator()<Config<T, 1, 1, false, 4>>();
    case kTileX32: return f.template operator()<Config<T, 2, 1, false, 1>>();
    case kTileS16: if constexpr (kHalf) return f.template operator()<Config<T, 1, 1, true, 4>>(); break;
    case kTileS32: if constexpr (kHalf) return f.template operator()<Config<T, 2, 1, true, 3>>(); break;
    case kTileS64: if constexpr (kHalf) return f.template operator()<Config<T, 4, 1, true, 2>>(); break;
    case kTileS128: if constexpr (kHalf) return f.template operator()<Config<T, 4, 2, true, 1>>(); break;
    // s16m / s32m take bf16 calls too, through x's fp16 copy (tile_takes_fp16_activations).
    case kTileS16M: return f.template operator()<Config<__half, 1, 1, true, 4, true, 0, T>>();
    case kTileS32M: return f.template operator()<Config<__half, 2, 1, true, 3, true, 0, T>>();
    case kTileS64M: if constexpr (kHalf) return f.template operator()<Config<T, 4, 1, true, 2, true>>(); break;
    case kTileW64: if constexpr (kHalf) return f.template operator()<Config<T, 4, 1, true, 2, true, 4>>(); break;
    case kTileW128: if constexpr (kHalf) return f.template operator()<Config<T, 4, 2, true, 1, true, 4>>(); break;
    case kTileW128N: if constexpr (kHalf) return f.template operator()<Config<T, 4, 2, true, 1, true, 2>>(); break;
    case kTileW64X: return f.template operator()<Config<T, 2, 2, false, 1, false, 2>>();
    case kTileWS256: return f.template operator()<WsConfig<2, 256, 5, T>>();
    case kTileWS128: return f.template operator()<WsConfig<2, 128, 8, T>>();
    case kTileWS64: return f.template operator()<WsConfig<2, 64, 12, T>>();
    case kTileWS64B2: return f.template operator()<WsConfig<2, 64, 8, T, 2>>();
    case kTileWS128W4: return f.template operator()<WsConfig<4, 128, 7, T>>();
    case kTileWS16: return f.template operator()<WsConfig<2, 16, 10, T, 3>>();
    case kTileWS8: return f.template operator()<WsConfig<2, 8, 10, T, 3>>();
    case kTileWS16B2: return f.template operator()<WsConfig<2, 16, 14, T, 2>>();
    case kTileWS32B2: return f.template operator()<WsConfig<2, 32, 12, T, 2>>();
    case kTileWS8W: return f.template operator()<WsConfig<1, 8, 8, T, 4, 2>>();
    case kTileWS16W: return f.template operator()<WsConfig<1, 16, 7, T, 4, 2>>();
    case kTileWS32W: return f.template operator()<WsConfig<1, 32, 8, T, 3, 2>>();
    case kTileWS64W: return f.template operator()<WsConfig<1, 64, 5, T, 3, 2>>();
    case kTileWS128W: return f.template operator()<WsConfig<1, 128, 5, T, 2, 2>>();
    case kTileWS192: return f.template operator()<WsConfig<2, 192, 7, T>>();
    default: break;
  }
  return f.template operator()<Config<T, 2, 2, false, 1>>();  // kTileX64
}

template <typename F>
auto with_act(ActType act, int tile, F&& f) {
  if (act == ActType::kBFloat16) return with_tile<__nv_bfloat16>(tile, f);
  return with_tile<__half>(tile, f);
}

int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cached[device] == 0) cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device);
  return cached[device];
}

}  // namespace

bool read_ws_timeline(unsigned long long* host) {
#ifdef QUICK_WS_TIMELINE
  return cudaMemcpyFromSymbol(host, ws_timeline, sizeof(ws_timeline)) == cudaSuccess;
#else
  (void)host;
  return false;
#endif
}

// The ws tiles: the configurations with the stream-K schedule (WsConfig), whatever their place in Tile.
static bool is_ws_tile(int tile) {
  return tile >= 0 && tile < kTileCount && with_tile<__half>(tile, [&]<typename Cfg>() { return Cfg::kStreamK; });
}

const char* tile_name(int tile) {
  static const char* const kNames[kTileCount] = {"x16", "x32", "x64", "s16", "s32", "s64", "s128",
                                                 "s16m", "s32m", "s64m", "w64", "w128", "w128n", "w64x",
                                                 "ws256", "ws128", "ws64", "ws64b2", "ws128w4",
                                                 "ws16", "ws8", "ws16b2", "ws32b2", "ws8w", "ws16w", "ws32w",
                                                 "ws64w", "ws128w", "ws192"};
  return tile >= 0 && tile < kTileCount ? kNames[tile] : "auto";
}

// The tiles that take bf16 calls through x's fp16 copy: the ws tiles with wgmma consumers and the
// lean mma.sync tiles s16m / s32m (their fragments are fp16 tricks; with_tile instantiates them
// with a bf16 y). The ws tiles with mma.sync consumers multiply bf16 as it is (session 16).
static bool takes_bf16_as_fp16(int tile) {
  if (tile == kTileS16M || tile == kTileS32M) return true;
  return is_ws_tile(tile) && !with_tile<__half>(tile, [&]<typename Cfg>() {
    if constexpr (Cfg::kStreamK) return Cfg::kMmaSync;
    return false;
  });
}

bool tile_supports(int tile, ActType act) {
  if (tile == kTileAuto) return true;
  if (tile < 0 || tile >= kTileCount) return false;
  return tile <= kTileX64 || tile == kTileW64X || is_ws_tile(tile) || takes_bf16_as_fp16(tile) ||
         act == ActType::kFloat16;
}

bool tile_takes_fp16_activations(int tile, ActType act) {
  return takes_bf16_as_fp16(tile) && act == ActType::kBFloat16;
}

// Whether `device` is an sm_90 GPU, where the sm_90a build's wgmma tiles and cluster reduction
// run. Cached per device like sm_count(): the binding asks on every call.
static bool is_sm90(int device) {
  static int cached[64] = {0};  // 0 unknown, 1 sm_90, 2 other
  if (device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cached[device] = major == 9 && minor == 0 ? 1 : 2;
  }
  return cached[device] == 1;
}

bool tile_runs_on(int tile, int device) {
  if (tile < kTileW64 || tile >= kTileCount) return true;  // the w tiles close the Tile enum
  return is_sm90(device);  // wgmma code exists only in the sm_90a build
}

int default_tile(int m, ActType) {
  if (m <= 16) return kTileX16;
  if (m <= 32) return kTileX32;
  return kTileX64;
}

// The most K splits plan() makes: 8, or VLLM_QUICK_MAX_SPLITS (1-32) for tuning experiments
// (benchmarks/KERNEL_NOTES.md: at mid M the kernel wants more parallelism).
static int max_splits_setting(int fallback = 8) { return int_setting("VLLM_QUICK_MAX_SPLITS", 1, 32, fallback); }

// VLLM_QUICK_WS_SPLITS=s (1-32): the ws tiles split each tile of their last, partial wave into
// s K ranges instead of what plan_ws_schedule() estimates (benchmarks and tests); 0 (unset or
// anything else): the estimate.
static int ws_splits_setting() { return int_setting("VLLM_QUICK_WS_SPLITS", 1, 32, 0); }

// VLLM_QUICK_WS_STREAMK: "0" leaves stream-K over one full wave of blocks out of the estimate
// (tail splits only, session 10's plans), "always" takes it wherever a wave is partial; unset,
// the estimate decides (quick_stream_k.cuh). Read on every plan, like VLLM_QUICK_WS_SPLITS.
static StreamK ws_streamk_setting() {
  const char* v = std::getenv("VLLM_QUICK_WS_STREAMK");
  if (v != nullptr && std::strcmp(v, "0") == 0) return StreamK::kNever;
  if (v != nullptr && std::strcmp(v, "always") == 0) return StreamK::kAlways;
  return StreamK::kAuto;
}

// VLLM_QUICK_CLUSTER_REDUCE: "0" turns the cluster split-K reduction off (the global-memory one
// runs instead), "always" takes it wherever it can run; unset, plan() decides. A/B switches for
// benchmarks and tests, read on every plan like VLLM_QUICK_MAX_SPLITS.
enum class ClusterSetting { kOff, kAuto, kAlways };
static ClusterSetting cluster_reduce_setting() {
  const char* v = std::getenv("VLLM_QUICK_CLUSTER_REDUCE");
  if (v != nullptr && std::strcmp(v, "0") == 0) return ClusterSetting::kOff;
  if (v != nullptr && std::strcmp(v, "always") == 0) return ClusterSetting::kAlways;
  return ClusterSetting::kAuto;
}

static int resolve_tile(const GemmProblem& pr) {
  return tile_supports(pr.tile, pr.act) && pr.tile != kTileAuto ? pr.tile : default_tile(pr.m, pr.act);
}

GemmPlan plan(const GemmProblem& pr, int device) {
  return with_act(pr.act, resolve_tile(pr), [&]<typename Cfg>() {
    GemmPlan pl{};
    pl.block_m = Cfg::kBlockM;
    pl.grid_n = (pr.n / kTileN + Cfg::kTilesN - 1) / Cfg::kTilesN;
    pl.grid_m = (pr.m + Cfg::kBlockM - 1) / Cfg::kBlockM;
    pl.blocks_per_sm = blocks_per_sm<Cfg>();
    const int total_stages = pr.k / kStageK;
    if constexpr (Cfg::kStreamK) {
      // Whole tiles, then stream-K over the last, partial wave (quick_stream_k.cuh).
      const int tile_floats = Cfg::kBlockM * Cfg::kTilesN * kTileN;
      const int tiles = pl.grid_n * pl.grid_m, slots = sm_count(device) * pl.blocks_per_sm;
      StreamK streamk = ws_streamk_setting();
      int forced_splits = ws_splits_setting();
      if (Cfg::kMmaSync && streamk == StreamK::kAuto && forced_splits == 0) {
        // ws8 / ws16 / ws16b2 / ws32b2: a tail split or one stream-K wave (quick_stream_k.cuh).
        const SmallTileSchedule choice = small_tile_schedule(tiles, slots, total_stages, pl.blocks_per_sm);
        forced_splits = choice.forced_splits;
        streamk = choice.streamk;
      }
      const WsSchedule w = plan_ws_schedule(tiles, slots, Cfg::kBlockM, Cfg::kTilesN * kTileN, pr.k,
                                            max_splits_setting(), forced_splits, streamk);
      pl.dp_blocks = w.dp_blocks;
      pl.sk_tiles = w.sk_tiles;
      pl.sk_blocks = w.sk_blocks;
      pl.max_pieces = w.max_pieces;
      pl.splits = w.max_pieces;
      pl.stages_per_split = w.sk_tiles > 0 ? (w.sk_tiles * total_stages + w.sk_blocks - 1) / w.sk_blocks : total_stages;
      pl.blocks = w.blocks;
      pl.partial_floats = static_cast<size_t>(w.sk_tiles) * (w.max_pieces - 1) * tile_floats;
      pl.counters = w.sk_tiles;
      return pl;
    }
    // Split K until the grid fills the GPU once, with at most max_splits (8) splits: every split
    // costs M x N x 4 bytes of partials to write and re-read. E.g. N = 4096, M = 1 on 132 SMs
    // holding 4 blocks each: 16 column blocks, 528 / 16 = 33 -> 8 splits of 8 stages (512 rows).
    // (Up to 22 splits were tried first: at M = 16 the reduction then cost more than it saved.)
    const int capacity = sm_count(device) * pl.blocks_per_sm;
    const int mn_blocks = pl.grid_n * pl.grid_m;
    // Long K (>= 128 stages) and few column blocks (8 splits give at most 1.5 blocks per SM):
    // up to 16 splits, each still >= 8 stages. H100, session 12 (results/
    // kernel_h100_s12_split16_tiles.md, s16m / s32m at M = 1-32): the "down" layers 11008 /
    // 13824 / 14336 x 4096-5120 (16-20 column blocks) ran 1.0-1.3x faster with 16, while
    // 28672 x 8192 (32) and 8192 x 10240 (40) lost up to 1.4x and 4096-deep layers lost too.
    const bool long_narrow = !Cfg::kWgmma && total_stages >= 128 && mn_blocks * 8 * 2 <= 3 * sm_count(device);
    const int max_splits = max_splits_setting(long_narrow ? 16 : 8);
    const int limit = std::max(1, std::min(total_stages / 2, max_splits));
    const int splits = std::max(1, std::min(capacity / std::max(mn_blocks, 1), limit));
    pl.stages_per_split = (total_stages + splits - 1) / splits;
    pl.splits = (total_stages + pl.stages_per_split - 1) / pl.stages_per_split;
    // On sm_90 the splits of a tile may reduce inside a thread-block cluster (partials in shared
    // memory, no workspace) where the tile fits there. plan() takes it where
    //  - the clusters hold as many CTAs at once as a plain launch (placement must not cost a wave:
    //    w64x's 1-block-per-SM clusters of 8 ran in two waves, 2x slower), and
    //  - for the mma.sync tiles, the fp32 partials a global reduction writes and re-reads are at
    //    least a tenth of the int4 weight bytes (splits x M x N x 4 >= 0.1 x K x N / 2). Below
    //    that the cluster launch lost up to 1.3x on the H100 (the long-K "down" layers at M <= 16,
    //    session 7: CTAs of a cluster share a GPC; not profiled), above it it won up to 1.7x. The
    //    wgmma tiles (w64x) never lost.
    const ClusterSetting cluster = cluster_reduce_setting();
    if (pl.splits > 1 && Cfg::kClusterReduce && is_sm90(device) && cluster != ClusterSetting::kOff) {
      pl.max_active_clusters = max_active_clusters<Cfg>(pl.splits);
      const int ctas = mn_blocks * pl.splits;
      const bool fits = pl.max_active_clusters * pl.splits >= std::min(ctas, capacity);
      const bool pays = Cfg::kWgmma || 8.0 * pl.splits * pr.m >= 0.1 * pr.k;
      pl.cluster_reduce = pl.max_active_clusters > 0 && (cluster == ClusterSetting::kAlways || (fits && pays));
    }
    const bool global_reduce = pl.splits > 1 && !pl.cluster_reduce;
    // Global split-K of the mma.sync tiles: every split sums a slice (split-major grid) once a tile
    // has kSliceMinRows rows; the last split alone below that, and for the wgmma tiles
    // (reduce_split_k).
    pl.split_major = global_reduce && !Cfg::kWgmma && std::min(pr.m, Cfg::kBlockM) >= kSliceMinRows;
    pl.partial_floats = global_reduce ? static_cast<size_t>(pl.splits) * pr.m * pr.n : 0;
    pl.counters = global_reduce ? mn_blocks : 0;
    pl.blocks = mn_blocks * pl.splits;
    return pl;
  });
}

cudaError_t run(const GemmProblem& pr, const GemmPlan& pl, const GemmArgs& a, cudaStream_t stream) {
  KernelParams kp{};
  kp.x = a.x;
  kp.qweight = static_cast<const uint4*>(a.qweight);
  kp.qzeros = static_cast<const uint32_t*>(a.qzeros);
  kp.scales = static_cast<const __half*>(a.scales);
  kp.bias = a.bias;
  kp.y = a.y;
  kp.partials = a.partials;
  kp.counters = a.counters;
  kp.m = pr.m;
  kp.k = pr.k;
  kp.n = pr.n;
  kp.size_n = pr.size_n;
  kp.group_size = pr.group_size;
  kp.stages_per_split = pl.stages_per_split;
  kp.splits = pl.splits;
  kp.dp_blocks = pl.dp_blocks;
  kp.sk_tiles = pl.sk_tiles;
  kp.sk_blocks = pl.sk_blocks;
  kp.max_pieces = pl.max_pieces;
  kp.cluster_reduce = pl.cluster_reduce;
  kp.split_major = pl.split_major;
  kp.act_row_abs_max = a.act_row_abs_max;
  // With one row of blocks along M every weight byte is read once: stream it past L2. With
  // several, neighbouring row blocks re-read the same tiles, so let L2 keep them.
  kp.weights_evict_first = pl.grid_m == 1;
  return with_act(pr.act, resolve_tile(pr), [&]<typename Cfg>() { return Cfg::launch(pl, kp, stream); });
}

}  // namespace quick
