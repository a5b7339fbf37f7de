#!/usr/bin/env python3
"""Put the kernel issue's targets beside a kernel_bench.py result (fp16 and bf16, one group size).

    python benchmarks/targets.py benchmarks/results/kernel_h100.json [--group-size 128]

Prints a Markdown table, one line per target and M: the range over the shapes, the geometric
mean, and how many shapes meet it. The targets (issue 4):

* the op (``quick``) >= 3.0x fp16 cuBLAS for M <= 16;
* >= 1.2x the faster of Marlin and Machete for every M <= 128;
* never below 0.97x fp16 cuBLAS at any M;
* bf16 within 5% of fp16 (the op's bf16 time / its fp16 time <= 1.05, same shape and M).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _ratios(rows: list[dict], group_size: int) -> dict[str, dict[int, list[float]]]:
    """{target name: {M: [ratio per shape]}} for the rows that have the needed timings."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    fp16 = {}
    for r in rows:
        if r["group_size"] != group_size:
            continue
        us = r["us"]
        quick, cublas = us.get("quick"), us.get("cublas")
        if not quick:
            continue
        m = r["M"]
        if r["dtype"] == "float16":
            fp16[(r["shape"], m)] = quick
            if cublas:
                out["vs cuBLAS"][m].append(cublas / quick)
            best = min((us[b] for b in ("marlin", "machete") if us.get(b)), default=None)
            if best:
                out["vs best(Marlin, Machete)"][m].append(best / quick)
    for r in rows:
        if r["group_size"] == group_size and r["dtype"] == "bfloat16" and r["us"].get("quick"):
            base = fp16.get((r["shape"], r["M"]))
            if base:
                out["bf16 time / fp16 time"][r["M"]].append(r["us"]["quick"] / base)
    return out


# target name -> (goal, "ge" | "le", the M it applies to)
TARGETS = {
    "vs cuBLAS": (3.0, "ge", lambda m: m <= 16),
    "vs best(Marlin, Machete)": (1.2, "ge", lambda m: m <= 128),
    "vs cuBLAS (floor)": (0.97, "ge", lambda m: True),
    "bf16 time / fp16 time": (1.05, "le", lambda m: True),
}


def table(rows: list[dict], group_size: int = 128) -> str:
    ratios = _ratios(rows, group_size)
    lines = ["| target | M | range over shapes | geomean | shapes meeting it |", "|---|---:|---|---:|---:|"]
    for name, (goal, sense, applies) in TARGETS.items():
        source = ratios.get(name.replace(" (floor)", ""), {})
        for m in sorted(source):
            if not applies(m):
                continue
            vals = source[m]
            met = sum(v >= goal if sense == "ge" else v <= goal for v in vals)
            rel = ">=" if sense == "ge" else "<="
            lines.append(f"| {name} {rel} {goal:g} | {m} | {min(vals):.2f}-{max(vals):.2f} | "
                         f"{_geomean(vals):.2f} | {met} of {len(vals)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("json", type=Path, help="a kernel_bench.py result (kernel_<gpu>.json)")
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    print(table(json.loads(args.json.read_text()), args.group_size))


if __name__ == "__main__":
    main()
