// The QUICK interleaved layout, CUDA side. The full description, with a worked example, is the
// docstring of vllm_quick/layout.py; every constant and formula here must match that file, and
// tests/test_layout.py compiles this header on the host and compares the tables it prints with
// the Python ones.
#pragma once

#ifdef __CUDACC__
#define QUICK_HD __host__ __device__ __forceinline__
#else
#define QUICK_HD inline
#endif

namespace quick {

// Must match LAYOUT_VERSION in vllm_quick/layout.py.
constexpr int kLayoutVersion = 1;
// One weight tile: one mma.m16n8k16 k-step by eight n8 blocks (TILE_K, TILE_N in layout.py).
constexpr int kTileK = 16;
constexpr int kTileN = 64;
// 32 lanes x 4 int32 words (16 bytes each): WORDS_PER_TILE in layout.py.
constexpr int kWordsPerTile = kTileK * kTileN / 8;

// Weight word j (0..3) of lane t, nibble i (0..7): which tile element it holds.
QUICK_HD int weight_nibble_k(int lane, int i) { return 2 * (lane % 4) + i / 4 + 8 * (i % 2); }
QUICK_HD int weight_nibble_n(int lane, int j, int i) { return 8 * (2 * j + (i / 2) % 2) + lane / 4; }

// Scales: position p of a 64-column tile holds column scale_column(p) (scale_tile_source()).
QUICK_HD int scale_column(int p) { return 8 * ((p % 16) / 2) + 2 * (p / 16) + p % 2; }

// Zeros: nibble i of zero word r holds block zero_nibble_block(i), column r in it
// (ZERO_NIBBLE_BLOCK in layout.py).
QUICK_HD int zero_nibble_block(int i) { return 2 * (i % 4) + i / 4; }

}  // namespace quick
