// How the ws tiles (quick_gemm_ws.cuh) cut a call into thread blocks: stream-K over the last,
// partial wave. Host and device code: plan() in quick_gemm.cu picks the schedule, the kernel maps
// its block index with ws_block_work, and tests/test_stream_k.py runs both on the host.
//
// Tiles are numbered row block by row block (tile = row block * grid_n + column block, so
// neighbouring blocks share x's rows); a tile is `stages` 64-row K stages of work ("units"),
// tile t owning units [t stages, (t + 1) stages). Blocks [0, dp_blocks) take tiles
// [0, dp_blocks) whole ("data parallel": the full waves). The remaining sk_tiles tiles (the last,
// partial wave) are U = sk_tiles x stages units, shared out by sk_blocks blocks: block i of them
// takes units [lo(i), lo(i + 1)) with lo(i) = i U / sk_blocks (floor), contiguous across tile
// boundaries, so every block gets the same work to within one stage. With sk_blocks >= sk_tiles
// a share is at most one tile, i.e. at most two segments: the end of one tile and the start of
// the next. Two special cases:
//   * sk_blocks = sk_tiles x s: each tile is exactly s blocks' shares (session 10's "tail split"
//     of each tail tile into s K ranges): one segment per block;
//   * sk_blocks = the GPU's block slots (stream-K proper, session 12): one full wave, no idle SM;
//     e.g. 96 tiles of 64 stages on 132 SMs: 46 or 47 stages per block, 2-3 pieces per tile.
// A segment that is a whole tile stores y itself. A shared tile's first piece (its K range from
// stage 0, always the last segment of its block) owns it: the other pieces store their fp32
// partial tiles into slots [sk tile][piece - 1] (max_pieces - 1 slots per tile) and count in on
// the tile's counter, and the owner waits for them, adds them to its own accumulators in piece
// order (deterministic) and stores y (ws_segment_epilogue in quick_gemm_ws.cuh).
#pragma once

#ifdef __CUDACC__
#define QUICK_SPLIT_HD __host__ __device__ __forceinline__
#else
#define QUICK_SPLIT_HD inline
#endif

namespace quick {

struct WsSchedule {
  int dp_blocks;   // tiles computed whole, one block each
  int sk_tiles;    // tiles after them, shared out by sk_blocks blocks (0: none)
  int sk_blocks;
  int max_pieces;  // the most blocks one shared tile is cut among (partial slots per tile)
  int blocks;      // dp_blocks + sk_blocks
};

// Units [lo(i), lo(i + 1)) of the shared tiles go to stream-K block i.
QUICK_SPLIT_HD long long sk_unit_begin(int i, long long units, int sk_blocks) { return i * units / sk_blocks; }

// The stream-K block whose share holds unit u: the largest i with lo(i) <= u, i.e.
// i U / B < u + 1  <=>  i < (u + 1) B / U  <=>  i = ceil((u + 1) B / U) - 1 = ((u + 1) B - 1) / U.
QUICK_SPLIT_HD int sk_block_of_unit(long long u, long long units, int sk_blocks) {
  return static_cast<int>(((u + 1) * sk_blocks - 1) / units);
}

// Into how many blocks' shares shared tile t falls.
QUICK_SPLIT_HD int sk_pieces(int t, int stages, int sk_tiles, int sk_blocks) {
  const long long units = static_cast<long long>(sk_tiles) * stages;
  return sk_block_of_unit(static_cast<long long>(t + 1) * stages - 1, units, sk_blocks) -
         sk_block_of_unit(static_cast<long long>(t) * stages, units, sk_blocks) + 1;
}

// How many partial tiles a schedule stores and the most pieces of one tile, in O(1) (plan() runs
// on every call): a tail split (sk_blocks = sk_tiles x s) cuts every tile into exactly s pieces
// (lo(t s + j) = t stages + j stages / s: shares start on tile boundaries); otherwise every block
// boundary inside a tile adds a piece (at most sk_tiles + sk_blocks - 1 in all), and a tile holds
// at most 2 + (stages - 2) / min_share pieces (its end pieces plus whole shares between them).
// One piece per tile (the owner) stores nothing.
struct SkPieces {
  int partials, max_pieces;
};
inline SkPieces sk_piece_counts(int stages, int sk_tiles, int sk_blocks) {
  if (sk_blocks % sk_tiles == 0) return {sk_blocks - sk_tiles, sk_blocks / sk_tiles};
  const long long min_share = static_cast<long long>(sk_tiles) * stages / sk_blocks;
  return {sk_blocks - 1, 2 + static_cast<int>((stages - 2) / min_share)};
}

// The estimated time, in us, of a schedule for `tiles` output tiles on `slots` block slots:
//   tile_us * (whole waves + waves of stream-K blocks x a share / a tile)
//   + partial tiles x tile_bytes x 2 / kGpuBytesPerUs   (stored by pieces > 0, read by owners)
//   + (max_pieces - 1) x tile_bytes / kSmBytesPerUs    (an owner's reads, on one SM)
// tile_us is a tile's K loop at kSmFlopsPerUs (ws256 at M = 256-4096 on the H100: ~5.5 TFLOP/s
// per SM, benchmarks/KERNEL_NOTES.md session 10). E.g. 13824 x 5120 at M = 1024: 160 tiles of
// 256 x 128 on 132 SMs, a second wave of 28 tiles (2 x 165 us) -> 28 x 4 quarter tiles (165 + 41
// + 14 us). At M = 256 on 4096 x 12288 (96 tiles of 49 us) no split pays: 4 would move 100 MB.
// Checked on an H200 (session 10, tail splits 1/2/3/4/8 forced on the 12 benchmark shapes at
// M = 256 .. 4096): the pick was within 0.2-0.4% (geomean) of the fastest forced split.
// kstep_floor_us: the least time of one 16-row k-step, whatever the tokens (its dequantise ->
// wgmma -> wait chain, ~300 cycles: KERNEL_NOTES.md session 10), so that a tile's time is
// max(compute, k-steps x floor). plan_ws_schedule weighs stream-K with kStreamKStepFloorUs.
inline double ws_schedule_cost_us(int tiles, int slots, int tile_tokens, int tile_cols, int k, int sk_blocks,
                                  double kstep_floor_us = 0.0) {
  constexpr double kSmFlopsPerUs = 5.5e6, kGpuBytesPerUs = 2.5e6, kSmBytesPerUs = 2.0e5;
  const int stages = k / 64, sk_tiles = tiles % slots;
  const double compute_us = 2.0 * tile_tokens * tile_cols * k / kSmFlopsPerUs;
  const double floor_us = kstep_floor_us * (k / 16);
  const double tile_us = compute_us > floor_us ? compute_us : floor_us;
  const double tile_bytes = 4.0 * tile_tokens * tile_cols;
  if (sk_tiles == 0 || sk_blocks <= sk_tiles) return tile_us * ((tiles + slots - 1) / slots);
  const long long units = static_cast<long long>(sk_tiles) * stages;
  const long long share = (units + sk_blocks - 1) / sk_blocks;
  const double waves = tiles / slots + static_cast<double>((sk_blocks + slots - 1) / slots) * share / stages;
  const SkPieces pieces = sk_piece_counts(stages, sk_tiles, sk_blocks);
  return tile_us * waves + pieces.partials * tile_bytes * 2 / kGpuBytesPerUs +
         (pieces.max_pieces - 1) * tile_bytes / kSmBytesPerUs;
}

// The k-step floor (us) stream-K is weighed with, and the share of the tail split's estimate it
// must come under: fitted on session 12's H100 sweep (0.1 and 0.2 us did worse there; without a
// margin it took calls at M = 512-1024 where it ties and lost ~0.5%).
constexpr double kStreamKStepFloorUs = 0.15, kStreamKMargin = 0.97;

// How the stream-K blocks are chosen.
enum class StreamK {
  kAuto,    // the estimate's tail split (sk_tiles x s blocks), or one full wave where it is cheaper
  kNever,   // tail splits only (session 10's plan)
  kAlways,  // one full wave of blocks whenever there is a partial wave
};

// The schedule for a call: `forced_splits` (> 0, VLLM_QUICK_WS_SPLITS) shares each partial-wave
// tile among exactly that many blocks; else `streamk` decides (VLLM_QUICK_WS_STREAMK). Every
// block gets at least two stages, and at most `max_splits` blocks share a tile in a tail split.
inline WsSchedule plan_ws_schedule(int tiles, int slots, int tile_tokens, int tile_cols, int k, int max_splits,
                                   int forced_splits, StreamK streamk) {
  const int stages = k / 64, tail = tiles % slots;
  const long long units = static_cast<long long>(tail) * stages;
  const int most_blocks = static_cast<int>(units / 2 < slots * 64LL ? units / 2 : slots * 64LL);
  int best = tail;  // sk_blocks == tail: every tile whole
  if (tail > 0 && most_blocks > tail) {
    auto cost = [&](int b, double floor_us) {
      return ws_schedule_cost_us(tiles, slots, tile_tokens, tile_cols, k, b, floor_us);
    };
    const int one_wave = slots < most_blocks ? slots : most_blocks;
    if (forced_splits > 0) {
      best = tail * forced_splits < most_blocks ? tail * forced_splits : most_blocks;
    } else if (streamk == StreamK::kAlways) {
      best = one_wave;
    } else {
      // Tail splits as calibrated in session 10 (compute-only tile time), then stream-K over
      // one full wave if it beats that pick once each tile costs at least its k-step chain
      // (fitted on session 12's sweep of stream-K against the tail split on the 12 shapes, M =
      // 48-1024, H100: benchmarks/KERNEL_NOTES.md).
      for (int s = 2; s <= max_splits; ++s) {
        const int b = tail * s < most_blocks ? tail * s : most_blocks;
        if (cost(b, 0.0) < cost(best, 0.0)) best = b;
      }
      if (streamk == StreamK::kAuto &&
          cost(one_wave, kStreamKStepFloorUs) < kStreamKMargin * cost(best, kStreamKStepFloorUs))
        best = one_wave;
    }
  }
  WsSchedule w{};
  if (best <= tail) {
    w.dp_blocks = tiles;
    w.max_pieces = 1;
  } else {
    w.dp_blocks = tiles - tail;
    w.sk_tiles = tail;
    w.sk_blocks = best;
    w.max_pieces = sk_piece_counts(stages, tail, best).max_pieces;
  }
  w.blocks = w.dp_blocks + w.sk_blocks;
  return w;
}

// The small ws tiles (ws8 / ws16 / ws16b2 / ws32b2: mma.sync consumers, 8-32 tokens, the K loop
// mostly streaming weights) leave the estimate above, which is fitted to the wgmma tiles, and
// choose between two schedules of the partial wave: each tile split into s = min(8, slots / tail)
// K ranges (one segment per block, s pieces per tile), or one full stream-K wave (every slot busy,
// but up to slots / tail + 2 pieces per tile and blocks that switch tiles). Session 14, H100, both
// forced on the 12 benchmark shapes (results/kernel_h100_s14_sched_tiles.md): the split won where
// a wave's share is tiny (4096 x 4096, ws8: ~5 stages a block, 9.0 against 9.6 us at M = 1) or
// where its blocks nearly fill the GPU and stay short (4096 x 12288, ws8: 384 of 396 slots,
// 16-stage blocks, 15.1 against 16.3); one wave won where the split leaves slots idle (11008 x
// 4096, ws8: 256 of 396, 15.8 against 14.9) and on long shares (28672 x 8192, ws8: 72 stages a
// block, 52.2 against 50.0). So: the split where a wave's share is under 6 stages, or where it
// fills at least 90% of the slots with blocks of under 32 stages; one wave otherwise. Within 3% of
// the faster of the two on 191 of that run's 192 cases (4 tiles x 12 shapes x M = 1 / 8 / 16 /
// 32; the other, 4096 x 12288 on ws32b2's 264 slots at M = 1, 8%), 1.00-1.03x one wave's time in
// geomean; fitted on that run, not re-timed. Tiles of four blocks per SM (ws8w / ws16w) need only
// 80%: a split that fills 85% of their slots still leaves every SM three blocks or more (session
// 19, H100, ws16w at M = 16 on 4096 x 28672: 224 tiles split 2 ways on 528 slots 28.3 us, one wave
// 31.7, results/kernel_h100_s19_ws16w_sched.md; the only one of the 12 shapes the change moves).
struct SmallTileSchedule {
  int forced_splits;  // > 0: split each partial-wave tile into this many K ranges
  StreamK streamk;    // kAlways where forced_splits is 0
};
inline SmallTileSchedule small_tile_schedule(int tiles, int slots, int stages, int blocks_per_sm) {
  const int tail = tiles % slots;
  if (tail == 0) return {0, StreamK::kAlways};  // whole waves: nothing to share out
  const int s = slots / tail < 8 ? slots / tail : 8;
  const long long wave_share = static_cast<long long>(tail) * stages / slots;
  const long long fill_tenths = blocks_per_sm >= 4 ? 8 : 9;
  const bool fills = static_cast<long long>(tail) * s * 10 >= fill_tenths * slots;
  if (s >= 2 && (wave_share < 6 || (fills && wave_share < 32))) return {s, StreamK::kAuto};
  return {0, StreamK::kAlways};
}

// One contiguous K range of one tile.
struct WsSegment {
  int tile;
  int stage_begin, stage_count;
  int sk_tile;        // index among the shared tiles (its partial slots and counter), or -1
  int piece, pieces;  // pieces == 1: the whole tile; piece 0 (from stage 0) owns a shared tile
};

// What block `block` computes: one or two segments, in order (two named fields, not an array:
// the kernel keeps them in registers).
struct WsBlockWork {
  int count;
  WsSegment first, second;
};

// The segment of the shared tiles' units [u, end) that lies in u's tile.
QUICK_SPLIT_HD WsSegment sk_segment(long long u, long long end, int i, int dp_blocks, int sk_tiles, int sk_blocks,
                                    int stages) {
  const long long units = static_cast<long long>(sk_tiles) * stages;
  const int t = static_cast<int>(u / stages);
  const int begin = static_cast<int>(u - static_cast<long long>(t) * stages);
  const int count = static_cast<int>(end - u < stages - begin ? end - u : stages - begin);
  const int first_block = sk_block_of_unit(static_cast<long long>(t) * stages, units, sk_blocks);
  const int pieces = sk_pieces(t, stages, sk_tiles, sk_blocks);
  return WsSegment{dp_blocks + t, begin, count, pieces > 1 ? t : -1, i - first_block, pieces};
}

QUICK_SPLIT_HD WsBlockWork ws_block_work(int block, int dp_blocks, int sk_tiles, int sk_blocks, int stages) {
  WsBlockWork w{};
  if (block < dp_blocks) {
    w.count = 1;
    w.first = WsSegment{block, 0, stages, -1, 0, 1};
    return w;
  }
  // A share is at most one tile's stages (sk_blocks >= sk_tiles): the end of one tile and the
  // start of the next at most.
  const int i = block - dp_blocks;
  const long long units = static_cast<long long>(sk_tiles) * stages;
  const long long begin = sk_unit_begin(i, units, sk_blocks), end = sk_unit_begin(i + 1, units, sk_blocks);
  w.first = sk_segment(begin, end, i, dp_blocks, sk_tiles, sk_blocks, stages);
  w.count = 1;
  if (begin + w.first.stage_count < end) {
    w.second = sk_segment(begin + w.first.stage_count, end, i, dp_blocks, sk_tiles, sk_blocks, stages);
    w.count = 2;
  }
  return w;
}

}  // namespace quick
