// The warp-specialised Hopper tile ws256 (sm_90a, fp16): one producer thread moves every
// stage into shared memory with the Tensor Memory Accelerator (TMA), consumer warpgroups only
// dequantise and multiply. Included by csrc/quick_gemm.cu.
//
// Why (benchmarks/KERNEL_NOTES.md, session 5): in w128n every warp ran the cp.async copy plan,
// the group bookkeeping, the cp.async wait and a block-wide barrier each stage: ~180 of the 312
// instructions of a 64-row stage, against 130 for the dequantisation and the wgmmas. Here:
//   * the producer is one thread: per stage one 2-D TMA copy of the activations (the TMA writes
//     them already in wgmma's 128-byte swizzle and zero-fills rows past M), four 1-D bulk copies
//     of weight rows and one or two of scales and zeros, all completing on the stage's "full"
//     mbarrier (transaction bytes), and it waits on the stage's "empty" mbarrier before reusing
//     a slot;
//   * a consumer warp holds the words of the stage it works on (loaded one stage ahead, after
//     that stage's "full" wait), dequantises one 4-byte weight word per k-step into one wgmma A
//     fragment (the lean scaled fragments of the w tiles) and issues one m64nTk16 over all T
//     tokens of the block, then releases the previous stage on "empty" once the wgmmas reading
//     it are done. No block-wide barrier in the K loop;
//   * session 8 (KERNEL_NOTES.md): the producer is a whole warpgroup that hands its registers to
//     the consumers (setmaxnreg), and the output tile leaves through shared memory (stmatrix,
//     16-byte stores) -- 61 -> 37 instructions per wgmma, 0.74 -> 0.97x cuBLAS at M = 1024.
//
// Block: kWGs consumer warpgroups, warpgroup c computes the 64 output features of 64-column tile
// c of the block (warp r of it: rows 16 r .. 16 r + 15, word r of every lane's 16 bytes:
// quick_wgmma.cuh, kWords = 1) for the block's kTokens tokens; warpgroup kWGs is the producer.
// The same kernel makes ws128 / ws64 (128 / 64 tokens) and ws64b2 (ws64, two blocks per SM:
// kBlocksPerSm, WsRegisters); which tiles and K ranges a block takes: quick_stream_k.cuh.
#pragma once

#include <cuda.h>  // CUtensorMap (the map is built on the host, quick_gemm.cu)

#include "quick_common.cuh"
#include "quick_fragments.cuh"
#include "quick_ptx.cuh"
#include "quick_stream_k.cuh"
#include "quick_wgmma.cuh"

namespace quick {
namespace {

// The ws tiles with fewer than 64 tokens (ws8 / ws16 / ws16b2 / ws32b2, and ws8w / ws16w / ws32w
// whose warps take two words per k-step) have mma.sync consumers instead of wgmma ones (the
// kernel's K loop) and their own schedule rule (plan() in quick_gemm.cu, small_tile_schedule).
constexpr bool ws_tile_uses_mma_sync(int tokens) { return tokens < 64; }

// ------------------------------------------------------------------------------------------
// mbarriers and TMA (sm_90): the PTX ISA's "mbarrier" and "cp.async.bulk" sections. On other
// targets they compile to nothing (the ws tiles are refused there, like every w tile).
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
#if QUICK_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(arrivals) : "memory");
#endif
}

// Makes initialised mbarriers visible to the other threads and to the TMA unit (async proxy).
__device__ __forceinline__ void fence_mbarrier_init() {
#if QUICK_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// One arrival that also announces `bytes` of asynchronous copies the phase must wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if QUICK_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if QUICK_WGMMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
#endif
}

// Wait until the phase with this parity has completed (phase n of a barrier has parity n % 2).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if QUICK_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
#endif
}

// 2-D TMA load of the box at (c0 = column, c1 = row) of the tensor `map` describes.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
#if QUICK_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
#endif
}

// The same with an L2 policy hint (the weights: evict-first where they are read once).
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar,
                                            uint64_t policy) {
#if QUICK_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
      "%3}], [%4], %5;\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
#endif
}

// 1-D bulk copy of `bytes` (a multiple of 16, both addresses 16-byte aligned), L2 policy hint.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
#if QUICK_WGMMA
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::"r"(
          smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
#endif
}

// A diagnostic build only (QUICK_WS_TIMELINE defined, e.g. QUICK_NVCC_FLAGS=-DQUICK_WS_TIMELINE
// at build time; benchmarks/ws_timeline.py reads it): each block of a ws launch writes when its
// phases happen -- %globaltimer (ns, one clock for the whole GPU) and clock64 (its SM's cycles) --
// into launch slot KernelParams::timeline_slot of ws_timeline. Normal builds record nothing.
enum WsTimelineEvent {
  kTlStart,         // block start (thread 0)
  kTlWaited,        // the producer past the wait for the previous kernel
  kTlIssued,        // the producer has issued its last copy
  kTlFirstData,     // consumer thread 0 past the first stage's "full" wait
  kTlLoopDone,      // consumer thread 0: the last segment's K loop done (its epilogue next)
  kTlEnd,           // consumer thread 0: the last epilogue done
  kTlEvents
};
// Words per block: the events' globaltimer at 0.., the SM at 7, the events' clock64 at 8..
#ifdef QUICK_WS_TIMELINE
__device__ unsigned long long ws_timeline[kTimelineSlots][kTimelineBlocks][kTimelineWords];
__device__ __forceinline__ void timeline_mark(const KernelParams& p, int event) {
  if (p.timeline_slot < 0 || p.timeline_slot >= kTimelineSlots || blockIdx.x >= kTimelineBlocks) return;
  unsigned long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  ws_timeline[p.timeline_slot][blockIdx.x][event] = ns;
  ws_timeline[p.timeline_slot][blockIdx.x][8 + event] = clock64();
  if (event == kTlStart) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    ws_timeline[p.timeline_slot][blockIdx.x][7] = smid;
  }
}
#else
__device__ __forceinline__ void timeline_mark(const KernelParams&, int) {}
#endif

// ------------------------------------------------------------------------------------------
// Shared memory of the ws tiles, per stage (a 64-row K slice): the activation tile first (the
// 128-byte swizzle needs a 1024-byte boundary), then the weight rows of the block's tiles as
// stored (k-tile kt, tile c at (kt kWGs + c) 512 B), scales and zeros of up to two group rows.
// The mbarriers follow the last stage.
// ------------------------------------------------------------------------------------------
template <int kWGs, int kTokens, int kStages>
struct WsSmem {
  static constexpr int kActBytes = kTokens * kStageK * 2;
  static constexpr int kTileBytes = kWordsPerTile * 4;  // 512
  static constexpr int kWeightRowBytes = kWGs * kTileBytes;
  static constexpr int kScaleRowBytes = kWGs * kTileN * 2;
  static constexpr int kZeroRowBytes = kWGs * kTileN / 2;
  static constexpr int kWeightOffset = kActBytes;
  static constexpr int kScaleOffset = kWeightOffset + kStageKTiles * kWeightRowBytes;
  static constexpr int kZeroOffset = kScaleOffset + kMaxGroupRowsPerStage * kScaleRowBytes;
  static constexpr int kStageBytes = (kZeroOffset + kMaxGroupRowsPerStage * kZeroRowBytes + 1023) / 1024 * 1024;
  static constexpr int kBarrierOffset = kStages * kStageBytes;
  static constexpr int kWorkOffset = kBarrierOffset + 2 * kStages * 8;  // the block's WsBlockWork
  static constexpr int kTotalBytes = kWorkOffset + 64 + 1024;             // + alignment slack
  static_assert(sizeof(WsBlockWork) <= 64, "the work fits its slot");
};

// Register budgets of the two roles (setmaxnreg, sm_90a). A block of 128 (kWGs + 1) threads,
// kBlocksPerSm of them per SM, starts with kAtLaunch registers per thread (65536 / threads per
// SM, rounded down to 8: __launch_bounds__; 168 for one block of 384); the producer warpgroup,
// which needs few, gives registers back and the consumers take them from that pool of
// 128 (kWGs + 1) x kAtLaunch -- e.g. 2 x 128 x 232 + 128 x 40 <= 384 x 168. A larger ask makes
// setmaxnreg.inc wait forever (session 9: 64 / 224 hung the kernel). With 168 each (session 6's
// one producer warp) the consumers kept their 128 accumulators and little else: ptxas recomputed
// shared-memory addresses, slots and group tests every stage (ncu: ~60 instructions per wgmma).
// Two blocks per SM (ws64b2: 80 at launch) leave the producer 24, setmaxnreg's minimum; so do four
// consumer warpgroups (ws128w4: 96 at launch, consumers 112 -- with 40 left to the producer they
// got 104 and spilled).
template <int kWGs, int kBlocksPerSm>
struct WsRegisters {
  static constexpr int kAtLaunch = 65536 / (128 * (kWGs + 1) * kBlocksPerSm) / 8 * 8;
  static constexpr int kProducer = kBlocksPerSm == 1 && kWGs < 4 ? 40 : 24;
  static constexpr int kConsumer = ((kWGs + 1) * kAtLaunch - kProducer) / kWGs / 8 * 8;
  static_assert(kWGs * kConsumer + kProducer <= (kWGs + 1) * kAtLaunch, "setmaxnreg would wait forever");
  static_assert(kConsumer <= 256 && kProducer >= 24, "setmaxnreg's range");
};
static_assert(WsRegisters<2, 1>::kConsumer == 232 && WsRegisters<2, 2>::kConsumer == 104 && WsRegisters<4, 1>::kConsumer == 112,
              "the budgets named above");

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_inc() {
#if QUICK_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_dec() {
#if QUICK_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

// Programmatic dependent launch (sm_90; the ws tiles are launched with it, WsConfig::launch): the
// grid may start while the kernel before it in the stream still runs, so every thread waits here
// for that kernel to finish (and its writes to be visible) before it touches global memory. What
// comes before -- the launch itself, mbarrier set-up, the block's work, setmaxnreg -- overlaps the
// previous kernel's tail. Without the launch attribute the wait returns at once.
__device__ __forceinline__ void wait_for_previous_grid() {
#if QUICK_WGMMA
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// stmatrix (sm_90): four 8x8 fp16 matrices from mma-fragment registers (lane l holds row l / 4,
// columns 2 (l % 4) and + 1 of matrix i in register i), stored transposed: row j of matrix i
// (= its column j, 8 consecutive elements, 16 bytes) goes to the address lane 8 i + j gives.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
#if QUICK_WGMMA
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
#endif
}

// Which weight words a consumer warp dequantises (of its lane's 16 bytes per 16 x 64 tile): with
// one word per k-step (the wgmma tiles, ws8 / ws16 / ...), warp r of warpgroup wg takes word r of
// tile wg; with two (ws8w / ws16w / ws32w), warps r and r + 1 share tile 2 wg + r / 2, warp r taking words
// 2 (r % 2) and + 1 -- 32 features, whose two A fragments multiply the same B fragments.
struct WsWarpWord {
  int tile;  // 64-column tile of the block
  int word;  // first word (16 features each)
};
template <int kWarpWords>
__device__ __forceinline__ WsWarpWord ws_warp_word(int wg, int r) {
  constexpr int kWarpsPerTile = 4 / kWarpWords;
  return {wg * kWarpWords + r / kWarpsPerTile, (r % kWarpsPerTile) * kWarpWords};
}

// Epilogue of the ws tiles without split-K or bias (the common case), in two steps with a
// consumer barrier (part_barrier) between them: the block's output tile y[kTokens][kWGs * 64]
// (Out: fp16, or bf16 for bf16 calls; 2 bytes either way) is assembled in the (by then idle)
// pipeline shared memory and written with 16-byte, row-contiguous stores. Storing the wgmma D fragments directly costs one 2-byte store per
// element (128 per thread, ~10% of a 4096-deep K loop's instructions), 8-byte pieces of 32-byte
// sectors. Here: 16 stmatrix per thread (the D fragment of a k-step is, per
// 8 tokens, two 8x8 [feature][token] matrices; .trans stores them as [token][8 features]) and
// 16 coalesced 16-byte copies per thread. Rows of the smem tile are kTiles * 128 bytes; 16-byte
// chunk c of row t sits at chunk c ^ (t % 8), so the 8 rows of one stmatrix matrix hit 8
// different bank groups (no conflict) and a row is still read as one contiguous line.
// kTiles: 64-column tiles per block; (tile, word): the fragments' 16 features are word `word` of
// tile `tile` of the block (warpgroup wg and warp r for the tiles of one word per warp).
template <int kTiles, int kTokens, typename Out>
__device__ __forceinline__ void stage_output_fragments(unsigned char* smem, const float (&out)[kTokens / 8][4], int tile,
                                                       int word, int lane) {
  constexpr int kRowBytes = kTiles * kTileN * 2;
  const uint32_t base = smem_u32(smem);
  // Lane L addresses row j = L % 8 of matrix i = L / 8: token 8 (x + i / 2) + j, features
  // 16 word + 8 (i % 2) of the tile's 64, i.e. 16-byte chunk 8 tile + 2 word + i % 2.
  const int i = lane / 8, j = lane % 8;
  const int chunk = (tile * 8 + 2 * word + (i & 1)) ^ j;  // token % 8 == j
#pragma unroll
  for (int x = 0; x < kTokens / 8; x += 2) {
    const int token = 8 * (x + i / 2) + j;
    stmatrix_x4_trans(base + token * kRowBytes + chunk * 16, Act<Out>::pack(out[x][0], out[x][1]),
                      Act<Out>::pack(out[x][2], out[x][3]), Act<Out>::pack(out[x + 1][0], out[x + 1][1]),
                      Act<Out>::pack(out[x + 1][2], out[x + 1][3]));
  }
}

// Every consumer thread, once the fragments are staged: rows (tokens) below M, chunks of the
// block's working tiles, one 16-byte load and store each, consecutive threads along a row.
template <int kTiles, int kThreads, int kTokens, typename Out>
__device__ __forceinline__ void copy_output_tile(const KernelParams& p, const unsigned char* smem, int row0, int col0,
                                                 int block_tiles) {
  constexpr int kRowBytes = kTiles * kTileN * 2;
  constexpr int kChunks = kRowBytes / 16;
  const int rows = min(kTokens, p.m - row0);
  const int chunks = block_tiles * kTileN / 8;
  for (int idx = threadIdx.x; idx < rows * kChunks; idx += kThreads) {
    const int t = idx / kChunks, c = idx % kChunks;
    if (c >= chunks || col0 + 8 * c >= p.size_n) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(smem + t * kRowBytes + ((c ^ (t & 7)) * 16));
    *reinterpret_cast<uint4*>(static_cast<Out*>(p.y) + static_cast<size_t>(row0 + t) * p.size_n + col0 + 8 * c) = v;
  }
}

// What the consumers do with a segment's accumulators (out: the D fragments as kTokens / 2
// floats out[x][e], x = 8 i + nb: output feature n0 + 8 (e / 2), token t0 + 8 x + e % 2), the
// K loop done and its last stage released.
//
// A piece of a shared tile (quick_stream_k.cuh) other than its first (piece > 0) stores its fp32
// accumulators to its partial slot and counts itself in on the tile's counter; that is all. The
// first piece (piece 0, the K range from stage 0) owns the tile: it waits until the counter says
// the other pieces are stored, adds them into its own registers in piece order (deterministic:
// ((piece 0 + piece 1) + piece 2) ...) and leaves like a whole tile. No piece writes y twice and
// the owner stores no partial of its own. Why the owner may wait: its other pieces are later
// blocks' K ranges, and a piece > 0 never waits on anything, so (blocks start in index order)
// they all finish; the first of them is a block's first segment, done early in its share, the
// last a block's whole share or first segment. Session 12 first let the last piece to arrive sum
// all of them through global memory (every piece stored, the sum read back 8 quads a round):
// ~6 us after the K loops on ws128 at M = 128, which ate the balance's gain.
// Partials are stored in fragment order, [quad x][consumer thread] float4s: each warp store and
// load is 512 contiguous bytes, and the owner's thread t reads exactly what thread t stored.
//
// A whole tile (or the owner once summed): the block's last segment with no bias and y's rows
// 16-byte aligned goes through the (by then idle) pipeline shared memory with 16-byte stores
// (stage_output_fragments, then copy_output_tile); otherwise straight from the fragments
// (store_output). Every consumer thread calls this (the barriers count all of them); warpgroups
// whose columns lie past N store nothing.
// kWarpWords: weight words a consumer warp takes per k-step (1; 2 for ws8w / ws16w / ws32w): `out` holds
// kWarpWords sets of kTokens / 8 quads, set j being word (r % kWarpsPerTile) kWarpWords + j of
// tile wg kWarpWords + r / kWarpsPerTile of the block (WsWarpWord).
// kRowScaled: x came as the fp16 copy of a bf16 x, row t times 2^e_t (the wgmma ws tiles' bf16
// calls; the kernel's kRowScaled); the mma.sync ws tiles multiply a bf16 x as it is.
template <int kWGs, int kTokens, typename Out, int kWarpWords, bool kRowScaled>
__device__ __forceinline__ void ws_segment_epilogue(const KernelParams& p, unsigned char* smem,
                                                    float (&out)[kWarpWords * kTokens / 8][4], const WsBlockWork* work,
                                                    int g, int grid_n, int n_tiles, int wg, int r, int lane) {
  constexpr int kThreads = 128 * kWGs;           // the consumers: threads [0, kThreads) of the block
  constexpr int kTiles = kWGs * kWarpWords;      // 64-column tiles per block
  constexpr int kSetQuads = kTokens / 8;         // float4s of one word's accumulators
  constexpr int kQuads = kWarpWords * kSetQuads;  // float4s of accumulators per thread
  constexpr int kPartialQuads = kQuads * kThreads;
  const WsWarpWord ww = ws_warp_word<kWarpWords>(wg, r);
  // Segment g's fields are read from shared memory where they are used, again after the
  // barriers: kept in registers across the owner's sum, they spilled (ptxas may not reload a
  // value across a barrier's memory clobber).
  auto segment = [&]() -> const WsSegment& { return g == 0 ? work->first : work->second; };
  int row0 = segment().tile / grid_n * kTokens, tile_n0 = segment().tile % grid_n * kTiles;
  bool stores = ww.tile < min(kTiles, n_tiles - tile_n0);
  if constexpr (kRowScaled) {
    // bf16 calls: row t of x came scaled by 2^e_t (quick_act_scale.cu); undo it per token
    // (row_unscale).
#pragma unroll
    for (int x = 0; x < kQuads; ++x)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float unscale = row_unscale(p, row0 + 2 * (lane % 4) + 8 * (x % kSetQuads) + h);
        out[x][h] *= unscale;
        out[x][h + 2] *= unscale;
      }
  }
  if (const WsSegment& seg = segment(); seg.pieces > 1) {
    // Slots of pieces 1 .. max_pieces - 1 of this tile, from slot_base on; this thread's float4s.
    const size_t slot_base = static_cast<size_t>(seg.sk_tile) * (p.max_pieces - 1) * kPartialQuads + threadIdx.x;
    if (seg.piece > 0) {
      if (stores) {
        float4* part = reinterpret_cast<float4*>(p.partials) + slot_base + (seg.piece - 1) * kPartialQuads;
#pragma unroll
        for (int x = 0; x < kQuads; ++x) __stcg(part + x * kThreads, make_float4(out[x][0], out[x][1], out[x][2], out[x][3]));
      }
      if (p.lean_fixup) {
        // Release by thread 0 after the barrier (cumulative over the other threads' stores, which
        // bar.sync orders before it: cooperative groups' grid-sync pattern, reduce_split_k).
        part_barrier<kThreads>();
        if (threadIdx.x == 0) red_release_gpu_add(p.counters + seg.sk_tile, 1);
      } else {
        __threadfence();  // the partial visible device-wide before the counter says so
        part_barrier<kThreads>();
        if (threadIdx.x == 0) atomicAdd(p.counters + seg.sk_tile, 1);
      }
      return;
    }
    if (p.lean_fixup) {
      // Thread 0 spins on an acquire load (no sleep) and the barrier passes its acquire on; no
      // thread fences after it -- a fence of thread 0 would first wait for its counter reset to
      // land (session 18's timeline: ~2.6 us from the last piece's K loop to the owner's store).
      if (threadIdx.x == 0) {
        int* counter = p.counters + seg.sk_tile;
        while (ld_acquire_gpu(counter) < seg.pieces - 1) {
        }
        st_relaxed_gpu(counter, 0);  // every other piece has counted in: ready for the next launch
      }
      part_barrier<kThreads>();
    } else {
      if (threadIdx.x == 0) {
        volatile int* counter = p.counters + seg.sk_tile;
        while (*counter < seg.pieces - 1) __nanosleep(100);
        *counter = 0;  // every other piece has counted in: ready for the next launch / graph replay
      }
      part_barrier<kThreads>();
      __threadfence();  // acquire side: see the other pieces' partials
    }
    if (stores) {
      const float4* part = reinterpret_cast<const float4*>(p.partials) + slot_base;
      // Four float4 loads in flight per thread at a time: more made ptxas spill on ws256 (bf16)
      // and ws64b2, whose accumulators fill most of their registers. A thread of ws16 / ws8 has
      // only 2 / 1 float4s per piece but a tile of many pieces (a small-M call shares every tile
      // among several blocks): kBatch pieces' loads go out together, 8 float4s in flight for ws8
      // and 4 for ws16 (8 spilled at its 72 registers).
      constexpr int kChunk = kQuads < 4 ? kQuads : 4;
      constexpr int kBatch = kQuads == 1 ? 8 : kQuads < 4 ? 4 / kQuads : 1;
      for (int piece = 1; piece < seg.pieces; piece += kBatch) {
#pragma unroll
        for (int x0 = 0; x0 < kQuads; x0 += kChunk) {
          float4 v[kBatch][kChunk];
#pragma unroll
          for (int b = 0; b < kBatch; ++b)
#pragma unroll
            for (int j = 0; j < kChunk; ++j)
              if (kBatch == 1 || piece + b < seg.pieces)
                v[b][j] = __ldcg(part + static_cast<size_t>(piece - 1 + b) * kPartialQuads + (x0 + j) * kThreads);
#pragma unroll
          for (int b = 0; b < kBatch; ++b)  // piece order: the sum is deterministic
#pragma unroll
            for (int j = 0; j < kChunk; ++j)
              if (kBatch == 1 || piece + b < seg.pieces) {
                out[x0 + j][0] += v[b][j].x;
                out[x0 + j][1] += v[b][j].y;
                out[x0 + j][2] += v[b][j].z;
                out[x0 + j][3] += v[b][j].w;
              }
        }
      }
    }
  }
  row0 = segment().tile / grid_n * kTokens, tile_n0 = segment().tile % grid_n * kTiles;
  const int block_tiles = min(kTiles, n_tiles - tile_n0);
  stores = ww.tile < block_tiles;
  const bool last_segment = g + 1 == work->count;
  // (ws8's one token group has no pair of 8x8 matrices to stage: it stores from the fragments.)
  if constexpr (kTokens >= 16) {
    if (last_segment && p.bias == nullptr && p.size_n % 8 == 0 && (reinterpret_cast<uintptr_t>(p.y) & 15) == 0) {
      // Both warpgroups' wgmmas must be done with the pipeline's shared memory before the output
      // tile goes there (and the producer has nothing left to load into it).
      part_barrier<kThreads>();
      if (stores) {
#pragma unroll
        for (int j = 0; j < kWarpWords; ++j)
          stage_output_fragments<kTiles, kTokens, Out>(
              smem, reinterpret_cast<const float(&)[kSetQuads][4]>(out[j * kSetQuads]), ww.tile, ww.word + j, lane);
      }
      part_barrier<kThreads>();
      copy_output_tile<kTiles, kThreads, kTokens, Out>(p, smem, row0, tile_n0 * kTileN, block_tiles);
      return;
    }
  }
  if (stores) {
    // Feature tile * 64 + c0 and token t0 of the block's tile, then as in stage_output_fragments.
    const int c0 = ww.tile * kTileN + 16 * ww.word + lane / 4;
    const int t0 = 2 * (lane % 4);
#pragma unroll
    for (int x = 0; x < kQuads; ++x)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        store_output<Out>(p, row0 + t0 + 8 * (x % kSetQuads) + e % 2,
                          tile_n0 * kTileN + c0 + 16 * (x / kSetQuads) + 8 * (e / 2), out[x][e]);
  }
}

// A consumer warp's kWarpWords weight words of one k-tile (ws_warp_word): one 4- or 8-byte load.
template <int kWarpWords>
__device__ __forceinline__ void load_warp_words(const unsigned char* at, uint32_t (&words)[kWarpWords]) {
  if constexpr (kWarpWords == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(at);
    words[0] = v.x;
    words[1] = v.y;
  } else {
    words[0] = *reinterpret_cast<const uint32_t*>(at);
  }
}

// What a consumer warp reads of one stage before its first wgmma: its four weight words (word r
// of its lane's 16 bytes in each k-tile of its warpgroup's tile) and, per group row of the
// stage, its zero word and its two scale words. Loaded one stage ahead, so the shared-memory
// latency never sits between two wgmmas.
// kWarpWords = 2 (ws64w / ws128w): the warp's two words per k-tile and their four scale words.
template <int kWarpWords>
struct WsStageWords {
  uint32_t w[kStageKTiles][kWarpWords];
  uint32_t zero[kMaxGroupRowsPerStage];
  uint32_t scale[kMaxGroupRowsPerStage][2 * kWarpWords];
};

// kTwoGroups: group size 32, i.e. two group rows per 64-row stage (k-tiles 0-1 and 2-3); else
// the whole stage lies in one group and its row is unpacked once per stage (no group tracking:
// the producer copies the stage's row into every stage, so nothing is carried across stages).
// Out: y's type. The wgmma consumers always multiply fp16 (their lean fragments are fp16 tricks);
// for their bf16 calls (Out = bf16) x is the exact fp16 copy, row i times 2^e_i
// (quick_act_scale.cu), and the accumulators of row i are multiplied by 2^-e_i, exactly, before
// the bf16 output -- one rounding of (q - z) * s to fp16 and one of y to bf16, as in
// ops.fp16_product_for_bf16 but without its passes over y. The mma.sync consumers hold the exact
// q - z, which bf16 represents as well as fp16: they multiply in the call's own type, a bf16 x as
// it is (no copy, no second kernel; session 16), with bf16 fragments built by T's magic number.
// kWarpWords: weight words per consumer warp and k-step (ws_warp_word): 1, or 2 for ws8w / ws16w /
// ws32w (mma.sync consumers) and ws64w / ws128w (wgmma consumers: two wgmmas per k-step, one per
// word, into their own accumulators); a block has kWGs kWarpWords 64-column tiles.
template <int kWGs, int kTokens, int kStages, bool kTwoGroups, typename Out, int kBlocksPerSm, int kWarpWords = 1>
__global__ void __launch_bounds__(128 * (kWGs + 1), kBlocksPerSm)
    quick_gemm_ws_kernel(const __grid_constant__ CUtensorMap act_map, const __grid_constant__ CUtensorMap weight_map,
                         const KernelParams p) {
#if !QUICK_WGMMA
  // Only the sm_90a build has a body: mbarriers, TMA and setmaxnreg exist there alone, and the
  // ws tiles are refused elsewhere (tile_runs_on).
  __trap();
#else
  constexpr int kTiles = kWGs * kWarpWords;  // 64-column tiles per block
  using Smem = WsSmem<kTiles, kTokens, kStages>;
  using Registers = WsRegisters<kWGs, kBlocksPerSm>;
  // ws16 / ws8 (fewer than 64 tokens): mma.sync consumers instead of wgmma (the K loop below).
  constexpr bool kMmaSync = ws_tile_uses_mma_sync(kTokens);
  // What the fragments, x's tile and the mma hold: fp16 for the wgmma consumers, the call's type
  // for the mma.sync ones; the lean (16x magic) dequantisation is fp16's alone.
  using T = std::conditional_t<kMmaSync, Out, __half>;
  constexpr bool kLean = std::is_same_v<T, __half>;
  constexpr bool kRowScaled = !std::is_same_v<Out, T>;
  constexpr int kRows = kMmaSync ? 1 : kWarpWords * kTokens / 64;  // accumulator as [kRows][8][4] floats (wgmma_step)
  constexpr int kGroupRows = kTwoGroups ? 2 : 1;
  static_assert(kTokens * kTiles * kTileN * 2 <= Smem::kBarrierOffset, "the output tile must fit in the pipeline");
  static_assert(kWarpWords == 1 || kWarpWords == 2, "one or two words per warp");
  extern __shared__ __align__(16) unsigned char smem_window[];
  unsigned char* smem = smem_window + ((1024 - (smem_u32(smem_window) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Smem::kBarrierOffset);
  uint64_t* empty = full + kStages;
  // The block's segments live in shared memory, not registers: each role reads a segment where it
  // starts and again where it ends, so nothing of it stays live across the K loop (ws256's
  // consumers spilled with the two segments in registers).
  WsBlockWork* work = reinterpret_cast<WsBlockWork*>(smem + Smem::kWorkOffset);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int n_tiles = p.n / kTileN;
  const int grid_n = (n_tiles + kTiles - 1) / kTiles;
  // One or two segments (tile, K range) in order; the pipeline runs on across them
  // (quick_stream_k.cuh).
  auto segment = [&](int g) { return g == 0 ? work->first : work->second; };

  if (threadIdx.x == 0) {
    timeline_mark(p, kTlStart);
    *work = ws_block_work(blockIdx.x, p.dp_blocks, p.sk_tiles, p.sk_blocks, p.k / kStageK);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);            // the producer's arrive.expect_tx
      mbarrier_init(&empty[s], 128 * kWGs);  // every consumer thread (an idle warpgroup too)
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (warp / 4 == kWGs) {
    // ---- Producer warpgroup: one thread issues every copy, then the group leaves. ----
    setmaxnreg_dec<Registers::kProducer>();
    wait_for_previous_grid();
    if (warp % 4 == 0 && lane == 0) {
      timeline_mark(p, kTlWaited);
      const uint64_t policy = p.weights_evict_first ? evict_first_policy() : evict_normal_policy();
      const uint64_t keep = evict_normal_policy();
      const size_t w_row = static_cast<size_t>(n_tiles) * Smem::kTileBytes;  // bytes per k-tile row
      int slot = 0, issued = 0;
      uint32_t phase = 0;
#pragma unroll 1
      for (int g = 0; g < work->count; ++g) {
        const WsSegment seg = segment(g);
        const int tile_n0 = seg.tile % grid_n * kTiles, row0 = seg.tile / grid_n * kTokens;
        const int block_tiles = min(kTiles, n_tiles - tile_n0);
        const unsigned char* w_src = reinterpret_cast<const unsigned char*>(p.qweight) +
                                     static_cast<size_t>(seg.stage_begin) * kStageKTiles * w_row +
                                     static_cast<size_t>(tile_n0) * Smem::kTileBytes;
        const unsigned char* s_src = reinterpret_cast<const unsigned char*>(p.scales) + tile_n0 * kTileN * 2;
        const unsigned char* z_src = reinterpret_cast<const unsigned char*>(p.qzeros) + tile_n0 * kTileN / 2;
        const uint32_t w_bytes = block_tiles * Smem::kTileBytes;
        const uint32_t s_bytes = block_tiles * kTileN * 2, z_bytes = block_tiles * kTileN / 2;
        // The weight map's box is the block's kTiles tiles of the stage's 4 k-tile rows, tiles
        // past N zero-filled but counted; the bulk copies move the working tiles only.
        const uint32_t w_stage_bytes = p.weights_by_map ? kStageKTiles * Smem::kWeightRowBytes : kStageKTiles * w_bytes;
        const uint32_t stage_bytes = Smem::kActBytes + w_stage_bytes + kGroupRows * (s_bytes + z_bytes);
        for (int s = 0; s < seg.stage_count; ++s, ++issued) {
          // Slot reuse: wait for the consumers' release of the stage kStages earlier.
          if (issued >= kStages) mbarrier_wait(&empty[slot], phase ^ 1);
          unsigned char* base = smem + slot * Smem::kStageBytes;
          mbarrier_arrive_expect_tx(&full[slot], stage_bytes);
          const int gs = seg.stage_begin + s;
          // Rows past M come back as zeros and still count as box bytes.
          tma_load_2d(base, &act_map, gs * kStageK, row0, &full[slot]);
          if (p.weights_by_map) {
            // One 2-D copy of the stage's weights (kStageKTiles rows of the block's tiles; the map
            // counts 8-byte elements, 64 per tile) instead of one bulk copy per k-tile row.
            tma_load_2d(base + Smem::kWeightOffset, &weight_map, tile_n0 * (Smem::kTileBytes / 8), gs * kStageKTiles,
                        &full[slot], policy);
          } else {
#pragma unroll
            for (int kt = 0; kt < kStageKTiles; ++kt)
              bulk_load(base + Smem::kWeightOffset + kt * Smem::kWeightRowBytes, w_src + kt * w_row, w_bytes,
                        &full[slot], policy);
          }
          w_src += kStageKTiles * w_row;
#pragma unroll
          for (int r = 0; r < kGroupRows; ++r) {
            const size_t group_row = kTwoGroups ? 2 * gs + r : gs * kStageK / p.group_size;
            bulk_load(base + Smem::kScaleOffset + r * Smem::kScaleRowBytes, s_src + group_row * p.n * 2, s_bytes,
                      &full[slot], keep);
            bulk_load(base + Smem::kZeroOffset + r * Smem::kZeroRowBytes, z_src + group_row * p.n / 2, z_bytes,
                      &full[slot], keep);
          }
          if (++slot == kStages) slot = 0, phase ^= 1;
        }
      }
      timeline_mark(p, kTlIssued);
    }
    return;  // (the consumers' split-K reduction synchronises them alone: a named barrier)
  }

  // ---- Consumers: warpgroup wg, warp r of it (word r of each lane's 16 bytes). ----
  // Every consumer warpgroup runs every stage, also one whose 64 columns lie past N (odd tile
  // count, last column block): its wgmmas read stale shared memory and it stores nothing, but it
  // keeps each stage's "empty" count at 128 kWGs whatever the segment's tile.
  setmaxnreg_inc<Registers::kConsumer>();
  wait_for_previous_grid();  // (the epilogue reads row scales and bias, writes y and partials)
  const int wg = warp / 4, r = warp % 4;
  // This lane's word offsets inside a stage (bytes): weight word r of lane `lane` of tile wg in
  // k-tile kt at kWeightOffset + (kt kWGs + wg) 512 + 16 lane + 4 r -- a 4-way bank conflict
  // (lanes 8 apart share a bank), once per stage; the zero word of the lane's 8 columns; the
  // 8 bytes of scale words 2 r, 2 r + 1 of its 32-byte scale row (unpack_word_params).
  // Two words per warp (kWarpWords = 2): words 2 (r % 2), + 1 of tile 2 wg + r / 2 (ws_warp_word):
  // an 8-byte load, a 2-way bank conflict, and 16 bytes of scale words.
  const WsWarpWord ww = ws_warp_word<kWarpWords>(wg, r);
  const int first_word = ww.word;
  const unsigned char* my_words = smem + Smem::kWeightOffset + ww.tile * Smem::kTileBytes + lane * 16 + ww.word * 4;
  const unsigned char* my_zero = smem + Smem::kZeroOffset + (ww.tile * 8 + lane / 4) * 4;
  const unsigned char* my_scales = smem + Smem::kScaleOffset + ww.tile * kTileN * 2 + 32 * (lane / 8) + 8 * ww.word;
  auto load_stage = [&](int slot, WsStageWords<kWarpWords>& st) {
    const int at = slot * Smem::kStageBytes;
#pragma unroll
    for (int kt = 0; kt < kStageKTiles; ++kt)
      load_warp_words<kWarpWords>(my_words + at + kt * Smem::kWeightRowBytes, st.w[kt]);
#pragma unroll
    for (int gr = 0; gr < kGroupRows; ++gr) {
      st.zero[gr] = *reinterpret_cast<const uint32_t*>(my_zero + at + gr * Smem::kZeroRowBytes);
      if constexpr (kWarpWords == 2) {  // scale words 2 word .. + 3: 16 bytes at 16 (word / 2)
        const uint4 v = *reinterpret_cast<const uint4*>(my_scales + at + gr * Smem::kScaleRowBytes);
        st.scale[gr][0] = v.x, st.scale[gr][1] = v.y, st.scale[gr][2] = v.z, st.scale[gr][3] = v.w;
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(my_scales + at + gr * Smem::kScaleRowBytes);
        st.scale[gr][0] = v.x, st.scale[gr][1] = v.y;
      }
    }
  };
  // The activation tile of slot 0 as a wgmma descriptor; a slot and a k-step only move its
  // start address (bits 0-13, in 16-byte units: no carry out of them inside shared memory).
  const uint64_t desc0 = sw128_kmajor_desc(smem_u32(smem));

  WsStageWords<kWarpWords> cur, next;
  int slot = 0, prev_slot = 0;
  uint32_t phase = 0;
  if constexpr (!kMmaSync) {
    mbarrier_wait(&full[0], 0);
    if (threadIdx.x == 0) timeline_mark(p, kTlFirstData);
    load_stage(0, cur);
  }
#pragma unroll 1
  for (int g = 0; g < work->count; ++g) {
    const int stage_count = segment(g).stage_count;
    if constexpr (kMmaSync) {
      // ---- ws16 / ws8: mma.sync consumers. ----
      // Warp r of warpgroup wg dequantises the same A fragments as the wgmma tiles (its 16
      // features of tile wg, one weight word per k-step) and multiplies them by the block's
      // tokens as kTokens / 8 m16n8k16 products, B = x^T (8 tokens x 16 k) loaded by ldmatrix
      // straight from the TMA's 128-byte-swizzled activation tile: x is K-major, so an 8x8
      // matrix of 8 token rows and 8 k is a B fragment half as it stands, and chunk c of row t
      // sitting at c ^ (t % 8) puts a matrix's 8 rows in 8 different bank groups. The D fragment
      // of token group i is the wgmma D layout restricted to one warp (rows 16 r + lane / 4
      // (+ 8), tokens 8 i + 2 (lane % 4) + {0, 1}), so the epilogue, the stream-K partials and
      // the output staging are the wgmma tiles'.
      // The fragments hold the exact q - z (small integers, exact in fp16 and bf16 alike): a group's products sum in
      // `group` and join `acc` times the two features' fp32 scales when the group ends -- no
      // HMUL2 per weight (the scaled fragments' 4 a word) and no fp16 rounding of (q - z) s.
      // kWarpWords = 2 (ws8w / ws16w / ws32w): the warp takes two words per k-step (ws_warp_word), two A
      // fragments against the same B: the per-stage work (wait, addresses, B loads, bookkeeping)
      // is shared by twice the weights, and the two products are independent chains.
      constexpr int kMatsPerStep = kTokens / 4;  // 8x8 matrices of B per k-step: token groups x 2
      constexpr int kLoadedMats = kMatsPerStep > 4 ? kMatsPerStep : 4;  // ldmatrix.x4 at a time
      constexpr int kSetQuads = kTokens / 8;                            // quads of one word's tokens
      float acc[kWarpWords * kSetQuads][4], group[kWarpWords * kSetQuads][4];
#pragma unroll
      for (int i = 0; i < kWarpWords * kSetQuads; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = group[i][e] = 0.f;
      const int group_stages = p.group_size / kStageK;  // group size >= 64 (else kTwoGroups)
      int group_left = group_stages - segment(g).stage_begin % group_stages;  // stages to the group's end
      bool group_fresh = true;  // the segment's first stage unpacks its group whatever its position
      uint32_t zero[2 * kWarpWords], neg_zero16[2 * kWarpWords] = {};  // (neg_zero16: fp16 only)
      // Per word j: the fp32 scales of this lane's features 16 word + lane / 4 and + 8.
      float scale_lo[kWarpWords] = {}, scale_hi[kWarpWords] = {};
      // Per x4 load of a k-step (ws32 has two), k-step 0's byte offset of this lane's row.
      int ldmatrix_offset[kMatsPerStep > 4 ? kMatsPerStep / 4 : 1];
#pragma unroll
      for (int q = 0; q < (kMatsPerStep > 4 ? kMatsPerStep / 4 : 1); ++q) {
        const int l = (4 * q + lane / 8) % kMatsPerStep;  // ws8: lanes 16-31 address k-step 1
        const int token = 8 * (l / 2) + lane % 8, chunk = (4 * q + lane / 8) / kMatsPerStep * 2 + l % 2;
        ldmatrix_offset[q] = token * 128 + ((chunk ^ (lane % 8)) * 16);
      }
      auto flush_group = [&]() {
#pragma unroll
        for (int i = 0; i < kWarpWords * kSetQuads; ++i) {
          const int j = i / kSetQuads;
          acc[i][0] = fmaf(scale_lo[j], group[i][0], acc[i][0]);
          acc[i][1] = fmaf(scale_lo[j], group[i][1], acc[i][1]);
          acc[i][2] = fmaf(scale_hi[j], group[i][2], acc[i][2]);
          acc[i][3] = fmaf(scale_hi[j], group[i][3], acc[i][3]);
#pragma unroll
          for (int e = 0; e < 4; ++e) group[i][e] = 0.f;
        }
      };
      // The slot of the stage before, which goes back to the producer at the top of the next
      // stage (and after the segment's last): by then every mma.sync of that stage has issued, and
      // an mma waits for the ldmatrix results it multiplies, so all reads of the slot are done.
      // (Sessions 14-15 arrived right after the stage's last ldmatrix was issued. ptxas puts no
      // scoreboard wait on that arrive, so a read still in flight could see the producer's next
      // TMA into the slot: ws32w / ws48w gave different results between calls, one warp's B rows
      // at a time. Session 16, H100: the old code with only this release moved never differed in
      // 1,440 calls against 105 for the old code as it was, and the later release is 1-2% faster
      // on every mma.sync tile; benchmarks/KERNEL_NOTES.md, results/kernel_h100_s16_late_arrive.md.)
      int read_slot = -1;
#pragma unroll 1
      for (int s = 0; s < stage_count; ++s) {
        if (read_slot >= 0) mbarrier_arrive(&empty[read_slot]);
        // The stage's words are read where it starts (not a stage ahead, as the wgmma consumers
        // do: at 72 registers the second set spilled); with 24 consumer warps per SM the
        // shared-memory latency is other warps' issue time.
        mbarrier_wait(&full[slot], phase);
        if (threadIdx.x == 0 && g == 0 && s == 0) timeline_mark(p, kTlFirstData);
        const int at_slot = slot * Smem::kStageBytes;
        uint32_t words[kStageKTiles][kWarpWords];  // one 4- or 8-byte load per k-tile
#pragma unroll
        for (int kt = 0; kt < kStageKTiles; ++kt)
          load_warp_words<kWarpWords>(my_words + at_slot + kt * Smem::kWeightRowBytes, words[kt]);
        // A group of 128 or more spans several stages, each carrying a copy of its row: only the
        // group's first stage (or the segment's) unpacks it. (Every stage: 2% slower for ws8,
        // 1% for ws16, session 14.)
        const bool new_group = kTwoGroups || group_fresh || group_left == group_stages;
        group_fresh = false;
        const unsigned char* act = smem + at_slot;
        uint32_t b[kLoadedMats];
#pragma unroll
        for (int kt = 0; kt < kStageKTiles; ++kt) {
          if ((kt == 0 && new_group) || (kTwoGroups && kt == 2)) {
            const int gr = kt / 2 * (kTwoGroups ? 1 : 0);
            const uint32_t zero_word = *reinterpret_cast<const uint32_t*>(my_zero + at_slot + gr * Smem::kZeroRowBytes);
            const __half* tile_scales =
                reinterpret_cast<const __half*>(smem + Smem::kScaleOffset + at_slot + gr * Smem::kScaleRowBytes) +
                ww.tile * kTileN;
            uint32_t scale_pair[2 * kWarpWords];
            unpack_word_params<T, kWarpWords, kLean>(zero_word, tile_scales, lane, first_word, zero, neg_zero16,
                                                    scale_pair);
#pragma unroll
            for (int j = 0; j < kWarpWords; ++j) {
              scale_lo[j] = scale_pair_to_float(scale_pair[2 * j]);
              scale_hi[j] = scale_pair_to_float(scale_pair[2 * j + 1]);
            }
          }
          // B of this k-step: matrix l (token group l / 2, k chunk 2 kt + l % 2) is matrix
          // kt kMatsPerStep + l of the stage, loaded four at a time (ws8: two k-steps' worth).
          if ((kt * kMatsPerStep) % kLoadedMats == 0) {
#pragma unroll
            for (int q = 0; q < kLoadedMats / 4; ++q) {
              // Lane L addresses row L % 8 of matrix 4 q + L / 8: token 8 (l / 2) + L % 8, k chunk
              // c = 2 k-step + l % 2 at c ^ (L % 8). As 2 k-step is even, that is the lane's chunk
              // for k-step 0 XOR 2 k-step: one LOP on a per-lane offset (ldmatrix_offset).
              const int mat = kt * kMatsPerStep + 4 * q;  // + lane / 8
              const int step = mat / kMatsPerStep;        // the k-step of this x4 (ws8: of its first half)
              uint32_t r4[4];
              ldmatrix_x4(r4, act + (ldmatrix_offset[(mat % kMatsPerStep) / 4] ^ (step << 5)));
#pragma unroll
              for (int i = 0; i < 4; ++i) b[4 * q + i] = r4[i];
            }
          }
          uint32_t a[kWarpWords][4];
          const uint32_t no_scale[2 * kWarpWords] = {};
          dequant_a_fragments<T, kWarpWords, false, kLean>(words[kt], zero, neg_zero16, no_scale, a);
          const int at = (kt * kMatsPerStep) % kLoadedMats;
#pragma unroll
          for (int j = 0; j < kWarpWords; ++j)
#pragma unroll
            for (int i = 0; i < kSetQuads; ++i)
              Act<T>::mma(group[j * kSetQuads + i], a[j], b[at + 2 * i], b[at + 2 * i + 1]);
          if (kTwoGroups && (kt == 1 || kt == 3)) flush_group();
        }
        if (!kTwoGroups && --group_left == 0) {
          flush_group();
          group_left = group_stages;
        }
        read_slot = slot;
        if (++slot == kStages) slot = 0, phase ^= 1;
      }
      mbarrier_arrive(&empty[read_slot]);  // (a segment has at least one stage)
      if (!kTwoGroups) flush_group();  // the segment ends inside a group (or on its end: adds 0)
      if (threadIdx.x == 0 && g + 1 == work->count) timeline_mark(p, kTlLoopDone);
      ws_segment_epilogue<kWGs, kTokens, Out, kWarpWords, kRowScaled>(p, smem, acc, work, g, grid_n, n_tiles, wg, r,
                                                                       lane);
      if (threadIdx.x == 0 && g + 1 == work->count) timeline_mark(p, kTlEnd);
    } else {
      float acc[kRows][8][4];
      zero_accumulators(acc);
#pragma unroll
      for (int i = 0; i < kRows; ++i) fence_registers(reinterpret_cast<float(&)[32]>(acc[i]));
      uint32_t zero[2 * kWarpWords], neg_zero16[2 * kWarpWords], scale[2 * kWarpWords];
      for (int s = 0; s < stage_count; ++s) {
        const int next_slot = slot + 1 == kStages ? 0 : slot + 1;
        const uint32_t next_phase = next_slot == 0 ? phase ^ 1 : phase;
        const uint64_t desc = desc0 + static_cast<uint32_t>(slot * (Smem::kStageBytes >> 4));
#pragma unroll
        for (int kt = 0; kt < kStageKTiles; ++kt) {
          if (kt == 0 || (kTwoGroups && kt == 2)) {
            const int gr = kt / 2 * (kTwoGroups ? 1 : 0);
            unpack_word_zeros<T, kWarpWords, true>(cur.zero[gr], first_word, zero, neg_zero16);
#pragma unroll
            for (int m = 0; m < 2 * kWarpWords; ++m) scale[m] = lane_scale_pair(cur.scale[gr][m], lane);
          }
          uint32_t a[kWarpWords][4];
          dequant_a_fragments<T, kWarpWords, true, true>(cur.w[kt], zero, neg_zero16, scale, a);
          // One wgmma per k-step, then wait for the previous one. (Session 6 also tried a stage's
          // four wgmmas as one commit group: 1.4-1.5x slower at 128 and 192 tokens, and wrong at
          // both -- see KERNEL_NOTES.md. Session 11: waiting for all but the last two or three
          // k-steps makes ptxas serialise every wgmma (C7513: the dequantisation writes A
          // registers inside the wgmma pipeline), and two accumulator sets taken in turn gained
          // little -- KERNEL_NOTES.md.)
          // (Two words per warp: two wgmmas, one per word, into their own accumulators.)
          wgmma_step<T, kWarpWords, kTokens>(acc, a, desc + kt * (32 >> 4));
          // wgmma_step waited for all but this k-step's wgmma: the previous stage is read.
          if (kt == 0 && s > 0) mbarrier_arrive(&empty[prev_slot]);
          // The next stage's words (the next segment's first, after a segment's last), while this
          // stage's wgmmas run (the producer is kStages - 1 stages ahead, so the wait rarely waits).
          if (kt == 1 && (s + 1 < stage_count || g + 1 < work->count)) {
            mbarrier_wait(&full[next_slot], next_phase);
            load_stage(next_slot, next);
          }
        }
        cur = next;
        prev_slot = slot;
        slot = next_slot;
        phase = next_phase;
      }
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < kRows; ++i) fence_registers(reinterpret_cast<float(&)[32]>(acc[i]));
      mbarrier_arrive(&empty[prev_slot]);  // the segment's last stage is read too
      if (threadIdx.x == 0 && g + 1 == work->count) timeline_mark(p, kTlLoopDone);
      ws_segment_epilogue<kWGs, kTokens, Out, kWarpWords, kRowScaled>(
          p, smem, reinterpret_cast<float(&)[kWarpWords * kTokens / 8][4]>(acc), work, g, grid_n, n_tiles, wg, r, lane);
      if (threadIdx.x == 0 && g + 1 == work->count) timeline_mark(p, kTlEnd);
    }
  }
#endif
}

}  // namespace
}  // namespace quick
