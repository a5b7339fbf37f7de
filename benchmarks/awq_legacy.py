"""Benchmark only: vLLM's old AutoAWQ GEMM path, served as ``--quantization awq_legacy``.

QUICK's paper compares against the AutoAWQ GEMM kernel (``awq_gemm``, with dequantise + fp16
matmul from 256 tokens up). vLLM still ships that path as ``AutoAWQLinearMethod``
(``vllm/model_executor/layers/quantization/auto_awq.py``) but no longer picks it for an AWQ
checkpoint on a GPU that runs Marlin or Machete. This module exposes it under its own name,
without patching vLLM, so the serving benchmark can run it beside ``quick``, ``awq`` (Machete)
and ``awq_marlin``:

* :class:`AWQLegacyConfig` is vLLM's own ``AutoAWQConfig`` (same checkpoint parsing, same
  skipped-layer rules) whose quantised linear layers get ``AutoAWQLinearMethod``;
* it claims an AWQ checkpoint only when asked by name (``--quantization awq_legacy``).

It is a vLLM *general plugin*, loaded in every vLLM process (API server, engine core, workers)
only for the server that asks for it, through two switches, both set by the ``# env:`` lines of
``serving_configs/llama3_8b_awq_legacy.yaml``:

1. ``PYTHONPATH`` gains ``benchmarks/awq_legacy_plugin/``, a metadata-only distribution whose
   ``entry_points.txt`` names ``benchmarks.awq_legacy:register`` in ``vllm.general_plugins``
   (and the repository root, so that ``benchmarks`` imports). Nothing is pip-installed, and no
   other server or test ever sees the entry point;
2. ``VLLM_QUICK_BENCH_AWQ_LEGACY=1``: :func:`register` does nothing without it (it says so once),
   so the entry point alone cannot change what a server does.

Not for production: it exists to measure the old path (which vLLM compiles with its Python
``numel() >= 256`` branch frozen, see ``../shared/devbundle/README.md``).
"""

from __future__ import annotations

import logging
import os

from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization.auto_awq import (
    AutoAWQConfig,
    AutoAWQLinearMethod,
    AutoAWQMarlinLinearMethod,
)

NAME = "awq_legacy"
ENV_SWITCH = "VLLM_QUICK_BENCH_AWQ_LEGACY"

logger = logging.getLogger(__name__)
_registered = False


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "") == "1"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers ``awq_legacy`` when
    ``VLLM_QUICK_BENCH_AWQ_LEGACY=1``; otherwise does nothing. Idempotent."""
    if _registered:
        return
    if not enabled():
        logger.warning("benchmarks.awq_legacy: %s is not 1, quantization %r not registered", ENV_SWITCH, NAME)
        return
    register_now()


def register_now() -> type:
    """Register ``awq_legacy`` with vLLM whatever the environment says (tests call this);
    returns the config class."""
    global _registered
    from vllm.model_executor.layers.quantization import register_quantization_config

    cls = register_quantization_config(NAME)(AWQLegacyConfig)
    _registered = True
    return cls


class AWQLegacyConfig(AutoAWQConfig):
    """``AutoAWQConfig`` whose quantised linears always run ``AutoAWQLinearMethod``
    (``awq_gemm`` below 256 tokens, ``awq_dequantize`` + matmul from 256 up). A module-level
    class, so that vLLM can pickle a config holding it into its engine process."""

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        # An AWQ checkpoint, and only when asked for by name: `--quantization awq_legacy`.
        if str(hf_quant_cfg.get("quant_method", "")).lower() == "awq" and user_quant == NAME:
            return NAME
        return None

    def get_quant_method(self, layer, prefix):
        # vLLM decides what is quantised (modules_to_not_convert, lm_head, MoE); we only swap the
        # kernel of the quantised linear layers.
        method = super().get_quant_method(layer, prefix)
        if isinstance(layer, LinearBase) and isinstance(method, (AutoAWQMarlinLinearMethod, AutoAWQLinearMethod)):
            return AutoAWQLinearMethod(self)
        return method

    def __repr__(self) -> str:
        return "AWQLegacyConfig(" + super().__repr__().split("(", 1)[1]
