// bf16 activations into fp16 without rounding, for the ws tiles (whose fragments are fp16): a
// bf16 significand (8 bits) fits fp16's 11, only the exponent range differs, so x is multiplied
// by the power of two 2^e that puts max|x| in [2^14, 2^15). max|x| comes from a kernel before the
// GEMM (quick_act_scale.cu); the ws producer converts each activation stage in shared memory
// (scale_bf16_chunk) and the consumers multiply the fp32 accumulators by 2^-e before the bf16
// output. Python's counterpart for the cuBLAS paths is ops.fp16_product_for_bf16.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define QUICK_SHIFT_HD __host__ __device__ __forceinline__
#else
#define QUICK_SHIFT_HD inline
#endif

namespace quick {

// |e| stays within 113 so that 2^e and 2^-e are both normal fp32 numbers (exponent bits 14..240).
constexpr int kMaxFp16Shift = 113;

// e such that max|x| * 2^e lies in [2^14, 2^15), from the bf16 bits of the largest finite |x|
// (sign cleared). bf16 exponent field E (bits 7..14): a normal value lies in
// [2^(E-127), 2^(E-126)), so e = 14 - (E - 127) = 141 - E. Zero gives 0 (and so would inf or NaN,
// which the max leaves out); subnormal maxima count as E = 1 and tiny ones stop at 2^113.
QUICK_SHIFT_HD int fp16_shift_of_bf16(uint32_t abs_max_bits) {
  const int e_field = static_cast<int>(abs_max_bits >> 7) & 0xff;
  if (abs_max_bits == 0 || e_field == 0xff) return 0;
  const int shift = 141 - (e_field == 0 ? 1 : e_field);
  return shift > kMaxFp16Shift ? kMaxFp16Shift : shift;
}

// 2^e as an fp32 bit pattern, for |e| <= kMaxFp16Shift (exact: no exp2f rounding).
QUICK_SHIFT_HD uint32_t pow2_bits(int e) { return static_cast<uint32_t>(127 + e) << 23; }

#ifdef __CUDACC__
// Two bf16 (one word) times 2^e into two fp16: each bf16 is the top half of an fp32, the product
// is exact in fp32 and, in range by the choice of e, exact in fp16 (values below 2^-14 become fp16
// subnormals: ~2^-28 of max|x| and less). inf and NaN stay inf and NaN.
__device__ __forceinline__ uint32_t scale_bf16_pair(uint32_t w, float scale) {
  const float lo = __uint_as_float(w << 16) * scale, hi = __uint_as_float(w & 0xffff0000u) * scale;
  uint32_t h;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(h) : "f"(hi), "f"(lo));
  return h;
}

// Eight bf16 (16 bytes) into eight fp16, in place of each other.
__device__ __forceinline__ uint4 scale_bf16_chunk(uint4 v, float scale) {
  return make_uint4(scale_bf16_pair(v.x, scale), scale_bf16_pair(v.y, scale), scale_bf16_pair(v.z, scale),
                    scale_bf16_pair(v.w, scale));
}
#endif

}  // namespace quick
