#!/usr/bin/env python3
"""Summarise an Nsight Compute source-page CSV: the SASS instructions with the most stall samples.

``ncu --import report.ncu-rep --page source --csv --print-source sass > source.csv`` writes one row
per SASS instruction with its warp-stall sampling counters. This prints, per kernel, the total
samples by stall reason and the ``--top`` instructions that collected the most samples, each
with its three largest reasons -- where a kernel waits, instruction by instruction::

    python benchmarks/ncu_source_summary.py source.csv --top 30
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def split_kernels(text: str) -> list[tuple[str, list[dict[str, str]]]]:
    """The CSV holds one table per kernel, each after a line naming the kernel (no comma-quoted
    header); a table starts at a line beginning with '"#"' or '"Address"'."""
    blocks: list[tuple[str, list[str]]] = []
    name = "kernel"
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith('"#"') or line.startswith('"Address"'):
            current = [line]
            blocks.append((name, current))
        elif line.startswith('"') and current is not None:
            current.append(line)
        elif line.strip():
            name, current = line.strip(), None
    return [(n, list(csv.DictReader(io.StringIO("\n".join(rows))))) for n, rows in blocks]


def summarise(name: str, rows: list[dict[str, str]], top: int) -> None:
    if not rows:
        return
    columns = list(rows[0])
    source = next((c for c in columns if c.lower() == "source"), columns[1])
    total_col = next((c for c in columns if "Warp Stall Sampling (All" in c), None)
    reasons = [c for c in columns if c.startswith("stall_") or c.lower().startswith("smsp__pcsamp")]
    if total_col is None:
        print(f"== {name}: no 'Warp Stall Sampling' column; columns: {columns[:20]}")
        return
    totals = Counter()
    for row in rows:
        for c in reasons:
            totals[c] += _number(row.get(c, "")) or 0.0
    all_samples = sum(_number(r.get(total_col, "")) or 0.0 for r in rows)
    print(f"== {name}\n   {len(rows)} instructions, {all_samples:.0f} samples")
    for c, v in totals.most_common(12):
        if v > 0:
            print(f"   {c:40s} {v:9.0f}  {100 * v / max(all_samples, 1):5.1f}%")
    ranked = sorted(rows, key=lambda r: _number(r.get(total_col, "")) or 0.0, reverse=True)[:top]
    for row in ranked:
        samples = _number(row.get(total_col, "")) or 0.0
        why = sorted(((_number(row.get(c, "")) or 0.0, c) for c in reasons), reverse=True)[:3]
        why_text = ", ".join(f"{c.removeprefix('stall_')}={v:.0f}" for v, c in why if v > 0)
        where = row.get("Address", row.get("#", ""))
        print(f"   {samples:7.0f} {100 * samples / max(all_samples, 1):5.1f}%  {where:>6s}  {row[source][:60]:60s} {why_text}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    p.add_argument("--top", type=int, default=30, help="instructions to list per kernel")
    args = p.parse_args()
    with open(args.csv, encoding="utf-8", errors="replace") as f:
        text = f.read()
    kernels = split_kernels(text)
    if not kernels:
        print(text[:3000])
        return 1
    for name, rows in kernels:
        summarise(name, rows, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
