"""Suggest ``vllm_quick.dispatch.PLANS`` from a kernel_bench.py result.

    python benchmarks/dispatch_table.py benchmarks/results/kernel_h100_tiles.json
    python benchmarks/dispatch_table.py --spec RESULT.json   # only the VLLM_QUICK_DISPATCH_PLAN string

Needs rows timed with the op's candidate paths: the kernel tiles (``--backends quick_x16,...,
quick_s128``) and dequantise + cuBLAS (``quick_dequant``). For each activation dtype and M it
scores every candidate by the geometric mean, over the shapes, of its time divided by the best
candidate's time on that shape (1.0 = fastest everywhere), and picks the lowest score. A
candidate must have been timed on every shape at that M, within MAX_REL_ERR, to compete. bf16 never gets the dequant
path (a dense bf16 weight costs ~2.3e-3 of error, over the 2e-3 budget; vllm_quick/dispatch.py).

The plan covers M up to each measured M with that M's winner (M = 17..32 takes the winner at 32),
and everything above the largest measured M with the winner there. Copy the printed plan into
vllm_quick/dispatch.py with the GPU and date of the run, or export the printed spec as
VLLM_QUICK_DISPATCH_PLAN to try it first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.vllm_kernels import KERNEL_TILES  # noqa: E402
from vllm_quick import dispatch  # noqa: E402

TILE_PREFIX = "quick_"
# A path whose error on a row exceeds this is not a candidate there, however fast (the GPU tests'
# budget is 2e-3; bf16 gets the margin of its output rounding, ~1.6e-3 on its own).
MAX_REL_ERR = {"float16": 2e-3, "bfloat16": 2.5e-3}


def candidates(row: dict) -> dict[str, float]:
    """path -> µs for one result row: tiles from quick_<tile>, 'dequant' from quick_dequant (fp16),
    'dequant_fp16' from quick_dequant_fp16 and 'fp16:<tile>' from quick_fp16_<tile> (bf16); only
    paths that were timed and, where the row records it, within MAX_REL_ERR."""
    dtype, us, errs = row["dtype"], row.get("us", {}), row.get("rel_err_backends", {})
    limit = MAX_REL_ERR.get(dtype, 2e-3)

    def ok(backend: str) -> bool:
        err = errs.get(backend)
        return us.get(backend) is not None and (err is None or err <= limit)

    # quick_<tile> only: not the op, not the plan-setting variants (quick_<tile>_<variant>)
    out = {b[len(TILE_PREFIX):]: us[b] for b in us
           if b.startswith(TILE_PREFIX) and b[len(TILE_PREFIX):] in KERNEL_TILES and ok(b)}
    if ok("quick_dequant") and dtype != "bfloat16":
        out["dequant"] = us["quick_dequant"]
    if ok("quick_dequant_fp16") and dtype == "bfloat16":
        out["dequant_fp16"] = us["quick_dequant_fp16"]
    if dtype == "bfloat16":  # bf16 through an fp16 tile: quick_fp16_<tile> -> "fp16:<tile>"
        via = TILE_PREFIX + dispatch.FP16_VIA.rstrip(":") + "_"
        out.update({dispatch.FP16_VIA + b[len(via):]: us[b] for b in us
                    if b.startswith(via) and b[len(via):] in KERNEL_TILES and ok(b)})
    return out


def scores(rows: list[dict]) -> dict[str, dict[int, dict[str, float]]]:
    """dtype -> M -> path -> geometric-mean slowdown against the per-shape best."""
    by: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    for r in rows:
        c = candidates(r)
        if c:
            by[(r["dtype"], r["M"])].append(c)
    out: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    for (dtype, m), shapes in by.items():
        common = set.intersection(*(set(c) for c in shapes))
        out[dtype][m] = {
            path: math.exp(sum(math.log(c[path] / min(c[p] for p in common)) for c in shapes) / len(shapes))
            for path in sorted(common)
        }
    return out


def suggest(rows: list[dict]) -> dict[str, tuple[tuple[int | None, str], ...]]:
    """dtype -> plan, in the form of vllm_quick.dispatch.PLANS."""
    plans = {}
    for dtype, by_m in scores(rows).items():
        winners = [(m, min(s, key=s.get)) for m, s in sorted(by_m.items()) if s]
        plan: list[tuple[int | None, str]] = []
        for m, path in winners:
            if plan and plan[-1][1] == path:
                plan[-1] = (m, path)  # extend the previous range
            else:
                plan.append((m, path))
        if plan:
            plan[-1] = (None, plan[-1][1])
            plans[dtype] = tuple(plan)
    return plans


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="kernel_<gpu>*.json written by benchmarks/kernel_bench.py")
    ap.add_argument("--spec", action="store_true", help="print only the VLLM_QUICK_DISPATCH_PLAN string")
    args = ap.parse_args(argv)
    rows = json.load(open(args.result))
    plans = suggest(rows)
    if not plans:
        print("no row has kernel-tile or dequant timings: rerun kernel_bench.py with "
              "--backends quick_x16,...,quick_s128,quick_dequant", file=sys.stderr)
        return 1
    spec = dispatch.format_plan_spec({getattr(torch, d): p for d, p in plans.items()})
    if args.spec:
        print(spec)
        return 0
    for dtype, by_m in sorted(scores(rows).items()):
        for m, s in sorted(by_m.items()):
            ranked = ", ".join(f"{p} {v:.2f}" for p, v in sorted(s.items(), key=lambda kv: kv[1]))
            print(f"{dtype:9s} M={m:5d}: {ranked}")
    for dtype, plan in plans.items():
        print(f"suggested plan for {dtype}: {plan}")
    print(f"as {dispatch.PLAN_ENV}: {spec}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
