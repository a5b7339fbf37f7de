// The warp-specialised Hopper tile ws256 (sm_90a, fp16): one producer warp moves every
// stage into shared memory with the Tensor Memory Accelerator (TMA), consumer warpgroups only
// dequantise and multiply. Included by csrc/quick_gemm.cu.
//
// Why (benchmarks/KERNEL_NOTES.md, session 5): in w128n every warp ran the cp.async copy plan,
// the group bookkeeping, the cp.async wait and a block-wide barrier each stage: ~180 of the 312
// instructions of a 64-row stage, against 130 for the dequantisation and the wgmmas. Here:
//   * the producer is one thread: per stage one 2-D TMA copy of the activations (the TMA writes
//     them already in wgmma's 128-byte swizzle and zero-fills rows past M), four 1-D bulk copies
//     of weight rows and one or two of scales and zeros, all completing on the stage's "full"
//     mbarrier (transaction bytes), and it waits on the stage's "empty" mbarrier before reusing
//     a slot;
//   * a consumer warp waits on "full", loads its 4-byte weight word per k-step, dequantises it
//     into one wgmma A fragment (the lean scaled fragments of the w tiles) and issues one
//     m64nTk16 over all T tokens of the block, then releases the previous stage on "empty" once
//     the wgmmas reading it are done. No block-wide barrier in the K loop.
//
// Block: kWGs consumer warpgroups, warpgroup c computes the 64 output features of 64-column tile
// c of the block (warp r of it: rows 16 r .. 16 r + 15, word r of every lane's 16 bytes:
// quick_wgmma.cuh, kWords = 1) for the block's kTokens tokens; warp 4 kWGs is the producer.
#pragma once

#include <cuda.h>  // CUtensorMap (the map is built on the host, quick_gemm.cu)

#include "quick_common.cuh"
#include "quick_fragments.cuh"
#include "quick_ptx.cuh"
#include "quick_wgmma.cuh"

namespace quick {
namespace {

// ------------------------------------------------------------------------------------------
// mbarriers and TMA (sm_90): the PTX ISA's "mbarrier" and "cp.async.bulk" sections. On other
// targets they compile to nothing (the ws tiles are refused there, like every w tile).
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
#if QUICK_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(arrivals) : "memory");
#endif
}

// Makes initialised mbarriers visible to the other threads and to the TMA unit (async proxy).
__device__ __forceinline__ void fence_mbarrier_init() {
#if QUICK_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// One arrival that also announces `bytes` of asynchronous copies the phase must wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if QUICK_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if QUICK_WGMMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
#endif
}

// Wait until the phase with this parity has completed (phase n of a barrier has parity n % 2).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if QUICK_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
#endif
}

// 2-D TMA load of the box at (c0 = column, c1 = row) of the tensor `map` describes.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
#if QUICK_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
#endif
}

// 1-D bulk copy of `bytes` (a multiple of 16, both addresses 16-byte aligned), L2 policy hint.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
#if QUICK_WGMMA
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::"r"(
          smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
#endif
}

// ------------------------------------------------------------------------------------------
// Shared memory of the ws tiles, per stage (a 64-row K slice): the activation tile first (the
// 128-byte swizzle needs a 1024-byte boundary), then the weight rows of the block's tiles as
// stored (k-tile kt, tile c at (kt kWGs + c) 512 B), scales and zeros of up to two group rows.
// The mbarriers follow the last stage.
// ------------------------------------------------------------------------------------------
template <int kWGs, int kTokens, int kStages>
struct WsSmem {
  static constexpr int kActBytes = kTokens * kStageK * 2;
  static constexpr int kTileBytes = kWordsPerTile * 4;  // 512
  static constexpr int kWeightRowBytes = kWGs * kTileBytes;
  static constexpr int kScaleRowBytes = kWGs * kTileN * 2;
  static constexpr int kZeroRowBytes = kWGs * kTileN / 2;
  static constexpr int kWeightOffset = kActBytes;
  static constexpr int kScaleOffset = kWeightOffset + kStageKTiles * kWeightRowBytes;
  static constexpr int kZeroOffset = kScaleOffset + kMaxGroupRowsPerStage * kScaleRowBytes;
  static constexpr int kStageBytes = (kZeroOffset + kMaxGroupRowsPerStage * kZeroRowBytes + 1023) / 1024 * 1024;
  static constexpr int kBarrierOffset = kStages * kStageBytes;
  static constexpr int kTotalBytes = kBarrierOffset + 2 * kStages * 8 + 1024;  // + alignment slack
};

// kMaxRegisters: the register budget, given to ptxas as __maxnreg__ (with the blocks-per-SM
// form of __launch_bounds__ ptxas serialised the wgmmas of the grouped variants, C7512, below
// the budget it had been given).
template <int kWGs, int kTokens, int kStages, int kMaxRegisters>
__global__ void __launch_bounds__(128 * kWGs + 32) __maxnreg__(kMaxRegisters)
    quick_gemm_ws_kernel(const __grid_constant__ CUtensorMap act_map, const KernelParams p) {
  using T = __half;
  using Smem = WsSmem<kWGs, kTokens, kStages>;
  constexpr int kRows = kTokens / 64;  // accumulator as [kRows][8][4] floats (wgmma_step)
  extern __shared__ __align__(16) unsigned char smem_window[];
  unsigned char* smem = smem_window + ((1024 - (smem_u32(smem_window) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Smem::kBarrierOffset);
  uint64_t* empty = full + kStages;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int n_tiles = p.n / kTileN;
  const int tile_n0 = blockIdx.x * kWGs;
  const int block_tiles = min(kWGs, n_tiles - tile_n0);
  const int row0 = blockIdx.y * kTokens;
  const int total_stages = p.k / kStageK;
  const int stage_begin = blockIdx.z * p.stages_per_split;
  const int stage_count = min(total_stages - stage_begin, p.stages_per_split);
  const bool two_groups = p.group_size == 32;  // (else a stage lies inside one group)

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);                   // the producer's arrive.expect_tx
      mbarrier_init(&empty[s], 4 * block_tiles);    // one arrival per working consumer warp
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (warp == 4 * kWGs) {
    // ---- Producer: one thread issues every copy. ----
    if (lane == 0) {
      const uint64_t policy = p.weights_evict_first ? evict_first_policy() : evict_normal_policy();
      const uint64_t keep = evict_normal_policy();
      const size_t w_row = static_cast<size_t>(n_tiles) * Smem::kTileBytes;  // bytes per k-tile row
      const unsigned char* w_src = reinterpret_cast<const unsigned char*>(p.qweight) +
                                   static_cast<size_t>(stage_begin) * kStageKTiles * w_row +
                                   static_cast<size_t>(tile_n0) * Smem::kTileBytes;
      const unsigned char* s_src = reinterpret_cast<const unsigned char*>(p.scales) + tile_n0 * kTileN * 2;
      const unsigned char* z_src = reinterpret_cast<const unsigned char*>(p.qzeros) + tile_n0 * kTileN / 2;
      const uint32_t w_bytes = block_tiles * Smem::kTileBytes;
      const uint32_t s_bytes = block_tiles * kTileN * 2, z_bytes = block_tiles * kTileN / 2;
      const int group_rows = two_groups ? 2 : 1;
      const uint32_t stage_bytes = Smem::kActBytes + kStageKTiles * w_bytes + group_rows * (s_bytes + z_bytes);
      for (int s = 0; s < stage_count; ++s) {
        const int slot = s % kStages;
        // Slot reuse: wait for the consumers' release of the stage kStages earlier.
        if (s >= kStages) mbarrier_wait(&empty[slot], (s / kStages - 1) & 1);
        unsigned char* base = smem + slot * Smem::kStageBytes;
        mbarrier_arrive_expect_tx(&full[slot], stage_bytes);
        const int gs = stage_begin + s;
        // Rows past M come back as zeros and still count as box bytes.
        tma_load_2d(base, &act_map, gs * kStageK, row0, &full[slot]);
#pragma unroll
        for (int kt = 0; kt < kStageKTiles; ++kt)
          bulk_load(base + Smem::kWeightOffset + kt * Smem::kWeightRowBytes, w_src + kt * w_row, w_bytes, &full[slot],
                    policy);
        w_src += kStageKTiles * w_row;
        for (int r = 0; r < group_rows; ++r) {
          const size_t group_row = two_groups ? 2 * gs + r : gs * kStageK / p.group_size;
          bulk_load(base + Smem::kScaleOffset + r * Smem::kScaleRowBytes, s_src + group_row * p.n * 2, s_bytes,
                    &full[slot], keep);
          bulk_load(base + Smem::kZeroOffset + r * Smem::kZeroRowBytes, z_src + group_row * p.n / 2, z_bytes,
                    &full[slot], keep);
        }
      }
    }
  } else if (warp / 4 < block_tiles) {
    // ---- Consumers: warpgroup wg, warp r of it (word r of each lane's 16 bytes). ----
    const int wg = warp / 4, r = warp % 4;
    float acc[kRows][8][4];
    zero_accumulators(acc);
#pragma unroll
    for (int i = 0; i < kRows; ++i) fence_registers(reinterpret_cast<float(&)[32]>(acc[i]));

    uint32_t zero[2], neg_zero16[2], scale[2];
    int next_group_row = stage_begin * kStageK;
    const int first_boundary = (stage_begin * kStageK / p.group_size + 1) * p.group_size;
    for (int s = 0; s < stage_count; ++s) {
      const int slot = s % kStages;
      mbarrier_wait(&full[slot], (s / kStages) & 1);
      const unsigned char* base = smem + slot * Smem::kStageBytes;
      const uint32_t* words = reinterpret_cast<const uint32_t*>(base + Smem::kWeightOffset);
      const uint32_t act_addr = smem_u32(base);
      // The stage's four weight words up front: the shared-memory latency then sits off the
      // chain between one wgmma's wait and the next one's issue (ncu: that chain holds the
      // tensor pipe at 56%). Word r of this lane's 16 bytes of tile wg, k-tile kt: a 4-way bank
      // conflict (lanes 8 apart hit the same bank), 4 wavefronts per warp and k-step.
      uint32_t stage_words[kStageKTiles];
#pragma unroll
      for (int kt = 0; kt < kStageKTiles; ++kt) stage_words[kt] = words[(kt * kWGs + wg) * 128 + lane * 4 + r];
#pragma unroll
      for (int kt = 0; kt < kStageKTiles; ++kt) {
        const int k_row = (stage_begin + s) * kStageK + kt * kTileK;
        // A group starts on an even k-tile (group 32 or a multiple of 64; stages start on 64).
        if (kt % 2 == 0 && k_row == next_group_row) {
          next_group_row = s == 0 && kt == 0 ? first_boundary : k_row + p.group_size;
          const int gr = two_groups ? kt / 2 : 0;
          const uint32_t zero_word =
              reinterpret_cast<const uint32_t*>(base + Smem::kZeroOffset + gr * Smem::kZeroRowBytes)[wg * 8 + lane / 4];
          const __half* tile_scales =
              reinterpret_cast<const __half*>(base + Smem::kScaleOffset + gr * Smem::kScaleRowBytes) + wg * kTileN;
          unpack_word_params<T, 1, true>(zero_word, tile_scales, lane, r, zero, neg_zero16, scale);
        }
        const uint32_t w[1] = {stage_words[kt]};
        uint32_t a[1][4];
        dequant_a_fragments<T, 1, true, true>(w, zero, neg_zero16, scale, a);
        // One wgmma per k-step, then wait for the previous one. (Session 6 also tried a stage's
        // four wgmmas as one commit group: 1.4-1.5x slower at 128 and 192 tokens, and wrong at
        // both -- see KERNEL_NOTES.md.)
        wgmma_step<T, 1, kTokens>(acc, a, sw128_kmajor_desc(act_addr + kt * 32));
        // wgmma_step waited for all but this k-step's wgmma: the previous stage is read.
        if (kt == 0 && s > 0) {
          __syncwarp();
          if (lane == 0) mbarrier_arrive(&empty[(s - 1) % kStages]);
        }
      }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < kRows; ++i) fence_registers(reinterpret_cast<float(&)[32]>(acc[i]));

    // D element [i][nb][e] (as kTokens / 2 floats out[x][e], x = 8 i + nb): output feature
    // n0 + 8 (e / 2), token t0 + 8 x + e % 2.
    const auto& out = reinterpret_cast<const float(&)[kTokens / 8][4]>(acc);
    const int n0 = (tile_n0 + wg) * kTileN + 16 * r + lane / 4;
    const int t0 = row0 + 2 * (lane % 4);
    float* part = p.partials + static_cast<size_t>(blockIdx.z) * p.m * p.n;
#pragma unroll
    for (int x = 0; x < kTokens / 8; ++x)
#pragma unroll
      for (int e = 0; e < 4; ++e) store_element<T>(p, part, t0 + 8 * x + e % 2, n0 + 8 * (e / 2), out[x][e]);
  }
  if (p.splits > 1) reduce_split_k<T>(p, row0, kTokens, tile_n0 * kTileN, block_tiles * kTileN);
}

}  // namespace
}  // namespace quick
