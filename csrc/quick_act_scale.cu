// max|x| of bf16 activations, for the tiles that move them into fp16 themselves (ws256;
// quick_gemm.h, tile_scales_bf16_activations): one streaming kernel over x with 16-byte loads
// and one 4-byte atomicMax per warp. The scale it sets: quick_act_scale.cuh.
#include <cuda_bf16.h>

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

}  // namespace

cudaError_t bf16_abs_max(const void* x, size_t count, unsigned* abs_max, cudaStream_t stream) {
  const size_t chunks = count / 8;
  const int blocks = static_cast<int>(chunks / kThreads + 1 < kMaxBlocks ? chunks / kThreads + 1 : kMaxBlocks);
  const cudaError_t err = cudaMemsetAsync(abs_max, 0, sizeof(unsigned), stream);
  if (err != cudaSuccess) return err;
  abs_max_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint4*>(x), chunks, abs_max);
  return cudaGetLastError();
}

}  // namespace quick
