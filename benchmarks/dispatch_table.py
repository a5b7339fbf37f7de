"""Suggest ``vllm_quick.dispatch.DEQUANT_MIN_M`` from a kernel_bench.py result.

    python benchmarks/dispatch_table.py benchmarks/results/kernel_h100.json

Needs rows timed with both of the op's paths (``--backends quick_kernel,quick_dequant,...`` or
``--quick-only``). For each activation dtype it prints, per M, on how many shapes the
dequantise + cuBLAS path beats the kernel, and the smallest M from which it wins on most shapes
at that M and every larger M measured (``None``: never). Copy the result into the table in
vllm_quick/dispatch.py together with the GPU and date of the run.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def suggest(rows: list[dict]) -> dict[str, int | None]:
    """dtype -> smallest M from which dequant + cuBLAS wins on a majority of shapes."""
    wins: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        kernel, dequant = r["us"].get("quick_kernel"), r["us"].get("quick_dequant")
        if kernel is not None and dequant is not None:
            wins[r["dtype"]][r["M"]].append(dequant < kernel)
    table: dict[str, int | None] = {}
    for dtype, by_m in wins.items():
        threshold = None
        for m in sorted(by_m, reverse=True):  # walk down while dequant keeps winning
            if sum(by_m[m]) * 2 > len(by_m[m]):
                threshold = m
            else:
                break
        table[dtype] = threshold
        for m in sorted(by_m):
            print(f"{dtype:9s} M={m:5d}: dequant + cuBLAS faster on {sum(by_m[m])}/{len(by_m[m])} shapes")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="kernel_<gpu>.json written by benchmarks/kernel_bench.py")
    args = ap.parse_args(argv)
    table = suggest(json.load(open(args.result)))
    if not table:
        print("no row has both quick_kernel and quick_dequant timings: rerun kernel_bench.py with them")
        return 1
    print("suggested DEQUANT_MIN_M:", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
