// Dequantise the interleaved layout into a dense row-major [k, n] matrix, for large M where one
// dequantisation followed by cuBLAS beats re-dequantising inside every output tile (see
// vllm_quick/dispatch.py for the measured switch-over). Same nibble/zero/scale conventions as
// quick_gemm.cu (documented in vllm_quick/layout.py); scales are applied in fp32 and rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "quick_gemm.h"
#include "quick_layout.cuh"
#include "quick_ptx.cuh"

namespace quick {
namespace {

constexpr int kTilesPerBlock = 8;                  // 8 warps, one 16 x 64 tile each
constexpr int kRowPad = 8;                         // halves of padding per smem row: keeps the
                                                   // 16 rows of a tile off the same banks
constexpr int kSmemRow = kTilesPerBlock * kTileN + kRowPad;

// Block (kt, group of 8 n-tiles): each warp unpacks its tile into shared memory at the natural
// (k, n) position, then the block writes 16 rows x 512 columns with 16-byte coalesced stores.
template <typename T>
__global__ void __launch_bounds__(256) dequant_kernel(const uint4* __restrict__ qweight,
                                                     const uint32_t* __restrict__ qzeros,
                                                     const __half* __restrict__ scales, T* __restrict__ out,
                                                     int k, int n, int group_size) {
  __shared__ __align__(16) T tile[kTileK][kSmemRow];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n_tiles = n / kTileN;
  const int kt = blockIdx.y;
  const int nt = blockIdx.x * kTilesPerBlock + warp;
  const int group = kt * kTileK / group_size;
  if (nt < n_tiles) {
    const uint4 words = qweight[(static_cast<size_t>(kt) * n_tiles + nt) * 32 + lane];
    const uint32_t zero_word = qzeros[static_cast<size_t>(group) * (n / 8) + nt * 8 + lane / 4];
    const __half* tile_scales = scales + static_cast<size_t>(group) * n + nt * kTileN;
    const uint32_t w[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int kl = weight_nibble_k(lane, i), nl = weight_nibble_n(lane, j, i);
        const int block = nl / 8;
        // zero of block `block`: the nibble i' with zero_nibble_block(i') == block
        const int zi = (block % 2) * 4 + block / 2;
        const int q = (w[j] >> (4 * i)) & 0xf, z = (zero_word >> (4 * zi)) & 0xf;
        // scale of column nl: position 16 a + 2 nb + e with nl = 8 nb + 2 a + e
        const float s = __half2float(tile_scales[16 * ((nl % 8) / 2) + 2 * block + nl % 2]);
        tile[kl][warp * kTileN + nl] = Act<T>::from_float(static_cast<float>(q - z) * s);
      }
  }
  __syncthreads();
  const int cols = min(kTilesPerBlock, n_tiles - blockIdx.x * kTilesPerBlock) * kTileN;
  for (int c = threadIdx.x; c < kTileK * cols / 8; c += blockDim.x) {
    const int row = c / (cols / 8), chunk = c % (cols / 8);
    *reinterpret_cast<uint4*>(out + static_cast<size_t>(kt * kTileK + row) * n +
                              blockIdx.x * kTilesPerBlock * kTileN + chunk * 8) =
        *reinterpret_cast<const uint4*>(&tile[row][chunk * 8]);
  }
}

}  // namespace

cudaError_t dequantize(const DequantArgs& a, cudaStream_t stream) {
  const dim3 grid((a.n / kTileN + kTilesPerBlock - 1) / kTilesPerBlock, a.k / kTileK);
  if (a.act == ActType::kBFloat16) {
    dequant_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(
        static_cast<const uint4*>(a.qweight), static_cast<const uint32_t*>(a.qzeros),
        static_cast<const __half*>(a.scales), static_cast<__nv_bfloat16*>(a.out), a.k, a.n, a.group_size);
  } else {
    dequant_kernel<__half><<<grid, 256, 0, stream>>>(
        static_cast<const uint4*>(a.qweight), static_cast<const uint32_t*>(a.qzeros),
        static_cast<const __half*>(a.scales), static_cast<__half*>(a.out), a.k, a.n, a.group_size);
  }
  return cudaGetLastError();
}

}  // namespace quick
