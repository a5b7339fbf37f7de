// Dequantisation of the interleaved layout (vllm_quick/layout.py) straight into mma.sync B
// fragments: zeros, the 1024 and "16x" magic numbers, scales in fragment order. Included by
// csrc/quick_gemm.cu.
#pragma once

#include "quick_ptx.cuh"

namespace quick {
namespace {

// ------------------------------------------------------------------------------------------
// Dequantisation: nibbles -> B fragments, no shared-memory round trip
// ------------------------------------------------------------------------------------------
// A zero word (layout.py, "Interleaved zeros") -> per n8 block nb, the 2-vector (M + z, M + z)
// with M the magic value. Pair m = nibbles (m, m + 4) = blocks (2m, 2m + 1); byte_perm 0x1010 /
// 0x3232 broadcasts the low / high 16 bits to both halves.
template <typename T>
__device__ __forceinline__ void unpack_zeros(uint32_t zero_word, uint32_t (&biased_zero)[8]) {
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const uint32_t pair = and_or(zero_word >> (4 * m), 0x000f000fu, Act<T>::kMagic);
    biased_zero[2 * m] = __byte_perm(pair, 0, 0x1010);
    biased_zero[2 * m + 1] = __byte_perm(pair, 0, 0x3232);
  }
}

// "16x magic" (lean tiles, fp16 only). The odd nibbles of a pair sit at bits 4-7 / 20-23 of a
// word, or of the word shifted by 8: OR-ed into 0x6400 without shifting them down they give
// 1024 + 16 q exactly (fp16 has ulp 1 in [1024, 2048)), and fma(1024 + 16 q, 1/16, -(64 + z)) =
// q - z exactly (the product 64 + q and the sum are exact). So a word needs one shift (>> 8)
// instead of three (>> 4, >> 8, >> 12), at the price of a second zero vector -(64 + z).
// -(64 + z) in fp16: sign 1, exponent of 64 (0xD400), mantissa z / 64 * 1024 = 16 z, i.e. the
// zero nibble at bits 4-7 -- the same mask as the weights.
constexpr uint32_t kSixteenthPair = 0x2C002C00u;  // (1/16, 1/16) in fp16
constexpr uint32_t kNegSixtyFourPair = 0xD400D400u;  // (-64, -64) in fp16

__device__ __forceinline__ void unpack_neg_zeros16(uint32_t zero_word, uint32_t (&neg_zero16)[8]) {
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    // Nibble pair m of the zero word moved to bits 4-7 / 20-23 (a left shift for m = 0).
    const uint32_t moved = m == 0 ? zero_word << 4 : zero_word >> (4 * m - 4);
    const uint32_t pair = and_or(moved, 0x00f000f0u, kNegSixtyFourPair);
    neg_zero16[2 * m] = __byte_perm(pair, 0, 0x1010);
    neg_zero16[2 * m + 1] = __byte_perm(pair, 0, 0x3232);
  }
}

// One lane's 16 weight bytes of a 16 x 64 tile -> B fragments of the 8 n8 blocks. Word j, pair
// m = nibbles (m, m + 4):
//   m = 0 -> block 2j (b0, b1);   m = 1 -> block 2j (b2, b3);
//   m = 2 -> block 2j+1 (b0, b1); m = 3 -> block 2j+1 (b2, b3)        (layout.py)
// Exact tiles (kScaled = false): the fragments hold the exact integers q - z.
// Scaled tiles (fp16 only): they hold (q - z) * s rounded to fp16, so one accumulator set
// suffices and no per-group flush is needed (32-64 registers fewer, which buys 64-row warp
// tiles); q - z stays exact and the product costs one fp16 rounding per weight (~2^-12
// relative). bf16 keeps the exact tiles: the same rounding there (2^-9) would exceed the budget.
// Lean tiles (kLean, scaled fp16 only): odd pairs through the 16x magic above.
template <typename T, bool kScaled, bool kLean>
__device__ __forceinline__ void dequant_tile(const uint4& words, const uint32_t (&biased_zero)[8],
                                             const uint32_t (&neg_zero16)[8], const uint32_t (&scale)[8],
                                             uint32_t (&frag)[8][2]) {
  const uint32_t w[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int block = 2 * j + (m >> 1);
      uint32_t q_minus_z;
      if constexpr (kLean) {
        const uint32_t src = m < 2 ? w[j] : w[j] >> 8;  // pairs (0, 1) low byte, (2, 3) next byte
        if (m & 1) {
          const uint32_t biased16 = and_or(src, 0x00f000f0u, Act<T>::kMagic);  // 1024 + 16 q
          q_minus_z = Act<__half>::fma2(biased16, kSixteenthPair, neg_zero16[block]);
        } else {
          q_minus_z = Act<T>::sub2(and_or(src, 0x000f000fu, Act<T>::kMagic), biased_zero[block]);
        }
      } else {
        const uint32_t biased = and_or(w[j] >> (4 * m), 0x000f000fu, Act<T>::kMagic);
        q_minus_z = Act<T>::sub2(biased, biased_zero[block]);  // (M + q) - (M + z), exact
      }
      if constexpr (kScaled)
        frag[block][m & 1] = Act<__half>::mul2(q_minus_z, scale[block]);
      else
        frag[block][m & 1] = q_minus_z;
    }
  }
}

// Scales for the scaled tiles, in B-fragment order: the lane's B column in n8 block nb is
// 8 nb + g (g = lane / 4), while the stored order is the accumulator's (layout.py: position
// 16 a + 2 nb + e holds column 8 nb + 2 a + e). So column 8 nb + g sits at 16 (g / 2) + 2 nb +
// g % 2: the low (g even) or high (g odd) half of word nb of the 32 bytes at 16 (g / 2).
// byte_perm 0x1010 / 0x3232 broadcasts that half to both halves of the fragment multiplier.
__device__ __forceinline__ void load_fragment_scales(const __half* tile_scales, int lane, uint32_t (&scale)[8]) {
  const int g = lane / 4;
  const uint4* src = reinterpret_cast<const uint4*>(tile_scales + 16 * (g / 2));
  const uint4 lo = src[0], hi = src[1];
  const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  const uint32_t select = (g & 1) ? 0x3232u : 0x1010u;
#pragma unroll
  for (int nb = 0; nb < 8; ++nb) scale[nb] = __byte_perm(w[nb], 0, select);
}

}  // namespace
}  // namespace quick
