// How the ws tiles (quick_gemm_ws.cuh) cut a call into thread blocks: whole output tiles first,
// then the tiles of the last, partial wave split along K, so that the tail wave takes 1/splits of
// a tile's time instead of a whole one (a stream-K-like tail without persistent blocks). Host and
// device code: plan() in quick_gemm.cu picks the split, the kernel maps its block index with
// ws_block_work, and tests/test_tail_split.py runs both on the host.
//
// Tiles are numbered row block by row block (tile = row block * grid_n + column block, so
// neighbouring blocks share x's rows). Blocks [0, dp_blocks) take tiles [0, dp_blocks) whole
// ("data parallel"); block dp_blocks + t * splits + s takes K range s of tile dp_blocks + t. A
// split block writes its fp32 partial tile to slot t * splits + s of the workspace and the last
// split of tile t to finish sums them (reduce_split_tile, counter t). The workspace is
// tail_tiles x splits fp32 tiles: fewer than the GPU's blocks x 8 tiles (ws256: 132 x 8 x 128 KB
// at most; 4 splits of a 28-tile tail, as on 13824 x 5120 at M = 1024, take 14 MB).
#pragma once

#ifdef __CUDACC__
#define QUICK_SPLIT_HD __host__ __device__ __forceinline__
#else
#define QUICK_SPLIT_HD inline
#endif

namespace quick {

struct TailSplit {
  int splits;            // K ranges per tail tile (1: no tail, every tile whole)
  int stages_per_split;  // 64-row stages per K range (all of K when splits == 1)
  int dp_blocks;         // blocks (= tiles) computed whole
  int tail_tiles;        // tiles computed as `splits` K ranges
  int blocks;            // dp_blocks + tail_tiles * splits
};

// The estimated time, in us, of `tiles` output tiles on `sms` SMs (one block each) when the tail
// wave's `tail` tiles are split s ways:
//   tile_us * (whole waves + ceil(tail s / sms) / s)   the waves of whole and of 1/s tiles
//   + tail s tile_bytes 2 / kGpuBytesPerUs             the partial tiles written and read back
//   + s tile_bytes / kSmBytesPerUs                      the last split's reduction, on one SM
// tile_us is a tile's K loop at kSmFlopsPerUs (ws256 at M = 256-4096 on the H100: ~5.5 TFLOP/s
// per SM, benchmarks/KERNEL_NOTES.md session 10). E.g. 13824 x 5120 at M = 1024: 160 tiles of
// 256 x 128 on 132 SMs, a second wave of 28 tiles (2 x 165 us) -> 28 x 4 quarter tiles (165 + 41
// + 14 us). At M = 256 on 4096 x 12288 (96 tiles of 49 us) no split pays: 4 would move 100 MB.
// Checked on an H200 (session 10, splits 1/2/3/4/8 forced on the 12 benchmark shapes at M = 256
// .. 4096): the estimate's pick was within 0.2-0.4% (geomean) of the fastest forced split, and
// the constants move that by less than the run-to-run noise.
inline double tail_split_cost_us(int tiles, int sms, int tile_tokens, int tile_cols, int k, int s) {
  constexpr double kSmFlopsPerUs = 5.5e6, kGpuBytesPerUs = 2.5e6, kSmBytesPerUs = 2.0e5;
  const int tail = tiles % sms;
  const double tile_us = 2.0 * tile_tokens * tile_cols * k / kSmFlopsPerUs;
  const double tile_bytes = 4.0 * tile_tokens * tile_cols;
  const double waves = tiles / sms + static_cast<double>((tail * s + sms - 1) / sms) / s;
  const double reduce = s == 1 ? 0.0 : tail * s * tile_bytes * 2 / kGpuBytesPerUs + s * tile_bytes / kSmBytesPerUs;
  return tile_us * waves + reduce;
}

// The split for a call: `forced` K ranges (VLLM_QUICK_WS_SPLITS) when > 0, else the cheapest
// estimate up to max_splits; at most total_stages / 2 either way, and splits * stages_per_split
// covering K with no empty range.
inline TailSplit plan_tail_split(int tiles, int sms, int tile_tokens, int tile_cols, int k, int total_stages,
                                 int max_splits, int forced) {
  const int limit = total_stages / 2 > 1 ? total_stages / 2 : 1;
  int s = 1;
  if (tiles % sms != 0) {
    if (forced > 0) {
      s = forced < limit ? forced : limit;
    } else {
      const int top = max_splits < limit ? max_splits : limit;
      for (int c = 2; c <= top; ++c)
        if (tail_split_cost_us(tiles, sms, tile_tokens, tile_cols, k, c) <
            tail_split_cost_us(tiles, sms, tile_tokens, tile_cols, k, s))
          s = c;
    }
  }
  TailSplit t{};
  t.stages_per_split = (total_stages + s - 1) / s;
  t.splits = (total_stages + t.stages_per_split - 1) / t.stages_per_split;
  if (t.splits == 1) t.stages_per_split = total_stages;
  t.tail_tiles = t.splits > 1 ? tiles % sms : 0;
  t.dp_blocks = tiles - t.tail_tiles;
  t.blocks = t.dp_blocks + t.tail_tiles * t.splits;
  return t;
}

// What block `block` computes.
struct WsBlockWork {
  int tile_n0;      // first 64-column tile (column block * wgs)
  int row0;         // first token (row block * tokens)
  int split, splits;
  int tail;         // index among the tail tiles (partials slot tail * splits + split, counter), or -1
  int stage_begin, stage_count;
};

QUICK_SPLIT_HD WsBlockWork ws_block_work(int block, int dp_blocks, int splits, int stages_per_split, int total_stages,
                                         int grid_n, int wgs, int tokens) {
  WsBlockWork w;
  int tile;
  if (block < dp_blocks) {
    tile = block;
    w.split = 0, w.splits = 1, w.tail = -1;
    w.stage_begin = 0, w.stage_count = total_stages;
  } else {
    const int u = block - dp_blocks;
    w.tail = u / splits;
    w.split = u % splits, w.splits = splits;
    tile = dp_blocks + w.tail;
    w.stage_begin = w.split * stages_per_split;
    w.stage_count = total_stages - w.stage_begin < stages_per_split ? total_stages - w.stage_begin : stages_per_split;
  }
  w.tile_n0 = tile % grid_n * wgs;
  w.row0 = tile / grid_n * tokens;
  return w;
}

}  // namespace quick
