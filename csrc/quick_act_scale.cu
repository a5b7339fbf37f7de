// bf16 activations into fp16 for the tiles that only read fp16 (the ws tiles, s16m, s32m; quick_gemm.h,
// tile_takes_fp16_activations): per row, max|x| of the row, then x16 = x * 2^e_row, exact (a bf16
// significand fits fp16's; 2^e_row from fp16_shift_of_bf16). The tile writes y * 2^-e_row in bf16
// from its fp32 accumulators, so only x has to fit fp16 (ops.fp16_product_for_bf16, the cuBLAS
// version, also bounds an fp16 output). One kernel, one block per row, 16-byte loads.
//
// (Session 9's version scaled the whole input by one power of two: a memset, a grid-wide max
// with atomics, then a second kernel -- three launches in a row before every ws GEMM, and a row
// of small values could lose bits to fp16's subnormals beside a row of large ones.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "quick_act_scale.cuh"
#include "quick_gemm.h"

namespace quick {
namespace {

constexpr int kThreads = 128;  // per row: K = 4096 is 512 chunks of 8 values, 4 per thread

// |v| of one bf16 as bits, inf and NaN as 0: with the sign bit cleared, finite bf16 bit
// patterns order like their values, so an integer max is the float max. Leaving inf and NaN out
// keeps the other values exact (they stay inf / NaN themselves: inf * 2^e = inf).
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

// Two bf16 (one word) times 2^e into two fp16: each bf16 is the top half of an fp32, the product
// is exact in fp32 and, in range by the choice of e, exact in fp16 (values below 2^-14 become fp16
// subnormals: ~2^-28 of the row's max|x| and less).
__device__ __forceinline__ uint32_t scale_pair(uint32_t w, float scale) {
  const float lo = __uint_as_float(w << 16) * scale, hi = __uint_as_float(w & 0xffff0000u) * scale;
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Block r: row r. Pass 1 finds the row's max|x| (warp max, then the block's through shared
// memory), pass 2 reads the row again (from L1 / L2: a row is at most a few tens of KB) and
// writes x * 2^e.
__global__ void __launch_bounds__(kThreads) row_to_fp16_kernel(const uint4* __restrict__ x, uint4* __restrict__ x16,
                                                               int row_chunks, unsigned* __restrict__ row_abs_max) {
  const size_t base = static_cast<size_t>(blockIdx.x) * row_chunks;
  uint32_t m = 0;
  for (int i = threadIdx.x; i < row_chunks; i += kThreads) m = max(m, abs_max_bits8(__ldg(x + base + i)));
  m = __reduce_max_sync(0xffffffffu, m);
  __shared__ uint32_t warp_max[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) m = max(m, warp_max[w]);
  if (threadIdx.x == 0) row_abs_max[blockIdx.x] = m;
  const float scale = __uint_as_float(pow2_bits(fp16_shift_of_bf16(m)));
  for (int i = threadIdx.x; i < row_chunks; i += kThreads) {
    const uint4 v = __ldg(x + base + i);
    x16[base + i] = make_uint4(scale_pair(v.x, scale), scale_pair(v.y, scale), scale_pair(v.z, scale),
                               scale_pair(v.w, scale));
  }
}

}  // namespace

cudaError_t scale_bf16_to_fp16(const Fp16ActArgs& a, cudaStream_t stream) {
  if (a.rows <= 0) return cudaSuccess;
  row_to_fp16_kernel<<<a.rows, kThreads, 0, stream>>>(static_cast<const uint4*>(a.x), static_cast<uint4*>(a.x16),
                                                      a.cols / 8, a.row_abs_max);
  return cudaGetLastError();
}

}  // namespace quick
