"""The CPU-side logic of benchmarks/kernel_bench.py: argument handling, the per-case backend
order, the Markdown report and merging result files (timing itself needs a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import kernel_bench as kb  # noqa: E402
import vllm_kernels as vk  # noqa: E402


def test_backend_order_rotates_one_place_per_case():
    backends = ["quick_s16", "quick", "cublas", "marlin"]
    orders = [kb.backend_order(backends, i, rotate=True) for i in range(4)]
    assert orders[1] == ["quick", "cublas", "marlin", "quick_s16"]
    # every backend comes first exactly once over len(backends) cases, and none is lost
    assert sorted(o[0] for o in orders) == sorted(backends)
    assert all(sorted(o) == sorted(backends) for o in orders)
    assert kb.backend_order(backends, 3, rotate=False) == backends


def test_tile_backends_exist_for_every_kernel_tile():
    names = [f"quick_{t}" for t in vk.KERNEL_TILES]
    args = kb.parse_args(["--backends", ",".join(names + ["quick_dequant", "cublas"]), "--dtypes", "float16"])
    assert args.backends[: len(names)] == names
    assert args.rotate_order is True
    assert kb.parse_args(["--no-rotate-order"]).rotate_order is False
    # scaled tiles refuse bf16 by themselves (the sweep records why instead of failing)
    reason = vk.BACKENDS["quick_s64"].unsupported(4096, 4096, 128, kb.DTYPES["bfloat16"])
    assert reason and "fp16 only" in reason


def test_unknown_backend_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        kb.parse_args(["--backends", "quick_y7"])
    assert "unknown backends" in capsys.readouterr().err


def _row(m, us, order=None):
    row = kb.new_row("llama2-7b.o", 4096, 4096, m, 128, "float16", list(us))
    row["us"].update(us)
    if order:
        row["order"] = order
    return row


def test_markdown_lists_tile_columns_and_speedups():
    rows = [_row(16, {"quick": 10.0, "quick_s16": 9.0, "cublas": 30.0, "marlin": 12.0, "machete": 15.0})]
    text = kb.render_markdown(rows, {"gpu": "test"}, header=False)
    head = next(line for line in text.splitlines() if line.startswith("| shape"))
    assert "quick_s16" in head
    body = next(line for line in text.splitlines() if line.startswith("| llama2-7b.o"))
    assert "3.00x" in body  # cuBLAS 30 / quick 10
    assert body.rstrip().endswith("1.20x |")  # best(marlin, machete) 12 / quick 10


def test_merge_keeps_the_later_file_for_the_same_case(tmp_path):
    a, b = tmp_path / "kernel_h100.json", tmp_path / "kernel_h100_part2.json"
    a.write_text(json.dumps([_row(1, {"quick": 5.0}), _row(16, {"quick": 7.0})]))
    b.write_text(json.dumps([_row(16, {"quick": 6.0})]))
    out = tmp_path / "out"
    assert kb.main(["--merge", str(a), str(b), "--out-dir", str(out)]) == 0
    merged = {r["M"]: r["us"]["quick"] for r in json.loads((out / "kernel_h100.json").read_text())}
    assert merged == {1: 5.0, 16: 6.0}
    assert "merged from" in (out / "kernel_h100.md").read_text()


def test_targets_table_counts_shapes_meeting_each_target():
    import targets

    def row(shape, m, dtype, **us):
        return {"shape": shape, "M": m, "group_size": 128, "dtype": dtype, "us": us}

    rows = [
        row("a", 16, "float16", quick=10.0, cublas=35.0, marlin=13.0, machete=11.0),  # 3.5x, 1.1x best
        row("b", 16, "float16", quick=10.0, cublas=20.0, marlin=15.0, machete=None),  # 2.0x, 1.5x
        row("a", 16, "bfloat16", quick=10.4),  # 1.04x the fp16 time: meets the 5% target
        row("b", 16, "bfloat16", quick=12.0),  # 1.2x: misses it
        row("a", 16, "float16", quick=1.0, cublas=1.0) | {"group_size": 64},  # another group: ignored
    ]
    table = targets.table(rows)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert "| 16 | 2.00-3.50 | 2.65 | 1 of 2 |" in lines["vs cuBLAS >= 3"]
    assert "| 16 | 1.10-1.50 |" in lines["vs best(Marlin, Machete) >= 1.2"]
    assert lines["vs best(Marlin, Machete) >= 1.2"].endswith("| 1 of 2 |")
    assert lines["vs cuBLAS (floor) >= 0.97"].endswith("| 2 of 2 |")
    assert "| 1.04-1.20 |" in lines["bf16 time / fp16 time <= 1.05"]
    assert lines["bf16 time / fp16 time <= 1.05"].endswith("| 1 of 2 |")
