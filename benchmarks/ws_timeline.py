#!/usr/bin/env python3
"""Where the time of a ws-tile call goes: the phases of every block, from a diagnostic build.

Needs ``vllm_quick._C`` built with ``QUICK_NVCC_FLAGS=-DQUICK_WS_TIMELINE`` (csrc/quick_gemm_ws.cuh,
timeline_mark): each block of a ws launch then records, in launch slot VLLM_QUICK_WS_TIMELINE_SLOT,
when it started, when its producer got past the wait for the previous kernel and issued its last
copy, when its consumers saw the first stage, finished the K loop and finished the epilogue
(%globaltimer, one clock for the GPU, plus its SM's clock64). A case runs the plan's tile at M as a
CUDA graph of 8 back-to-back calls over rotated weight copies (as kernel_bench.py times them), each
call recording into its own slot, replays it, and reads the last replay. Per call after the first
(median over calls 1-7), in microseconds:

  period       start of this call's first block to the next call's
  gap          previous call's last block end -> this call's first block start (< 0: overlap, PDL)
  launch       first -> last block start
  wait         block start -> producer past the dependency wait (median block)
  first data   producer past the wait -> first stage landed (median block)
  loop         first stage landed -> K loop done (median block; max in brackets)
  epilogue     K loop done -> block done (median; max: the owners' wait for their pieces)
  tail         median block end -> last block end
  fixup        shared tiles: the last of a tile's K loops done -> its owner done (median; max)
  stream TB/s  the layer's int4 bytes over (median loop end - min first data)

    python benchmarks/ws_timeline.py --cases 4096x12288:1,4096x12288:16 [--dtype float16] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import torch

SLOTS = 8  # csrc/quick_gemm.h, kTimelineSlots
START, WAITED, ISSUED, FIRST_DATA, LOOP_DONE, END = range(6)  # WsTimelineEvent
DEFAULT_CASES = ("4096x4096:1,4096x4096:16,4096x12288:1,4096x12288:16,4096x12288:64,4096x28672:1,4096x28672:16,"
                 "14336x4096:1,14336x4096:16,8192x57344:1")


def make_copies(k: int, n: int, group: int, copies: int, dtype: torch.dtype, seed: int = 0):
    """`copies` random QUICK weights (qweight, qzeros, scales) on the GPU, made as kernel_bench.py
    makes them (its random_weight, then the quick backend's repack)."""
    from kernel_bench import random_weight
    from vllm_kernels import QuickBackend

    gen = torch.Generator(device="cuda").manual_seed(seed)
    quick = QuickBackend()
    out = []
    for _ in range(copies):
        w = quick.prepare(*random_weight(k, n, group, gen, "cuda"), group, dtype).weights
        out.append((w["qweight"], w["qzeros"], w["scales"]))
    return out


def tile_pieces(plan: dict, stages: int) -> dict[int, list[int]]:
    """Blocks per output tile in K order (the first is the owner), as ws_block_work cuts them
    (csrc/quick_stream_k.cuh): whole tiles for blocks below dp_blocks, then the stream-K shares."""
    dp, sk_tiles, sk_blocks = plan["dp_blocks"], plan["sk_tiles"], plan["sk_blocks"]
    units = sk_tiles * stages
    tiles: dict[int, list[tuple[int, int]]] = {b: [(0, b)] for b in range(dp)}
    for i in range(sk_blocks):
        u, end = i * units // sk_blocks, (i + 1) * units // sk_blocks
        while u < end:
            t = u // stages
            tiles.setdefault(dp + t, []).append((u - t * stages, dp + i))
            u = min(end, (t + 1) * stages)
    return {t: [b for _, b in sorted(p)] for t, p in tiles.items()}


def phases(tl: torch.Tensor, blocks: int, call: int, next_start: float | None, prev_end: float | None,
           layer_bytes: int, pieces: dict[int, list[int]] | None = None) -> dict:
    """One call's phases (us) from its slot of the timeline (globaltimer ns)."""
    t = tl[call, :blocks, :].double()
    start, waited, first, loop_done, end = (t[:, e] / 1000 for e in (START, WAITED, FIRST_DATA, LOOP_DONE, END))
    med = lambda v: float(v.median())
    row = {
        "launch": float(start.max() - start.min()),
        "wait": med(waited - start),
        "first_data": med(first - waited),
        "loop": med(loop_done - first),
        "loop_max": float((loop_done - first).max()),
        "epilogue": med(end - loop_done),
        "epilogue_max": float((end - loop_done).max()),
        "tail": float(end.max() - end.median()),
        "span": float(end.max() - start.min()),
        "stream_tb_s": layer_bytes / max(1e-9, med(loop_done) - float(first.min())) / 1e6,
        "sms": int(tl[call, :blocks, 7].unique().numel()),
    }
    # Shared tiles: the owner's end after the last of its tile's K loops (the fix-up's latency).
    fixups = [float(end[bs[0]] - loop_done[bs].max()) for bs in (pieces or {}).values() if len(bs) > 1]
    if fixups:
        row["fixup"] = statistics.median(fixups)
        row["fixup_max"] = max(fixups)
    if prev_end is not None:
        row["gap"] = float(start.min()) - prev_end
    if next_start is not None:
        row["period"] = next_start - float(start.min())
    # clock64 per block over the block's globaltimer life: the SM clock (GHz)
    cycles = (t[:, 8 + END] - t[:, 8 + START]).clamp(min=1)
    ns = (t[:, END] - t[:, START]).clamp(min=1)
    row["sm_ghz"] = med(cycles / ns)
    return row


def run_case(ext, k: int, n: int, m: int, dtype: torch.dtype, group: int, replays: int) -> dict:
    from vllm_quick import dispatch, ops

    tile = dispatch.choose(m, dtype, torch.device("cuda", torch.cuda.current_device()), weight_elements=k * n)
    tile = tile.split(":")[-1]
    if tile not in ext.TILES or not tile.startswith("ws"):
        return {"case": f"{k}x{n}:{m}", "skipped": f"the plan's path is {tile!r}, not a ws tile"}
    index = list(ext.TILES).index(tile)
    plan = ext.plan(m, k, n, group, dtype == torch.bfloat16, index)
    layer_bytes = k * n // 2
    copies = max(2, min(SLOTS, math.ceil(2 * 50e6 / layer_bytes)))
    weights = make_copies(k, n, group, copies, dtype)
    x = torch.randn((m, k), device="cuda", dtype=dtype)
    os.environ.pop("VLLM_QUICK_WS_TIMELINE_SLOT", None)
    for w in weights:  # warm-up, unrecorded
        ops.kernel_gemm(x, *w, None, group, n, index)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(SLOTS):
            os.environ["VLLM_QUICK_WS_TIMELINE_SLOT"] = str(i)
            ops.kernel_gemm(x, *weights[i % copies], None, group, n, index)
    os.environ.pop("VLLM_QUICK_WS_TIMELINE_SLOT", None)
    graph.replay()
    torch.cuda.synchronize()
    begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    finish.record()
    torch.cuda.synchronize()
    us_per_call = begin.elapsed_time(finish) * 1000 / replays / SLOTS
    tl = ext.ws_timeline()
    blocks = plan["blocks"]
    pieces = tile_pieces(plan, k // 64)  # the same launch plan for every call
    calls = []
    for c in range(1, SLOTS):
        prev_end = float(tl[c - 1, :blocks, END].double().max()) / 1000
        next_start = float(tl[c + 1, :blocks, START].double().min()) / 1000 if c + 1 < SLOTS else None
        calls.append(phases(tl, blocks, c, next_start, prev_end, layer_bytes, pieces))
    keys = set().union(*(c.keys() for c in calls))
    summary = {key: statistics.median(c[key] for c in calls if key in c) for key in keys}
    stamps = tl[1:, :blocks, :6].flatten().unique()  # sorted: the smallest step is the timer's resolution
    resolution = int((stamps[1:] - stamps[:-1]).min()) if stamps.numel() > 1 else None
    return {"case": f"{k}x{n}:{m}", "tile": tile, "blocks": blocks, "plan": plan, "us_per_call": us_per_call,
            "median": summary, "calls": calls, "resolution_ns": resolution,
            "raw_ns_call1": tl[1, :blocks, :8].tolist()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma list of KxN:M")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--out", default=None, help="write the cases (with every call's phases) as JSON here")
    args = ap.parse_args()
    from vllm_quick import ops

    ext = ops.kernel_extension()
    if ext is None or not hasattr(ext, "ws_timeline") or ext.ws_timeline() is None:
        print("vllm_quick._C is not a timeline build: rebuild with QUICK_NVCC_FLAGS=-DQUICK_WS_TIMELINE")
        return 2
    dtype = getattr(torch, args.dtype)
    rows = []
    cols = ("period", "gap", "launch", "wait", "first_data", "loop", "loop_max", "epilogue", "epilogue_max", "tail",
            "fixup", "fixup_max", "stream_tb_s", "sm_ghz")
    print(f"{'case':>16} {'tile':>7} {'blocks':>6} {'us/call':>8} " + " ".join(f"{c:>12}" for c in cols))
    for spec in args.cases.split(","):
        shape, m = spec.split(":")
        k, n = (int(v) for v in shape.split("x"))
        row = run_case(ext, k, n, int(m), dtype, args.group_size, args.replays)
        rows.append(row)
        if "skipped" in row:
            print(f"{row['case']:>16} skipped: {row['skipped']}")
            continue
        med = row["median"]
        print(f"{row['case']:>16} {row['tile']:>7} {row['blocks']:>6} {row['us_per_call']:8.2f} "
              + " ".join(f"{med.get(c, float('nan')):12.2f}" for c in cols), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
