"""Which path ``quick::gemm`` takes on a GPU, by the number of rows M of the call.

This runs inside the custom op at run time (never in ``apply()``, where vLLM's compilation would
freeze it). The paths:

* a **kernel tile** (``"x16"``, ``"x32"``, ``"x64"``, ``"s16"``, ``"s32"``, ``"s64"``,
  ``"s128"``, ``"s16m"``, ``"s32m"``, ``"s64m"``, ``"w64"``, ``"w128"``, ``"w128n"``, ``"w64x"``,
  ``"ws256"``, ``"ws128"``, ``"ws64"``, ``"ws64b2"``, ``"ws128w4"``, ``"ws16"``, ``"ws8"``, ``"ws16b2"``,
  ``"ws32b2"``, ``"ws8w"``, ``"ws16w"``, ``"ws32w"``, ``"ws64w"``, ``"ws128w"``, ``"ws192"``;
  ``vllm_quick._C.TILES``, described in csrc/quick_gemm.cu, ``with_tile``): the QUICK kernel
  streaming int4 weights, with that many rows per thread block. ``x`` tiles keep the exact
  integers ``q - z`` in the mma fragments and scale per group in fp32 (fp16 and bf16); ``s``
  tiles (fp16 only) put ``(q - z) * s`` into the fragments, one fp16 rounding per weight, and
  free the registers of the second accumulator set for taller tiles; ``s..m`` tiles are ``s``
  tiles with fewer dequantisation instructions (the "16x magic"; 4-6% faster than the plain ``s``
  tiles at M <= 64 on the H100), and ``s16m`` / ``s32m`` take bf16 too, through the exact fp16
  copy of x described below for the ws tiles (bf16's tiles to M = 16 / 32 on the large layers,
  ``s32m`` from 17 to 32 on the small ones); ``w64`` / ``w128`` (fp16, sm_90 only) feed the same fragments to
  Hopper's warpgroup MMA (wgmma) with 64 / 128 rows per block, ``w128n`` with half a tile per
  warp and 128 tokens per wgmma (the one plans use);
  ``w64x`` (fp16 and bf16, sm_90 only) feeds the exact fragments to wgmma with per-group fp32
  scaling (in no plan since session 11);
  ``ws256`` (sm_90 only) is the warp-specialised wgmma tile (a TMA producer warpgroup
  feeding two consumer warpgroups, 256 tokens per block): both dtypes' tile beyond M = 192
  where ``ws192`` (the same with 192 tokens, session 20) does not pad less: ``ws192`` takes
  M = 129-192 on every layer and 273-384 and 529-576 below LARGE_LAYER_ELEMENTS; ``ws128`` is
  the same tile with 128 tokens per block, both dtypes' tile from M = 65 to 128, and ``ws64``
  has 64 tokens (in no plan since session 12);
  ``ws64b2`` is ws64 at two blocks per SM (both dtypes' from M = 33 to 64); ``ws128w4`` is ws128
  with four consumer warpgroups over 256 columns (both dtypes' from M = 65 to 80 on the large
  layers, K x N >= LARGE_LAYER_ELEMENTS); ``ws64w`` / ``ws128w`` take the large layers' M = 33-64 /
  81-128. They share out the
  last, partial wave's tiles along K (tail splits or a stream-K wave, csrc/quick_stream_k.cuh).
  ``ws8`` / ``ws16`` / ``ws16b2`` / ``ws32b2`` (session 14) are the same producer feeding
  ``mma.sync`` consumers for small M (8 / 16 / 32 tokens per block, three blocks per SM, the
  ``b2`` tiles two), with the exact ``q - z`` in the fragments and each group scaled in fp32;
  ``ws8w`` / ``ws16w`` / ``ws32w`` (sessions 15-16) have each consumer warp take two weight words
  per k-step (32 features) with one warpgroup per block (four blocks per SM, ``ws32w`` three).
  ``ws64w`` / ``ws128w`` (session 17) are ``ws64`` / ``ws128`` whose warps take two words per
  k-step: two wgmmas per k-step, one warpgroup per block (three / two blocks per SM).
  The plans use ``ws8`` to M = 8, ``ws16`` to 16 (``ws16w`` on the large layers) and ``ws32w``
  to 32; the partial wave is split along K or shared out by stream-K by ``small_tile_schedule``
  (csrc/quick_stream_k.cuh).
  These ``mma.sync`` ws tiles multiply in the call's dtype (bf16 fragments of the exact
  ``q - z`` for bf16, since session 16); the wgmma ws tiles' fragments are fp16, so a bf16 x goes
  into them as an exact fp16 copy, row i times 2^e_i (csrc/quick_act_scale.cu), and the tile
  writes bf16 y[i] * 2^-e_i from its fp32 accumulators (one fp16 rounding of (q - z) * s, like
  dequant_fp16's dense weight);
* ``"auto"``: the kernel with its own built-in choice by M (families not measured yet);
* ``"dequant"``: dequantise the layer once into a dense matrix (csrc/quick_dequant.cu) and call
  cuBLAS; it won once the GEMM was bound by arithmetic (large M, prefill) before ws256 caught up:
  in no plan since session 14 (ws256 ahead at M = 2048-8192);
* ``"dequant_fp16"`` (bf16 activations): the same with an fp16 dense weight, the activations and
  the product scaled by a power of two into fp16's range and back exactly
  (``ops.fp16_matmul_for_bf16``; the dense fp16 weight rounds (q - z) * s once to fp16, 1.7e-3 of
  relative error measured; bf16 would be 2.3e-3): in no plan since ws256 takes bf16 (session 9);
* ``"fp16:<tile>"`` (bf16 activations): the activations moved into fp16 by the same power-of-two
  scaling, then an fp16-only tile (``ops.kernel_fp16_for_bf16``), which rounds (q - z) * s once
  to fp16 like dequant_fp16's dense weight: bf16's way into fp16-only tiles (session 8's way into
  ws256; in no plan since ws256 does the scaling itself, without the passes over y).

``PLANS`` is the measured choice per GPU family and activation dtype: ``(largest M, path)`` pairs
in increasing M, the last one with ``None`` (any larger M). ``benchmarks/dispatch_table.py``
derives it from a kernel_bench.py result. On a GPU not in the table (or to try a plan without
editing this file) set ``VLLM_QUICK_DISPATCH_PLAN``, e.g.
``float16=16:x16,64:s64,*:dequant;bfloat16=16:x16,*:x64`` (dtypes not named keep the table's plan);
dispatch_table.py prints that string too. bf16 never takes ``"dequant"`` or an ``s`` tile with
bf16 fragments: a dense bf16 weight rounds ``(q - z) * s`` to bf16, which costs ~2.3e-3 of
relative error against the 2e-3 budget, while the ``x`` tiles keep the weights exact
(layout.py) and ``s16m`` / ``s32m`` / the ws tiles round it once to fp16 (1.7e-3 measured).

One call may take two tiles: where the plan gives ``ws256`` (256 rows per block) and M = 256 q + r
with a small r, the op runs rows [0, 256 q) on ws256 and the last r rows on the plan's tile for
M = r, into one output (``row_split``; vLLM's mixed prefill + decode steps, e.g. M = 575).
"""

from __future__ import annotations

import os

import torch

Plan = tuple[tuple[int | None, str], ...]

# (compute capability major) -> {dtype: plan}
# sm90: measured on an H100 80GB HBM3 (sessions 5-10, 2026-11-25 and 2026-11-26; the session 10
# changes for the small layers on an H200, 2026-11-26, see below), every candidate tile + dequant +
# cuBLAS on the 12 Llama shapes, fp16 and bf16, M = 1-512 (bf16 to 1024):
# benchmarks/results/kernel_h100_tiles_s5.json (session 5; M = 32-4096 for the large-M paths in
# kernel_h100_tiles_s5_large.json). Geometric mean of the speedup over cuBLAS on the 10 large
# layers, best path first:
#   fp16 M <= 16: s16m 2.05-2.52 (x16 1.87-2.08); M = 24-32: s32m 1.60-1.74 (w64x 1.54-1.57);
#   M = 48-64: w64x 1.37-1.45 (w128n 1.18-1.24, s32m 1.06-1.08); M = 96-512: w128n 0.68-1.10;
#   beyond 512: dequantise + cuBLAS (0.80 at M = 1024, 0.92 at 4096; w128n 0.76 / 0.79).
#   Session 8 (ws256 with a producer warpgroup, benchmarks/results/kernel_h100_s8_ws_tiles.json,
#   fp16, M = 128-4096, the 10 large layers): ws256 / w128n / dequant 0.71 / 0.88 / 0.46 at
#   M = 128, 0.79 / 0.69 / 0.49 at 256, 0.81 / 0.72 / 0.67 at 512, 0.88 / 0.79 / 0.82 at 1024,
#   0.85 / 0.79 / 0.92 at 4096 -> ws256 from M = 129 to 1024. With its output staged through
#   shared memory (stmatrix, 16-byte stores; kernel_h100_s8_ws_epilogue_tiles.json): 0.87 / 0.83
#   / 0.97 / 0.92 at M = 256 / 512 / 1024 / 4096 (dequant 0.92 at 4096) -> ws256 to M = 4096, and
#   on the small layers from M = 257 to 4096 (0.66 / 0.97 / 0.99 at 512 / 1024 / 4096 against
#   dequant's 0.65 / 0.85 / 0.94; dequant keeps M = 65-256 there, 0.49 against 0.39).
#   bf16 through the fp16 tile ws256 ("fp16:ws256", session 8, kernel_h100_s8_bf16_tiles.json,
#   large layers): fp16:ws256 / w64x / dequant_fp16 0.50 / 0.53 / 0.34 at M = 256, 0.52 / 0.49 /
#   0.43 at 512, 0.60 / 0.51 / 0.54 at 1024, 0.64 / 0.51 / 0.63 at 4096 -> fp16:ws256 from M =
#   257 to 4096 (the scaling's extra passes over x and y cost ~1/3 of its time); on the small
#   layers w64x stays (0.43-0.52 against 0.20-0.48).
#   Session 9: ws256 takes bf16 itself (an exact fp16 copy of x, bf16 y written by the tile:
#   csrc/quick_act_scale.cu; benchmarks/results/kernel_h100_s9_bf16_ws256.json, 12 shapes, M =
#   128-4096): bf16 ws256 / w64x / fp16:ws256 0.67 / 0.70 / 0.42x cuBLAS at M = 128, 0.68 / 0.53 /
#   0.42 at 256, 0.74 / 0.49 / 0.49 at 512, 0.85 / 0.51 / 0.57 at 1024, 0.86 / 0.51 / 0.61 at 4096
#   (bf16 ws256 time / fp16 ws256 time 1.08 / 1.13 / 1.10 / 1.07 / 1.05) -> ws256 from M = 129 on
#   the large layers (beyond 4096 too: dequant_fp16 was 0.63 at 4096) and from M = 257 on the
#   small ones (w64x 0.65 / 0.47 against 0.30 / 0.40 at M = 256 there).
#   Session 9, the 128-token ws tile ws128 (benchmarks/results/kernel_h100_s9_ws128_tiles.json, M =
#   64-512): large layers, fp16 ws128 / w128n / ws256 / w64x 1.04 / 1.06 / 0.80 / 0.85x cuBLAS at
#   M = 96, 1.07 / 0.99 / 0.82 / 0.85 at 128, 0.65 / 0.71 / 0.91 at 192 (w64x 1.39 at 64); bf16
#   ws128 / w64x / ws256 0.92 / 0.83 / 0.73 at 96, 0.93 / 0.84 / 0.75 at 128 -> ws128 from M = 65 to
#   128 for both. Small layers, fp16 ws128 / dequant 0.57 / 0.51 at 96, 0.53 / 0.48 at 128, 0.53 /
#   0.47 at 192, 0.60 / 0.49 at 256 -> ws128 from 65 to 256 there; bf16 keeps w64x (0.56 against
#   ws128's 0.43-0.49).
#   bf16 M <= 16: x16 1.88-2.09; beyond: w64x (1.54 at M = 32, 1.36 at 64, 0.87 at 128, 0.50 at
#   1024; the x tiles 0.33 there). bf16 never takes "dequant" (see above). "dequant_fp16"
#   (session 6, benchmarks/results/kernel_h100_s6_dequant_fp16_v2.json, bf16, M = 128-4096):
#   time relative to the best path, geomean of the 12 shapes, w64x / dequant_fp16: M = 512
#   1.02 / 1.24, 1024 1.06 / 1.07, 4096 1.17 / 1.01 -> dequant_fp16 beyond 1024 (large layers;
#   on the small ones the two tie at 4096: 0.53x cuBLAS each).
# Session 14 (H100, benchmarks/results/kernel_h100_s14_ws_small_tiles.json, 12 shapes, M = 1-32,
# fp16 and bf16 alike): time over the best of s16m / s32m / ws8 / ws16 / ws16b2, geomean per
# layer class. Mid layers ws8 1.00-1.01 (s16m 1.03-1.07) at M = 1-8, ws16b2 1.00 (s16m 1.15) at
# 16; large layers ws8 1.00-1.01 (s16m 1.04-1.09) at 1-8, ws16 1.02-1.03 (s16m 1.05) at 16; small
# layers s16m 1.00 (ws8 1.03) at M = 1-2, ws8 1.00-1.01 at 4-8, ws16b2 1.00 (s16m 1.08) at 16;
# From 17 to 32 (kernel_h100_s14_ws32_tiles.json, a second run that also repeated M = 1-16): ws32b2
# (32 tokens, two blocks per SM) 1.00-1.01 against s32m 1.03-1.08 on the small layers and 1.00-1.04
# against 1.02-1.08 on the mid ones; the large layers keep s32m (ws32b2 1.03-1.11 there). Beyond
# M = 4096 fp16 takes ws256 as bf16 does
# (kernel_h100_s14_large_m.json, the 8B layers: ws256 0.98 / 0.95 / 1.01x cuBLAS at M = 8192
# against dequant's 0.89 / 0.94 / 0.91; 1.00 / 1.01 / 1.04 against 0.93 / 0.99 / 0.96 at 4096).
# Session 15 (H100, benchmarks/results/kernel_h100_s15_words2.json, 12 shapes, M = 1-16, fp16 and
# bf16, time over the best of ws8 / ws8w / ws16 / ws16w / ws16b2, geomean): at M = 16 ws16 1.02-1.03
# against ws16b2 1.07-1.08 (mid layers 1.00-1.01 against 1.04-1.05, small 1.00-1.01 against 1.00,
# large 1.04-1.05 against 1.11-1.13) -> ws16 from 9 to 16 everywhere; ws8 keeps 1-8 (ws8w 1.04
# against 1.02: faster on six wide layers, slower on the down projections). M = 17-48
# (kernel_h100_s15_ws32w.json, time over the best of ws16 / ws32b2 / ws32w / s32m / ws64b2): ws32w,
# two weight words per warp over 32 tokens at three blocks per SM, 1.00 against ws32b2 1.02-1.20
# and s32m 1.05-1.23 at M = 17 / 24 / 32 on every layer class, fp16 and bf16 -- but it gave
# different results on repeated calls with per-channel groups where blocks share a tile, so it
# stayed out of the plans. Session 16 found why (the mma.sync consumers released a stage's slot
# before their ldmatrix reads had landed; benchmarks/KERNEL_NOTES.md) and re-timed it with the
# later slot release (kernel_h100_s16_late_arrive.json, fp16, 12 shapes): ws32w 1.00
# against ws32b2 1.13-1.14 and s32m 1.13-1.19 at M = 24 / 32 (ws32b2 ties it on 4096 x 4096 only)
# -> ws32w from 17 to 32 on every layer class; ws64b2 keeps 33-64 (ws32w 1.36 at 40-48).
# Session 16, the plans' edges again with that release (kernel_h100_s16_plan_edges.json, 12 shapes,
# M = 1-40, fp16 and bf16, time over the best tile, geomean per layer class): the plans' tile is
# within 1-2% of the best everywhere but at M = 1-2, where the small layers run ws8 1.00 against
# s16m 1.06 (fp16) and x16 1.03 (bf16) -> ws8 from M = 1 there (the small layers now follow
# PLANS: SMALL_LAYER_PLANS is empty). bf16 on the mid layers ran x16 (no copy of x) 1.01 against
# ws8 1.03-1.04 there;
# since the mma.sync ws tiles take bf16 without the copy (kernel_h100_s16_bf16_native.json: ws8
# bf16 / fp16 time 1.03 against 1.12 with the copy, the op 1.07 / 1.03 / 1.02 / 1.02 at M = 1 / 8 /
# 16 / 32 against 1.11 / 1.12 / 1.08 / 1.12, same run) ws8 beats x16 there too (7b.down at M = 1:
# 15.3 against 16.7 us) -> ws8 from M = 1 on every layer class, both dtypes.
PLANS: dict[int, dict[torch.dtype, Plan]] = {
    9: {
        torch.float16: ((8, "ws8"), (16, "ws16"), (32, "ws32w"), (64, "ws64b2"), (128, "ws128"), (192, "ws192"),
                        (272, "ws256"), (384, "ws192"), (528, "ws256"), (576, "ws192"), (None, "ws256")),
        torch.bfloat16: ((8, "ws8"), (16, "ws16"), (32, "ws32w"), (64, "ws64b2"), (128, "ws128"), (192, "ws192"),
                         (272, "ws256"), (384, "ws192"), (528, "ws256"), (576, "ws192"), (None, "ws256")),
    },
}
# Session 11: the ws tiles' bf16 copy of x into fp16 is one kernel per call (per-row powers of
# two) instead of a memset and two kernels; on an H200 (benchmarks/results/kernel_h200_s11_bf16_tiles.json,
# 12 shapes, M = 16-512) bf16 ws64b2 / ws128 / ws256 now take 1.06-1.10 / 1.01-1.06 / 1.05-1.10x
# their fp16 time, and the bf16 plans move to the ws tiles where fp16 has them: large layers,
# bf16 ws64b2 / w64x 1.10 / 1.12x cuBLAS at M = 32, 1.08 / 1.02 at 64 -> ws64b2 from 33 to 64;
# small layers ws64 / w64x 0.70 / 0.47 at 64, ws128 / w64x 0.63 / 0.47 at 128, 0.58 / 0.52 at
# 256 -> ws64 from 33 to 64, ws128 from 65 to 256.
# Then s16m and s32m took bf16 the same way (H100, benchmarks/results/kernel_h100_s11_bf16_small_m_tiles.json,
# bf16, 12 shapes): large layers s16m / x16 2.30 / 2.20x cuBLAS at M = 1, 1.95 / 1.94 at 16,
# s32m / w64x 1.67 / 1.56 at 32 -> s16m to 16, s32m to 32; small layers s16m / x16 1.56 / 1.54
# at 1, 1.34 / 1.36 at 16 (x16 stays: no copy of x), s32m / x16 1.08 / 0.93 at 32 -> s32m
# from 17 to 32.
# Small layers (K x N <= SMALL_LAYER_ELEMENTS, e.g. Llama-3-8B's o 4096x4096 and qkv 4096x6144)
# have too few column blocks to fill 132 SMs with the wgmma tiles, and their dense fp16 copy is
# small enough (32-48 MB) for dequantise + cuBLAS to compete from M = 65 (same sweep, the 2 small
# layers: fp16 s32m 0.67 against w64x 0.60 at M = 64, dequant 0.51 against w64x 0.49 at M = 96;
# bf16 x16 0.91 against w64x 0.81 at M = 32, w64x from M = 48); since session 9 ws128 beats it
# from M = 65 to 256 (0.53-0.60 against 0.47-0.51, see above), still ~0.55x cuBLAS.
# Session 10 (the ws tiles split the last wave's tiles along K, csrc/quick_stream_k.cuh; an
# H200, benchmarks/results/kernel_h200_s10_plan_tiles.json, the 2 small layers, fp16): ws128 /
# s32m 0.74 / 0.63 at M = 64 -> ws128 from M = 33; ws256 / ws128 0.67 / 0.59 at 192, 0.66 / 0.64
# at 256 -> ws256 from M = 129. (Large layers and bf16 kept their plans: w64x 1.02 / 1.12 against
# ws128's 0.91 / 0.79 at M = 64, ws128 at 96-128, ws256 from 192.) The 64-token ws tile ws64
# (kernel_h200_s10_ws64_tiles.json, M = 16-64): small layers, fp16 ws64 / ws128 / s32m 0.91 /
# 0.82 / 0.72 at M = 48, 0.80 / 0.74 / 0.62 at 64 -> ws64 from M = 33 to 64 there; on the large
# layers it stays at ~1.0x cuBLAS whatever M (w64x 1.15-1.18 at 48-64, s16m / s32m 1.70 / 1.36
# at 16 / 32), and bf16 keeps x16 / w64x everywhere (ws64 0.59-0.68 on the small layers).
# ws64b2 is ws64 at two blocks per SM (a ws64 block waits on its k-step chain, not on the tensor
# cores: same time at M = 16 and 64). H100, kernel_h100_s10_ws64b2_tiles.json, the 10 large
# layers, fp16: ws64b2 / ws64 / w64x / s32m 1.70 / 1.41 / 1.64 / 1.82x cuBLAS at M = 32, 1.66 /
# 1.39 / 1.54 / 1.14 at 64, 0.99 / 0.78 / 0.92 at 96 (ws128 1.27) -> ws64b2 from M = 33 to 64 on
# the large layers; bf16 ws64b2 1.40 against w64x 1.55 at 64, and on the small layers ws64b2
# ties ws64 (0.99 / 1.01 at 64): both keep their plans.
# Session 12: the ws tiles share out a partial wave by stream-K (csrc/quick_stream_k.cuh), which
# pays most where a layer has few column blocks. H100, benchmarks/results/
# kernel_h100_s12_small_layers_tiles.json, the 2 small layers, x cuBLAS at M = 48 / 64: fp16
# ws64b2 1.24 / 1.21 against ws64 1.20 / 1.17, bf16 1.03 / 1.01 against 1.02 / 0.98 -> ws64b2
# from M = 33 to 64 there too; bf16 ws256 0.63 / 0.68 / 0.73 against ws128 0.54 / 0.64 / 0.69 at
# M = 160 / 192 / 256 -> ws256 from M = 129 (fp16 already).
SMALL_LAYER_ELEMENTS = 4096 * 6144
# Since session 16 the small layers' measured plan is PLANS' (ws8 from M = 1, see there), so no
# family has a small-layer plan of its own; the table stays for the next measurement that differs.
SMALL_LAYER_PLANS: dict[int, dict[torch.dtype, Plan]] = {}
# Large layers (K x N >= LARGE_LAYER_ELEMENTS: Llama-2-13B's qkv 5120x15360 and up, e.g. the MLP
# gate_up projections) have enough work per block for ws128w4, ws128 with four consumer
# warpgroups over 256 columns (a ws128 block waits on its k-step chain; four warpgroups per SM
# hide twice as much of it). Session 12, H100, benchmarks/results/kernel_h100_s12_ws128w4_tiles.json,
# ws128 time / ws128w4 time at M = 80 / 96 / 112 / 128, geomean of the 6 large layers: fp16 1.16 /
# 1.16 / 1.12 / 1.12 (every layer 1.03-1.32), bf16 1.16 / 1.13 / 1.11 / 1.08 (0.99-1.29); below the
# threshold it ties or loses (13824x5120 0.97-1.04, 4096x12288 0.90-1.07). From M = 129 ws256 stays
# ahead (ws128w4 1.14-1.23x its time), and at M <= 64 ws64b2 (1.18-1.23x).
# Session 17 (H100, benchmarks/results/kernel_h100_s17_two_word_wgmma.json, 12 shapes, M = 40-128,
# fp16 and bf16, time over the best of ws64b2 / ws64w / ws128 / ws128w4 / ws128w, geomean per layer
# class): ws64w and ws128w, the wgmma tiles whose warps take two words per k-step (two wgmmas per
# k-step chain), win on the large layers only: ws64w 1.00-1.03 against ws64b2 1.07-1.08 at M = 40 /
# 48 / 64 (every large layer, fp16 1.01-1.13x faster), ws128w 1.00-1.02 against ws128w4 1.04-1.05
# at 96 / 128 (ws128w4 keeps 80: 1.01 against 1.03-1.06). The mid layers keep ws64b2 (ws64w
# 1.11-1.15: their narrow down projections lose) and ws128 (ws128w 1.03-1.04 against 1.01-1.04),
# the small ones the same (ws64w 1.13-1.16, ws128w 1.06). Then the ws tiles took a stage's weights by
# one 2-D TMA copy (kernel_h100_s17_weight_map.md: ws64b2 1.07x and ws128 1.12x faster at their M,
# ws64w 1.02x) and the same sweep again (kernel_h100_s17_tiles_weight_map.json): on the large layers
# ws64w 1.01-1.06 against ws64b2 1.04-1.06 at M = 40-64 (ahead at 48-64 by 1.5-4%, 1% behind at 40),
# ws128w 1.01-1.02 against ws128w4 1.02-1.05 at 96-128, ws128w4 1.00-1.01 at 80 -> the same plans.
# Session 19 (H100, kernel_h100_s19_small_m_tiles.md and kernel_h100_s19_ws16w_sched.md, fp16, M = 12
# and 16): ws16w, one warpgroup of two words per warp at four blocks per SM, beat ws16 on five of
# the six large layers (1.03-1.15x: 13824 .. 8192 x 57344), and on the sixth (4096 x 28672) once
# small_tile_schedule split its 224 tiles two ways (80% of the slots suffice at four blocks per SM:
# 28.3 against ws16's 30.7 us); on the small and mid layers ws16 stays (ws16w 0.93-1.04x) -> fp16's
# large layers take ws16w from M = 9 to 16 (bf16 not measured: ws16 stays).
LARGE_LAYER_ELEMENTS = 5120 * 15360
LARGE_LAYER_PLANS: dict[int, dict[torch.dtype, Plan]] = {
    9: {
        torch.float16: ((8, "ws8"), (16, "ws16w"), (32, "ws32w"), (64, "ws64w"), (80, "ws128w4"), (128, "ws128w"),
                        (192, "ws192"), (None, "ws256")),
        torch.bfloat16: ((8, "ws8"), (16, "ws16w"), (32, "ws32w"), (64, "ws64w"), (80, "ws128w4"), (128, "ws128w"),
                         (192, "ws192"), (None, "ws256")),
    },
}
# ws192 (session 20): ws256 with 192 tokens per block. H100, benchmarks/results/
# kernel_h100_s20_ws192_tiles.md (fp16 g128, 12 shapes, M = 144-4096; the op as it was, ws256 with
# the row split, against ws192 at every M), op time / ws192 time per layer class:
#   M = 144 / 160 / 192 (one row block of 192 against one of 256): 1.19-1.59 / 1.15-1.42 /
#     1.07-1.30 on every layer -> ws192 from M = 129 to 192 on all of them;
#   M = 288 / 320 / 384 (two blocks of 192 against ws256 + the row split, or two of 256): the small
#     and mid layers 0.91-1.30 / 1.04-1.41 / 1.09-1.29 (llama2-7b.qkv at 288 the one loss), the
#     large ones 0.85-1.10 -> ws192 up to M = 384 below LARGE_LAYER_ELEMENTS;
#   M = 527 / 575 (three blocks of 192 against two of 256 + the row split: vLLM's mixed steps at
#     concurrency 16 and 64): small and mid layers 1.03-1.16 / 1.05-1.18, large ones 0.85-1.17 ->
#     ws192 up to M = 576 below LARGE_LAYER_ELEMENTS;
#   where ws192 pads no less than ws256 (M = 224-256, 400-512, 640-768) or at M >= 1024 it loses
#     (0.62-0.97 in geomean): ws256 stays.
# Then the plans with ws192 against the same plans without it, both dtypes (kernel_h100_s20_ws192_plan.md,
# op time without / with, geomean of the six small and mid layers, fp16 / bf16): M = 129-192
# 1.17-1.36 / 1.17-1.33 (all 12 shapes); 288 / 320 / 384 1.10 / 1.14 / 1.18 and 1.10 / 1.21 / 1.19;
# 575 / 576 1.08 / 1.09 and 1.18 / 1.17; but where the row split leaves ws256 only a few rows, ws192's
# padded third of a block costs more: 257 0.96 / 0.98, 513 0.99 / 1.01, 527 1.02 / 1.04 (Llama-3-8B's
# qkv and down 0.94-0.99) -> ws256 with the row split keeps M = 257-272 and 513-528 (a rest of up to
# 16 rows). ws192 rows split the same way (two blocks + the rest) lost (0.81-1.10, estimated from the
# tiles' times). VLLM_QUICK_WS192=0 runs ws256 wherever a plan says ws192 (A/B switch, read on every
# call; bench variant quick_op_no192).
# bf16's large layers at M = 9-16 take ws16w like fp16's (kernel_h100_s20_bf16_ws16w.md: ws16 time
# / ws16w time 1.02 / 1.02 / 1.02 in geomean over the six large layers at M = 9 / 12 / 16,
# 0.98-1.05 per layer; the mid and small layers 0.89-0.99, so they keep ws16).
WS192_ENV = "VLLM_QUICK_WS192"
WS192_FALLBACK = "ws256"
# Families not measured yet: the kernel's own choice everywhere (always correct, maybe not fastest).
DEFAULT_PLAN: Plan = ((None, "auto"),)

_capability_cache: dict[int, int] = {}


def _major(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capability_cache:
        _capability_cache[index] = torch.cuda.get_device_capability(index)[0]
    return _capability_cache[index]


PLAN_ENV = "VLLM_QUICK_DISPATCH_PLAN"
# The dequantise + cuBLAS paths (ops.py): dequant_matmul, and fp16_matmul_for_bf16 for bf16.
DEQUANT_PATHS = ("dequant", "dequant_fp16")
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_plan_spec(text: str) -> dict[torch.dtype, Plan]:
    """``"float16=16:x16,*:dequant;bfloat16=*:x64"`` -> {dtype: plan}; ValueError naming the
    problem otherwise."""
    plans: dict[torch.dtype, Plan] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, entries = part.partition("=")
        if not sep or name.strip() not in _DTYPE_NAMES:
            raise ValueError(f"{PLAN_ENV}: {part!r} must look like 'float16=16:x16,*:dequant' "
                             f"(dtypes: {', '.join(_DTYPE_NAMES)})")
        plan: list[tuple[int | None, str]] = []
        for entry in entries.split(","):
            bound, sep, path = entry.strip().partition(":")
            if not sep or not path or (bound != "*" and not bound.isdigit()):
                raise ValueError(f"{PLAN_ENV}: entry {entry!r} must be '<max M>:<path>' or '*:<path>'")
            max_m = None if bound == "*" else int(bound)
            if plan and (plan[-1][0] is None or (max_m is not None and max_m <= plan[-1][0])):
                raise ValueError(f"{PLAN_ENV}: the bounds of {name} must increase and '*' must come last")
            plan.append((max_m, path))
        if plan[-1][0] is not None:
            raise ValueError(f"{PLAN_ENV}: the plan of {name} must end with '*:<path>'")
        plans[_DTYPE_NAMES[name.strip()]] = tuple(plan)
    return plans


_env_plans: dict[torch.dtype, Plan] | None = None


def plan_for(dtype: torch.dtype, device: torch.device, weight_elements: int | None = None) -> Plan:
    """The plan for ``dtype`` on ``device``; ``weight_elements`` (K x N of the layer) selects the
    small- or large-layer plan where there is one. A plan from the environment applies to every
    layer."""
    global _env_plans
    if _env_plans is None:
        _env_plans = parse_plan_spec(os.environ.get(PLAN_ENV, ""))
    if dtype in _env_plans:
        return _env_plans[dtype]
    major = _major(device)
    if weight_elements is not None:
        by_size = (SMALL_LAYER_PLANS if weight_elements <= SMALL_LAYER_ELEMENTS
                   else LARGE_LAYER_PLANS if weight_elements >= LARGE_LAYER_ELEMENTS else {})
        sized = by_size.get(major, {}).get(dtype)
        if sized is not None:
            return sized
    return PLANS.get(major, {}).get(dtype, DEFAULT_PLAN)


def format_plan_spec(plans: dict[torch.dtype, Plan]) -> str:
    """The inverse of parse_plan_spec (for dispatch_table.py)."""
    names = {v: k for k, v in _DTYPE_NAMES.items()}
    return ";".join(
        names[dtype] + "=" + ",".join(f"{'*' if m is None else m}:{path}" for m, path in plan)
        for dtype, plan in plans.items()
    )


def describe(dtype: torch.dtype, device: torch.device) -> str:
    """One line saying what ``quick::gemm`` will run for ``dtype`` activations on ``device`` (for the
    log, once per model)."""
    from vllm_quick import ops

    if device.type != "cuda":
        return f"{device.type}: reference path (fp32 dequantise + matmul)"
    if ops.kernel_extension() is None:
        return ("CUDA without the compiled extension vllm_quick._C: reference path (slow); build it with "
                "`pip install --no-build-isolation -e .` on a machine with nvcc")
    name = torch.cuda.get_device_name(device)
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{name}: {dtype} activations take the reference path (the kernel takes fp16 and bf16)"
    plan = plan_for(dtype, device)
    from_env = bool(_env_plans and dtype in _env_plans)
    source = ("from " + PLAN_ENV if from_env
              else "measured" if _major(device) in PLANS else "not measured on this GPU family")
    text = f"{name} (sm{_major(device)}x), {str(dtype).removeprefix('torch.')}: " + _describe_plan(plan)
    small = None if from_env else SMALL_LAYER_PLANS.get(_major(device), {}).get(dtype)
    if small is not None:
        text += f"; layers of K x N <= {SMALL_LAYER_ELEMENTS}: " + _describe_plan(small)
    large = None if from_env else LARGE_LAYER_PLANS.get(_major(device), {}).get(dtype)
    if large is not None:
        text += f"; layers of K x N >= {LARGE_LAYER_ELEMENTS}: " + _describe_plan(large)
    shown = [plan] + [p for p in (small, large) if p is not None]
    if os.environ.get(ROW_SPLIT_ENV) != "0" and any(path == ROW_SPLIT_TILE for p in shown for _, path in p):
        text += (f"; M = {ROW_SPLIT_BLOCK_M} q + r with 0 < r <= {ROW_SPLIT_MAX_REST} ({ROW_SPLIT_MAX_REST_LARGE} on "
                 f"the large layers) on {ROW_SPLIT_TILE}: the last r rows on the plan's tile for M = r")
    return text + f" ({source})"


def _describe_plan(plan: Plan) -> str:
    ranges, low = [], 1
    for max_m, path in plan:
        what = {"dequant": "dequantise + cuBLAS", "dequant_fp16": "dequantise to fp16 + fp16 cuBLAS",
                "auto": "the kernel's own tile choice"}.get(path, f"tile {path}")
        if fp16_tile_of(path) is not None:
            what = f"scaled into fp16, tile {fp16_tile_of(path)}"
        span = f"M >= {low}" if max_m is None else f"M {low}-{max_m}"
        ranges.append(f"{span}: {what}")
        low = (max_m or 0) + 1
    return "; ".join(ranges)


def choose(m: int, dtype: torch.dtype, device: torch.device, weight_elements: int | None = None) -> str:
    """The path for a call with M rows (on a K x N = ``weight_elements`` layer, when given):
    ``"dequant"``, a tile name, or ``"auto"``."""
    for max_m, path in plan_for(dtype, device, weight_elements):
        if max_m is None or m <= max_m:
            return WS192_FALLBACK if path == "ws192" and os.environ.get(WS192_ENV) == "0" else path
    return "auto"  # a plan without a final (None, ...) entry: let the kernel choose


def choose_path(m: int, dtype: torch.dtype, device: torch.device, weight_elements: int | None = None) -> str:
    """``"kernel"`` or ``"dequant"`` (either dequantise + cuBLAS path) for a call with M rows."""
    return "dequant" if choose(m, dtype, device, weight_elements) in DEQUANT_PATHS else "kernel"


# Row split (session 19). ws256, the plans' tile beyond M = 128 (beyond 192 since session 20, where
# ws192 does not pad less), computes 256 rows per block, so a
# call of M = 256 q + r rows with a small remainder r pays a whole row block of tensor-core work for
# r rows: on the H100 at M = 384 it ran at 0.64-0.83x cuBLAS where it runs 0.86-1.40x at 256 and 512
# (benchmarks/results/kernel_h100_s19_large_m_tiles.md). vLLM's mixed steps hit exactly that: a
# 512-token prefill chunk beside the running decodes is M = 527 at concurrency 16 and 575 at 64,
# and such steps take most of a serving run's GEMM time. So for a small r the op computes rows
# [0, M - r) with ws256 and the last r rows with the plan's tile for M = r: one more pass over the
# int4 weights (at that M the tile streams them) instead of the padded row block. Measured with and
# without it on the 12 shapes (kernel_h100_s19_row_split.md, fp16 g128): r <= 64 (M = 272, 320,
# 527, 575, 1088, 2112) 1.06-1.40x faster in geomean, the worst shape 0.97x; r = 128 (M = 384,
# 640) 1.02-1.27x on the large layers but down to 0.77x on the small ones, whose padded row block
# runs beside the others in a wave that does not fill the GPU anyway. Hence r <= 64 on every layer,
# r <= 128 on layers of K x N >= LARGE_LAYER_ELEMENTS. VLLM_QUICK_ROW_SPLIT=0 turns it off (A/B
# switch, read on every call).
ROW_SPLIT_TILE = "ws256"
ROW_SPLIT_BLOCK_M = 256
ROW_SPLIT_MAX_REST = 64
ROW_SPLIT_MAX_REST_LARGE = 128
ROW_SPLIT_ENV = "VLLM_QUICK_ROW_SPLIT"


def row_split(m: int, path: str, dtype: torch.dtype, device: torch.device,
              weight_elements: int | None = None) -> tuple[int, str] | None:
    """``(rows, rest_path)`` when a call of M rows planned on ``path`` should run rows [0, rows) on
    it and the other M - rows on the kernel tile ``rest_path`` (the plan's for that many rows);
    None to run the call whole."""
    if path != ROW_SPLIT_TILE or m <= ROW_SPLIT_BLOCK_M or os.environ.get(ROW_SPLIT_ENV) == "0":
        return None
    rest = m % ROW_SPLIT_BLOCK_M
    large = weight_elements is not None and weight_elements >= LARGE_LAYER_ELEMENTS
    if rest == 0 or rest > (ROW_SPLIT_MAX_REST_LARGE if large else ROW_SPLIT_MAX_REST):
        return None
    rest_path = choose(rest, dtype, device, weight_elements)
    if rest_path in DEQUANT_PATHS or rest_path in ("auto", path) or fp16_tile_of(rest_path) is not None:
        return None
    return m - rest, rest_path


# "fp16:<tile>": bf16 activations moved exactly into fp16 (a power-of-two scale, as for
# dequant_fp16) and through an fp16-only tile (ops.kernel_fp16_for_bf16): bf16's way into ws256.
FP16_VIA = "fp16:"


def fp16_tile_of(path: str) -> str | None:
    """The fp16 tile of an ``"fp16:<tile>"`` path, else None."""
    return path[len(FP16_VIA):] if path.startswith(FP16_VIA) else None


_tile_index: dict[str, int] = {}


def tile_index(name: str, tiles) -> int:
    """Index of tile ``name`` in the extension's ``TILES`` list; ``"auto"`` is -1."""
    if not _tile_index:
        _tile_index.update({t: i for i, t in enumerate(tiles)}, auto=-1)
    if name not in _tile_index:
        raise ValueError(f"quick::gemm: unknown kernel tile {name!r} (known: {sorted(_tile_index)})")
    return _tile_index[name]
