// Launcher API of the QUICK W4A16 GEMM. Plain C++ types only: the kernel translation unit
// (quick_gemm.cu) never sees torch headers, which keeps its compile time short; the torch binding
// (quick_ops.cpp) validates tensors and calls these two functions.
#pragma once

#include <cuda_runtime.h>

namespace quick {

enum class ActType { kFloat16, kBFloat16 };

// Tile configurations of the kernel (quick_gemm.cu, with_tile, says what each one is). plan()
// takes GemmProblem::tile, or chooses from M when it is kTileAuto; vllm_quick/dispatch.py holds
// the measured choice per GPU and passes it down.
enum Tile : int {
  kTileAuto = -1,
  kTileX16 = 0, kTileX32, kTileX64,                  // exact fragments, fp16 and bf16
  kTileS16, kTileS32, kTileS64, kTileS128,           // scaled fragments, fp16
  kTileS16M, kTileS32M, kTileS64M,                   // scaled, 16x magic ("lean"), fp16
  kTileW64, kTileW128, kTileW128N,                   // lean, Hopper wgmma (sm_90a), fp16
  kTileW64X,                                         // exact, Hopper wgmma (sm_90a), fp16 and bf16
  kTileWS256,                                        // lean, warp-specialised TMA + wgmma (sm_90a), fp16
                                                     // fragments; bf16 calls through fp16 activations
  kTileWS128,                                        // ws256 with 128 tokens per block (and more stages)
  kTileWS64,                                         // ws256 with 64 tokens per block (decode-sized M)
  kTileWS64B2,                                       // ws64, two blocks per SM
  kTileWS128W4,                                      // ws128 with four consumer warpgroups (256 columns)
  kTileWS16, kTileWS8,                               // the ws producer feeding mma.sync consumers, 16 / 8
                                                     // tokens, three blocks per SM (small M)
  kTileWS16B2,                                       // ws16 at two blocks per SM (104 registers)
  kTileWS32B2,                                       // the same with 32 tokens, two blocks per SM
  kTileWS8W, kTileWS16W, kTileWS32W,                 // ws8 / ws16 / ws32 with two words per warp
  kTileWS64W, kTileWS128W,                           // the wgmma tiles ws64 / ws128 with two words per warp
  kTileWS192,                                        // ws256 with 192 tokens per block (less padding at some M)
  kTileCount
};
const char* tile_name(int tile);                // "x16", ..., "auto" for anything else
bool tile_supports(int tile, ActType act);      // scaled ("s") and scaled wgmma tiles are fp16 only, but s16m / s32m
bool tile_runs_on(int tile, int device);        // wgmma ("w") tiles need an sm_90 GPU
int default_tile(int m, ActType act);           // the choice for kTileAuto
// Whether the tile reads fp16 activations even for bf16 calls (ws tiles, s16m, s32m): the caller then moves x
// into fp16 with scale_bf16_to_fp16 and passes GemmArgs::act_row_abs_max; the tile writes bf16 y.
bool tile_takes_fp16_activations(int tile, ActType act);

struct GemmProblem {
  int m;           // rows of x / y
  int k;           // input features; must be a multiple of 64 (kStageK)
  int n;           // output features padded to a multiple of 64 (qweight's N/64 * 64)
  int size_n;      // real output features (<= n); columns >= size_n are not written
  int group_size;  // 32 or a multiple of 64 dividing k (k itself for per-channel)
  ActType act;
  int tile = kTileAuto;  // a Tile; kTileAuto: default_tile(m, act)
};

// How one call is cut up; chosen by plan() from M and the GPU, so that small-M calls still fill
// every SM (split-K) and large-M calls use bigger M tiles.
struct GemmPlan {
  int block_m;         // rows per thread block (16, 32, 64 or 128)
  int splits;          // split-K factor (1 = no reduction)
  int stages_per_split;
  int grid_n, grid_m;  // blocks along N and M
  int blocks;          // thread blocks launched
  int blocks_per_sm;   // of this tile, resident at once (the occupancy query plan() sizes its grids by)
  int dp_blocks;       // ws tiles: blocks of whole tiles (quick_stream_k.cuh); the other blocks are
  int sk_tiles;        //   sk_blocks blocks sharing out the K stages of sk_tiles tiles, each cut
  int sk_blocks;       //   into at most max_pieces pieces (splits = max_pieces for the ws tiles)
  int max_pieces;
  bool cluster_reduce;     // sm_90: the splits of a tile form a cluster and reduce in shared memory
  bool split_major;        // global split-K in which every split sums a slice (reduce_split_k)
  int max_active_clusters; // such clusters the GPU holds at once (0 where not asked)
  size_t partial_floats;  // fp32 workspace for split-K partial sums (0 without a global reduction)
  int counters;           // int counters needed (zeroed once, each launch leaves them zeroed)
};

struct GemmArgs {
  const void* x;         // [m, k] fp16/bf16, rows contiguous, 16-byte aligned
  const void* qweight;   // int32 [k/16, n/64, 128] interleaved (vllm_quick/layout.py)
  const void* qzeros;    // int32 [k/group, n/8] interleaved
  const void* scales;    // fp16 [k/group, n] interleaved for the accumulator fragment
  const void* bias;      // [size_n] in the activation type, or nullptr
  void* y;               // [m, size_n] in the activation type
  float* partials;       // plan.partial_floats fp32, or nullptr when that is 0
  int* counters;         // plan.counters ints, all zero on entry (and on exit)
  // bf16 calls of a tile_takes_fp16_activations() tile: x is the fp16 copy written by
  // scale_bf16_to_fp16, row i holding x[i] * 2^e_i, and this is its per-row max|x| words
  // (M of them), from which the tile finds each e_i and writes y[i] = acc * 2^-e_i in bf16.
  // nullptr otherwise.
  const unsigned* act_row_abs_max = nullptr;
};

// bf16 activations into fp16 without rounding (quick_act_scale.cu): a bf16 significand (8 bits)
// fits fp16's 11, only the exponent range differs, so row i of x is multiplied by the power of
// two 2^e_i that puts the row's max|x| in [2^14, 2^15) (fp16_shift_of_bf16 in
// quick_act_scale.cuh). One kernel on `stream`, no host sync: CUDA graphs capture it.
struct Fp16ActArgs {
  const void* x;            // bf16 [rows, cols], rows contiguous, 16-byte aligned, cols % 8 == 0
  void* x16;                // fp16, same shape and alignment
  unsigned* row_abs_max;    // rows words of device memory (the bf16 bits of each row's max|x|)
  int rows, cols;
};
cudaError_t scale_bf16_to_fp16(const Fp16ActArgs& args, cudaStream_t stream);

// Dense dequantisation of the interleaved layout: out[k, n] = (q - z) * s in the activation type.
struct DequantArgs {
  const void* qweight;
  const void* qzeros;
  const void* scales;
  void* out;  // [k, n] row-major
  int k, n, group_size;
  ActType act;
};

GemmPlan plan(const GemmProblem& problem, int device);
cudaError_t dequantize(const DequantArgs& args, cudaStream_t stream);
// Diagnostic builds (QUICK_WS_TIMELINE, quick_gemm_ws.cuh): copies the ws blocks' phase times
// (kTimelineSlots x kTimelineBlocks x kTimelineWords uint64) to host memory; false in other builds.
constexpr int kTimelineSlots = 8, kTimelineBlocks = 2048, kTimelineWords = 16;
bool read_ws_timeline(unsigned long long* host);
cudaError_t run(const GemmProblem& problem, const GemmPlan& plan, const GemmArgs& args,
                cudaStream_t stream);

}  // namespace quick
