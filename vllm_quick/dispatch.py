"""Which path ``quick::gemm`` takes on a GPU, by the number of rows M of the call.

This runs inside the custom op at run time (never in ``apply()``, where vLLM's compilation would
freeze it). Two paths:

* ``"kernel"``: the QUICK kernel (csrc/quick_gemm.cu), streaming int4 weights; the right choice
  while the GEMM is bound by weight bandwidth (small M, decode).
* ``"dequant"``: dequantise the layer once into a dense matrix (csrc/quick_dequant.cu) and call
  cuBLAS; wins once the GEMM is bound by arithmetic (large M, prefill), where cuBLAS's Hopper
  (wgmma) kernels beat our mma.sync ones.

``DEQUANT_MIN_M`` is the measured switch-over per GPU family and activation dtype: the smallest M
from which the dequant path was faster on most Llama shapes of benchmarks/kernel_bench.py
(``benchmarks/dispatch_table.py`` computes it from a result file). ``None``
means "never": for bf16 the dense path rounds ``(q - z) * s`` to bf16, which costs ~2.3e-3 of
relative error against the 2e-3 budget, while the kernel keeps the weights exact (layout.py).
"""

from __future__ import annotations

import torch

# (compute capability major) -> {dtype: smallest M for the dequant path, or None}
# sm90: measured on an H100 80GB HBM3, 2026-11-25 (benchmarks/results/kernel_h100.json, kernel
# after the copy-plan rewrite): at M = 128 the kernel still beat dequantise + cuBLAS on 8 of the
# 12 Llama shapes, at M = 256 and above dequantise + cuBLAS won on all 12.
DEQUANT_MIN_M: dict[int, dict[torch.dtype, int | None]] = {
    9: {torch.float16: 256, torch.bfloat16: None},
}
# Families not measured yet: the kernel everywhere (always correct, maybe not fastest).
DEFAULT = {torch.float16: None, torch.bfloat16: None}

_capability_cache: dict[int, int] = {}


def _major(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capability_cache:
        _capability_cache[index] = torch.cuda.get_device_capability(index)[0]
    return _capability_cache[index]


def choose_path(m: int, dtype: torch.dtype, device: torch.device) -> str:
    """``"kernel"`` or ``"dequant"`` for a call with M rows."""
    threshold = DEQUANT_MIN_M.get(_major(device), DEFAULT).get(dtype)
    return "dequant" if threshold is not None and m >= threshold else "kernel"
