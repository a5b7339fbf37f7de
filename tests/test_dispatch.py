"""The M-dispatch table and the script that derives it from benchmark results."""

from __future__ import annotations

import torch

from benchmarks import dispatch_table
from vllm_quick import dispatch


def test_choose_path_follows_the_table(monkeypatch):
    monkeypatch.setattr(dispatch, "_major", lambda device: 9)
    monkeypatch.setitem(dispatch.DEQUANT_MIN_M, 9, {torch.float16: 256, torch.bfloat16: None})
    dev = torch.device("cuda", 0)
    assert dispatch.choose_path(255, torch.float16, dev) == "kernel"
    assert dispatch.choose_path(256, torch.float16, dev) == "dequant"
    assert dispatch.choose_path(4096, torch.bfloat16, dev) == "kernel"  # None: never


def test_unmeasured_gpu_family_uses_the_kernel(monkeypatch):
    monkeypatch.setattr(dispatch, "_major", lambda device: 7)
    assert dispatch.choose_path(8192, torch.float16, torch.device("cuda", 0)) == "kernel"


def _row(dtype, m, kernel, dequant):
    return {"dtype": dtype, "M": m, "us": {"quick_kernel": kernel, "quick_dequant": dequant}}


def test_dispatch_table_takes_the_smallest_m_of_a_winning_tail():
    rows = [
        _row("float16", 64, 10, 20), _row("float16", 64, 10, 30),
        _row("float16", 128, 10, 9), _row("float16", 128, 10, 11),  # a tie of shapes: not a majority
        _row("float16", 256, 30, 20), _row("float16", 256, 30, 25),
        _row("float16", 1024, 90, 60), _row("float16", 1024, 90, 70),
        _row("bfloat16", 1024, 50, 60),
    ]
    assert dispatch_table.suggest(rows) == {"float16": 256, "bfloat16": None}


def test_dispatch_table_needs_both_paths(tmp_path, capsys):
    result = tmp_path / "r.json"
    result.write_text('[{"dtype": "float16", "M": 1, "us": {"quick": 1.0}}]')
    assert dispatch_table.main([str(result)]) == 1


def test_force_reference_env_overrides_the_kernel(monkeypatch):
    from vllm_quick import ops

    x = torch.empty(2, 128, dtype=torch.float16)
    monkeypatch.setenv(ops.FORCE_REFERENCE_ENV, "1")
    assert ops.kernel_unsupported_reason(x, 128) == f"{ops.FORCE_REFERENCE_ENV}=1"
    monkeypatch.delenv(ops.FORCE_REFERENCE_ENV)
    # without the variable, the reason (if any) is about the kernel itself, never the variable
    assert ops.FORCE_REFERENCE_ENV not in (ops.kernel_unsupported_reason(x, 128) or "")
