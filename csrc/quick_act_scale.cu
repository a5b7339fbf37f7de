// bf16 activations into fp16 for the tiles that only read fp16 (ws256; quick_gemm.h,
// tile_takes_fp16_activations): max|x| over the whole input, then x16 = x * 2^e, exact (a bf16
// significand fits fp16's; 2^e from fp16_shift_of_bf16). The tile writes y * 2^-e in bf16 from
// its fp32 accumulators, so only x has to fit fp16 (ops.fp16_product_for_bf16, the cuBLAS
// version, also bounds an fp16 output). Both kernels stream x with 16-byte loads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "quick_act_scale.cuh"
#include "quick_gemm.h"

namespace quick {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 132 * 8;  // a few waves on the largest GPU: a grid-stride loop does the rest

// |v| of one bf16 as bits, inf and NaN as 0: with the sign bit cleared, finite bf16 bit
// patterns order like their values, so an integer max is the float max. Leaving inf and NaN out
// keeps the other rows exact (they stay inf / NaN themselves: inf * 2^e = inf).
__device__ __forceinline__ uint32_t finite_abs_bits(uint32_t h) {
  h &= 0x7fffu;
  return h < 0x7f80u ? h : 0u;
}

__device__ __forceinline__ uint32_t abs_max_bits8(uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) m = max(m, max(finite_abs_bits(w[i]), finite_abs_bits(w[i] >> 16)));
  return m;
}

__global__ void __launch_bounds__(kThreads) abs_max_kernel(const uint4* __restrict__ x, size_t chunks,
                                                           unsigned* __restrict__ abs_max) {
  uint32_t m = 0;
  for (size_t i = blockIdx.x * size_t{kThreads} + threadIdx.x; i < chunks; i += size_t{gridDim.x} * kThreads)
    m = max(m, abs_max_bits8(__ldg(x + i)));
  m = __reduce_max_sync(0xffffffffu, m);
  if (threadIdx.x % 32 == 0 && m != 0) atomicMax(abs_max, m);
}

// Two bf16 (one word) times 2^e into two fp16: each bf16 is the top half of an fp32, the product
// is exact in fp32 and, in range by the choice of e, exact in fp16 (values below 2^-14 become fp16
// subnormals: ~2^-28 of max|x| and less).
__device__ __forceinline__ uint32_t scale_pair(uint32_t w, float scale) {
  const float lo = __uint_as_float(w << 16) * scale, hi = __uint_as_float(w & 0xffff0000u) * scale;
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__global__ void __launch_bounds__(kThreads) to_fp16_kernel(const uint4* __restrict__ x, uint4* __restrict__ x16,
                                                           size_t chunks, const unsigned* __restrict__ abs_max) {
  const float scale = __uint_as_float(pow2_bits(fp16_shift_of_bf16(*abs_max)));
  for (size_t i = blockIdx.x * size_t{kThreads} + threadIdx.x; i < chunks; i += size_t{gridDim.x} * kThreads) {
    const uint4 v = __ldg(x + i);
    x16[i] = make_uint4(scale_pair(v.x, scale), scale_pair(v.y, scale), scale_pair(v.z, scale),
                        scale_pair(v.w, scale));
  }
}

}  // namespace

cudaError_t scale_bf16_to_fp16(const Fp16ActArgs& a, cudaStream_t stream) {
  const size_t chunks = a.count / 8;
  const int blocks = static_cast<int>(chunks / kThreads + 1 < kMaxBlocks ? chunks / kThreads + 1 : kMaxBlocks);
  cudaError_t err = cudaMemsetAsync(a.abs_max, 0, sizeof(unsigned), stream);
  if (err != cudaSuccess) return err;
  abs_max_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint4*>(a.x), chunks, a.abs_max);
  to_fp16_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint4*>(a.x), static_cast<uint4*>(a.x16),
                                                 chunks, a.abs_max);
  return cudaGetLastError();
}

}  // namespace quick
