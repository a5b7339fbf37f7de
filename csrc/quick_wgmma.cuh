// Hopper warpgroup MMA (wgmma) for the w tiles: the PTX (sm_90a only), the 128-byte-swizzle
// descriptor of the activation tile, and how a lane's weight words become wgmma A fragments.
// Included by csrc/quick_gemm.cu.
#pragma once

#include <type_traits>

#include "quick_fragments.cuh"
#include "quick_ptx.cuh"

namespace quick {
namespace {

// ------------------------------------------------------------------------------------------
// Hopper warpgroup MMA (wgmma), for the w64 / w128 tiles. wgmma is an arch-specific feature of
// sm_90a: setup.py builds the sm_90 code as sm_90a, and on every other target these helpers
// compile to nothing (the w tiles are refused there: tile_runs_on()).
// ------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QUICK_WGMMA 1
#else
#define QUICK_WGMMA 0
#endif

// Registers written by ordinary instructions (the dequantised A fragments) must be fenced before
// a wgmma reads them.
__device__ __forceinline__ void wgmma_fence() {
#if QUICK_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if QUICK_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Wait until at most kPending committed wgmma groups of this warpgroup are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if QUICK_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// cp.async writes shared memory through the generic proxy, wgmma reads it through the async
// proxy: this fence (before the barrier that publishes a stage) orders the two.
__device__ __forceinline__ void fence_async_proxy_smem() {
#if QUICK_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Pins accumulator registers in place around wgmma issue and wait: the compiler may neither move
// their reads above the wgmma_wait that makes them valid nor copy them between a wgmma and its
// wait (ptxas would then serialise the wgmma pipeline, warning C7515).
template <int kN>
__device__ __forceinline__ void fence_registers(float (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Shared-memory descriptor of a K-major wgmma B operand with the 128-byte swizzle: rows of 128 B
// (64 fp16 of K), 8-row atoms of 1024 B in which 16-byte chunk c of row r sits at c ^ (r % 8) --
// exactly the activation tile's swizzled_chunk() order, so the same tile feeds ldmatrix (mma.sync
// tiles) and wgmma. Fields (PTX ISA, "Matrix Descriptor Format"): start address >> 4 (bits 0-13),
// leading byte offset >> 4 (16-29; unused for swizzled K-major tiles, 1 by convention), stride
// byte offset >> 4 (32-45: 1024 B between 8-row atoms), swizzle mode (62-63: 1 = 128 B). The
// swizzle is applied to absolute address bits, so the tile must sit on a 1024-byte boundary and a
// k16 step inside it is just +32 B on the start address.
__device__ __forceinline__ uint64_t sw128_kmajor_desc(uint32_t smem_addr) {
  return (uint64_t{1} << 62) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 16) |
         static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4);
}

// The wgmma instruction with A from registers (inline asm takes no loops, so every accumulator
// register is spelled out): QUICK_WGMMA_D32(o) binds d[o .. o + 31] as operands, and
// QUICK_WGMMA_R<o> names them %o .. %(o + 31) in the instruction text. N tokens take N / 2
// accumulators, i.e. N / 64 groups; the four A registers and the B descriptor follow them.
#define QUICK_WGMMA_D32(o) \
  "+f"(d[(o) + 0]), "+f"(d[(o) + 1]), "+f"(d[(o) + 2]), "+f"(d[(o) + 3]), "+f"(d[(o) + 4]), "+f"(d[(o) + 5]), \
  "+f"(d[(o) + 6]), "+f"(d[(o) + 7]), "+f"(d[(o) + 8]), "+f"(d[(o) + 9]), "+f"(d[(o) + 10]), "+f"(d[(o) + 11]), \
  "+f"(d[(o) + 12]), "+f"(d[(o) + 13]), "+f"(d[(o) + 14]), "+f"(d[(o) + 15]), "+f"(d[(o) + 16]), "+f"(d[(o) + 17]), \
  "+f"(d[(o) + 18]), "+f"(d[(o) + 19]), "+f"(d[(o) + 20]), "+f"(d[(o) + 21]), "+f"(d[(o) + 22]), "+f"(d[(o) + 23]), \
  "+f"(d[(o) + 24]), "+f"(d[(o) + 25]), "+f"(d[(o) + 26]), "+f"(d[(o) + 27]), "+f"(d[(o) + 28]), "+f"(d[(o) + 29]), \
  "+f"(d[(o) + 30]), "+f"(d[(o) + 31])
#define QUICK_WGMMA_R0 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define QUICK_WGMMA_R32 \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define QUICK_WGMMA_R64 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define QUICK_WGMMA_R96 \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
// SHAPE "m64n<N>k16", TYPE "f16" or "bf16", D_NAMES the accumulator names, AB_NAMES those of A and
// the descriptor, then the accumulator operand groups.
#define QUICK_WGMMA_RS(SHAPE, TYPE, D_NAMES, AB_NAMES, ...) \
  asm volatile("{\n" \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " {" D_NAMES "}, " AB_NAMES \
               ", 1, 1, 1, 0;\n" \
               "}\n" \
               : __VA_ARGS__ \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
#define QUICK_WGMMA_RS_N64(TYPE) \
  QUICK_WGMMA_RS("m64n64k16", TYPE, QUICK_WGMMA_R0, "{%32, %33, %34, %35}, %36", QUICK_WGMMA_D32(0))
#define QUICK_WGMMA_RS_N128(TYPE) \
  QUICK_WGMMA_RS("m64n128k16", TYPE, QUICK_WGMMA_R0 ", " QUICK_WGMMA_R32, "{%64, %65, %66, %67}, %68", \
                 QUICK_WGMMA_D32(0), QUICK_WGMMA_D32(32))
#define QUICK_WGMMA_RS_N192(TYPE) \
  QUICK_WGMMA_RS("m64n192k16", TYPE, QUICK_WGMMA_R0 ", " QUICK_WGMMA_R32 ", " QUICK_WGMMA_R64, \
                 "{%96, %97, %98, %99}, %100", QUICK_WGMMA_D32(0), QUICK_WGMMA_D32(32), QUICK_WGMMA_D32(64))
#define QUICK_WGMMA_RS_N256(TYPE) \
  QUICK_WGMMA_RS("m64n256k16", TYPE, QUICK_WGMMA_R0 ", " QUICK_WGMMA_R32 ", " QUICK_WGMMA_R64 ", " QUICK_WGMMA_R96, \
                 "{%128, %129, %130, %131}, %132", QUICK_WGMMA_D32(0), QUICK_WGMMA_D32(32), QUICK_WGMMA_D32(64), \
                 QUICK_WGMMA_D32(96))

// D[64 x N] += A[64 x 16] * B[16 x N] for N = 64, 128, 192 or 256 tokens, fp16 or bf16 in, fp32
// accumulate; A from registers (each warp of the warpgroup holds 16 rows in the mma.m16n8k16
// A-fragment layout), B from shared memory. D: warp w, lane l holds rows 16 w + l / 4 (+ 8 for
// d[4 i + 2], d[4 i + 3]) and columns 8 i + 2 (l % 4) + {0, 1}.
template <typename T, int kN>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc_b) {
  static_assert(kN == 64 || kN == 128 || kN == 192 || kN == 256, "wgmma tiles use 64, 128, 192 or 256 tokens");
#if QUICK_WGMMA
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (kN == 64 && kHalf) {
    QUICK_WGMMA_RS_N64("f16");
  } else if constexpr (kN == 64) {
    QUICK_WGMMA_RS_N64("bf16");
  } else if constexpr (kN == 128 && kHalf) {
    QUICK_WGMMA_RS_N128("f16");
  } else if constexpr (kN == 128) {
    QUICK_WGMMA_RS_N128("bf16");
  } else if constexpr (kN == 192 && kHalf) {
    QUICK_WGMMA_RS_N192("f16");
  } else if constexpr (kN == 192) {
    QUICK_WGMMA_RS_N192("bf16");
  } else if constexpr (kHalf) {
    QUICK_WGMMA_RS_N256("f16");
  } else {
    QUICK_WGMMA_RS_N256("bf16");
  }
#else
  __trap();
#endif
}
#undef QUICK_WGMMA_RS_N64
#undef QUICK_WGMMA_RS_N128
#undef QUICK_WGMMA_RS_N192
#undef QUICK_WGMMA_RS_N256
#undef QUICK_WGMMA_RS
#undef QUICK_WGMMA_R0
#undef QUICK_WGMMA_R32
#undef QUICK_WGMMA_R64
#undef QUICK_WGMMA_R96
#undef QUICK_WGMMA_D32

// wgmma tiles (w64, w128, w128n, w64x). The product is computed transposed, y^T = W^T x^T:
// weights are wgmma's A operand, from registers, and the block's tokens its N, from the shared
// activation tile. A lane's 16 weight bytes are a 16 (k) x 64 (n) tile as eight n8 B fragments
// (dequant_tile), and word j of them, n rows 16 j .. 16 j + 15, is exactly one A fragment of the
// transposed tile (mma.m16n8k16 A layout, g = lane / 4):
//   a0a1 = (row g, k 2 (lane % 4) + {0, 1})  = block 2j   (b0, b1)   pair 0 of word j
//   a2a3 = (row g + 8, same k)               = block 2j+1 (b0, b1)   pair 2
//   a4a5 = (row g, k + 8)                    = block 2j   (b2, b3)   pair 1
//   a6a7 = (row g + 8, k + 8)                = block 2j+1 (b2, b3)   pair 3
// A wgmma's 64-row A is four such fragments, one per warp of the warpgroup, so nothing moves
// between warps and the interleaved layout is the mma.sync one. Two ways to cut a k-step:
//   kWords = 4 (w64, w128): every warp takes all four words of its own 64-column tile, and
//     wgmma j (j = 0..3) takes word j of every warp: 4 x m64n64k16, 64 tokens per warpgroup.
//   kWords = 2 (w128n, w64x): warp r of warpgroup g takes words 2 (r % 2), +1 of tile 2 g + r / 2
//     (8 of its 16 bytes: a 2-way bank conflict on that load), and wgmma j (j = 0, 1) takes the
//     warp's word j, over all of the block's tokens (2 x m64n128k16 for w128n). Each weight then
//     serves 128 tokens: half the dequantisation per FLOP of kWords = 4.
//   kWords = 1 (the ws tiles: quick_gemm_ws.cuh): warp r of a warpgroup takes word r of the
//     warpgroup's own 64-column tile, one m64nTk16 per k-step over all T tokens of the block;
//     kWords = 2 there too (ws64w / ws128w: w128n's split of the words, one m64nTk16 per word).
// Scaled tiles put (q - z) * s (fp16) into A; the exact tile w64x (fp16 and bf16) puts q - z
// there, sums each group in a second accumulator set and adds group sum x scale in fp32, like the
// x tiles of mma.sync (two sets of 2 x 32 floats: why it has 64 tokens, not 128).

// The zero half of unpack_word_params: biased zeros (and, kLean, the 16x-magic negated zeros)
// of the warp's kWords words from its zero word.
template <typename T, int kWords, bool kLean>
__device__ __forceinline__ void unpack_word_zeros(uint32_t zero_word, int first_word, uint32_t (&biased_zero)[2 * kWords],
                                                  uint32_t (&neg_zero16)[2 * kWords]) {
  const uint32_t zw = zero_word >> (4 * first_word);
#pragma unroll
  for (int m = 0; m < kWords; ++m) {
    const uint32_t pair = and_or(zw >> (4 * m), 0x000f000fu, Act<T>::kMagic);
    biased_zero[2 * m] = __byte_perm(pair, 0, 0x1010);
    biased_zero[2 * m + 1] = __byte_perm(pair, 0, 0x3232);
    if constexpr (kLean) {
      const uint32_t moved = m == 0 ? zw << 4 : zw >> (4 * m - 4);
      const uint32_t neg = and_or(moved, 0x00f000f0u, kNegSixtyFourPair);
      neg_zero16[2 * m] = __byte_perm(neg, 0, 0x1010);
      neg_zero16[2 * m + 1] = __byte_perm(neg, 0, 0x3232);
    }
  }
}

// The scale of a lane's A rows sits in the low (even g = lane / 4) or high (odd g) half of its
// scale word: both halves of the returned pair hold it.
__device__ __forceinline__ uint32_t lane_scale_pair(uint32_t scale_word, int lane) {
  return __byte_perm(scale_word, 0, ((lane / 4) & 1) ? 0x3232u : 0x1010u);
}

// The scale of such a pair as one fp32 value (the mma.sync ws tiles scale each group's sum in fp32).
__device__ __forceinline__ float scale_pair_to_float(uint32_t scale_pair) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(scale_pair)));
}

// Zeros and scales of the warp's kWords words (first_word on), for dequant_a_fragments: the
// zero word pre-shifted by 4 first_word has the warp's blocks in its pairs 0..kWords-1
// (layout.py, ZERO_NIBBLE_BLOCK: pair m = nibbles m, m + 4 = blocks 2m, 2m + 1); the scales of
// block b sit in word b of the 32 B at 16 (g / 2) (load_fragment_scales), and that scale is
// the one of this lane's A rows (n = 16 j + g and + 8) of the blocks 2 j and 2 j + 1.
template <typename T, int kWords, bool kLean>
__device__ __forceinline__ void unpack_word_params(uint32_t zero_word, const __half* tile_scales, int lane,
                                                   int first_word, uint32_t (&biased_zero)[2 * kWords],
                                                   uint32_t (&neg_zero16)[2 * kWords], uint32_t (&scale)[2 * kWords]) {
  unpack_word_zeros<T, kWords, kLean>(zero_word, first_word, biased_zero, neg_zero16);
  const int g = lane / 4;
  if constexpr (kWords == 1) {  // words 2 first_word, +1 of the 32 B: one 8-byte load
    const uint2 v = reinterpret_cast<const uint2*>(tile_scales + 16 * (g / 2))[first_word];
    scale[0] = lane_scale_pair(v.x, lane);
    scale[1] = lane_scale_pair(v.y, lane);
  } else {
    const uint4* src = reinterpret_cast<const uint4*>(tile_scales + 16 * (g / 2)) + first_word / 2;
#pragma unroll
    for (int q = 0; q < kWords / 2; ++q) {
      const uint4 v = src[q];
      scale[4 * q] = lane_scale_pair(v.x, lane);
      scale[4 * q + 1] = lane_scale_pair(v.y, lane);
      scale[4 * q + 2] = lane_scale_pair(v.z, lane);
      scale[4 * q + 3] = lane_scale_pair(v.w, lane);
    }
  }
}

// kWords weight words -> wgmma A fragments: (q - z) * s (kScaled, fp16) or the exact q - z.
// Lean (fp16): pairs 0 / 2 by the 1024 magic, pairs 1 / 3 by the 16x magic on the unshifted byte,
// one shift (>> 8) per word (dequant_tile). Otherwise pair m of word >> 4 m by T's magic.
template <typename T, int kWords, bool kScaled, bool kLean>
__device__ __forceinline__ void dequant_a_fragments(const uint32_t (&w)[kWords], const uint32_t (&biased_zero)[2 * kWords],
                                                    const uint32_t (&neg_zero16)[2 * kWords],
                                                    const uint32_t (&scale)[2 * kWords], uint32_t (&a)[kWords][4]) {
  static_assert(!(kScaled || kLean) || std::is_same_v<T, __half>, "scaled and lean fragments are fp16 only");
  using A = Act<T>;
#pragma unroll
  for (int j = 0; j < kWords; ++j) {
    uint32_t p[4];  // pair m: nibbles (m, m + 4); blocks 2j (m = 0, 1) and 2j + 1 (m = 2, 3)
    if constexpr (kLean) {
      const uint32_t lo = w[j], hi = w[j] >> 8;
      p[0] = A::sub2(and_or(lo, 0x000f000fu, A::kMagic), biased_zero[2 * j]);
      p[1] = Act<__half>::fma2(and_or(lo, 0x00f000f0u, A::kMagic), kSixteenthPair, neg_zero16[2 * j]);
      p[2] = A::sub2(and_or(hi, 0x000f000fu, A::kMagic), biased_zero[2 * j + 1]);
      p[3] = Act<__half>::fma2(and_or(hi, 0x00f000f0u, A::kMagic), kSixteenthPair, neg_zero16[2 * j + 1]);
    } else {
#pragma unroll
      for (int m = 0; m < 4; ++m)
        p[m] = A::sub2(and_or(w[j] >> (4 * m), 0x000f000fu, A::kMagic), biased_zero[2 * j + m / 2]);
    }
    if constexpr (kScaled) {
#pragma unroll
      for (int m = 0; m < 4; ++m) p[m] = Act<__half>::mul2(p[m], scale[2 * j + m / 2]);
    }
    a[j][0] = p[0];
    a[j][1] = p[2];
    a[j][2] = p[1];
    a[j][3] = p[3];
  }
}

// One k-step: the wgmmas of the warpgroup on this k16 of B (desc_b) into acc, then wait for the
// previous k-step. acc is one of the kernel's [kRows][8][4] accumulator arrays, seen as kWords
// wgmma D operands of kTokens / 2 floats: D element d[4 i + e] of lane l of warp w is row
// 16 w + l / 4 (+ 8 for e >= 2) of the A operand, token 8 i + 2 (l % 4) + e % 2.
template <typename T, int kWords, int kTokens, int kRows>
__device__ __forceinline__ void wgmma_step(float (&acc)[kRows][8][4], const uint32_t (&a)[kWords][4], uint64_t desc_b) {
  static_assert(kRows * 32 == kWords * kTokens / 2, "accumulator size");
  auto& d = reinterpret_cast<float(&)[kWords][kTokens / 2]>(acc);
#pragma unroll
  for (int j = 0; j < kWords; ++j) fence_registers(d[j]);
  wgmma_fence();
#pragma unroll
  for (int j = 0; j < kWords; ++j) wgmma_rs<T, kTokens>(d[j], a[j], desc_b);
  wgmma_commit();
#pragma unroll
  for (int j = 0; j < kWords; ++j) fence_registers(d[j]);
  // This k-step's group may keep running while the next one is dequantised; the group before it
  // is finished, so its A registers and the shared-memory stage it read are free again.
  wgmma_wait<1>();
}

}  // namespace
}  // namespace quick
