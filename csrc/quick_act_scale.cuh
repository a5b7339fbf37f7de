// The power of two that moves bf16 activations into fp16 exactly, shared by the scaling kernels
// (quick_act_scale.cu) and the tiles that undo it in their epilogue (quick_gemm_ws.cuh). Python's
// counterpart for the cuBLAS paths is ops.fp16_product_for_bf16 (FP16_TOP_EXPONENT there).
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

}  // namespace quick
