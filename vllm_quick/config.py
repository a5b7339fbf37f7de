"""The ``quick`` quantization config: how vLLM learns about QUICK.

Importing this module registers :class:`QuickConfig` under the name ``quick`` with vLLM's public
``register_quantization_config``; ``vllm_quick.register()`` (the ``vllm.general_plugins`` entry
point) does exactly that import in every vLLM process.

Two checkpoint formats are accepted (``config.json`` -> ``quantization_config``):

* stock AutoAWQ "GEMM" checkpoints (``quant_method: awq``), served with ``--quantization quick``;
  their weights are interleaved once, at load time (see :mod:`vllm_quick.linear`);
* pre-interleaved QUICK checkpoints (``quant_method: quick``, written by ``vllm-quick quantize
  --format quick``), picked up automatically, no flag needed.

Everything the kernel cannot run is refused while the engine starts, with a ``ValueError`` that
names the offending value and what is supported, never by silently producing wrong numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from vllm_quick.layout import LAYOUT_VERSION

NAME = "quick"
CHECKPOINT_FORMATS = ("awq", "quick")  # values of quant_method we read
SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # -1: one group spanning the whole input dimension
SUPPORTED_AWQ_VERSIONS = ("gemm",)  # AutoAWQ's packing for its GEMM kernel; "gemv" packs differently


@register_quantization_config(NAME)
class QuickConfig(QuantizationConfig):
    """Int4 weights (AWQ zero-point quantisation), fp16/bf16/fp32 activations, QUICK kernel."""

    def __init__(
        self,
        group_size: int,
        checkpoint_format: str = "awq",
        modules_to_not_convert: list[str] | None = None,
    ) -> None:
        super().__init__()
        _check_group_size(group_size)
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"quick: unknown checkpoint format {checkpoint_format!r}; "
                f"supported: {', '.join(CHECKPOINT_FORMATS)}"
            )
        self.weight_bits = 4
        self.group_size = group_size
        self.checkpoint_format = checkpoint_format
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        # Exact module names found unquantised in the checkpoint files (see maybe_update_config).
        self.unquantized_modules: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"QuickConfig(group_size={self.group_size}, checkpoint_format={self.checkpoint_format}, "
            f"modules_to_not_convert={self.modules_to_not_convert})"
        )

    # ------------------------------------------------------------------------------------------
    # what vLLM asks of every quantization config
    # ------------------------------------------------------------------------------------------
    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # float32 runs the (exact) reference path only; it is what the CPU end-to-end test uses.
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # mma.sync.m16n8k16 with fp16/bf16 inputs and cp.async need sm_80 (Ampere) or newer.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Same side files AutoAWQ writes; normally the config sits in config.json instead.
        return ["quant_config.json", "quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuickConfig:
        method = str(config.get("quant_method", "")).lower()
        if method not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"quick: cannot serve a checkpoint with quant_method={config.get('quant_method')!r}; "
                f"supported: {', '.join(CHECKPOINT_FORMATS)}"
            )
        bits = cls.get_from_keys(config, ["w_bit", "bits"])
        if bits not in SUPPORTED_BITS:
            raise ValueError(
                f"quick: bits={bits} is not supported; only {SUPPORTED_BITS[0]}-bit weights are"
            )
        zero_point = cls.get_from_keys_or(config, ["zero_point"], True)
        if zero_point is not True:
            raise ValueError(
                f"quick: zero_point={zero_point} is not supported; only zero-point (asymmetric) "
                "AWQ quantisation (zero_point: true) is"
            )
        group_size = cls.get_from_keys(config, ["q_group_size", "group_size"])
        _check_group_size(group_size)
        if cls.get_from_keys_or(config, ["lm_head"], False):
            raise ValueError(
                "quick: quantised lm_head (lm_head: true) is not supported; keep lm_head unquantised"
            )
        if method == "awq":
            version = str(cls.get_from_keys_or(config, ["version"], "gemm")).lower()
            if version not in SUPPORTED_AWQ_VERSIONS:
                raise ValueError(
                    f"quick: AWQ version={version!r} is not supported; only "
                    f"{', '.join(SUPPORTED_AWQ_VERSIONS)} checkpoints are (other versions pack "
                    "the nibbles differently)"
                )
        else:
            layout_version = config.get("layout_version")
            if layout_version != LAYOUT_VERSION:
                raise ValueError(
                    f"quick: checkpoint layout_version={layout_version!r} does not match this "
                    f"vllm-quick's layout version {LAYOUT_VERSION}; re-create the checkpoint with "
                    "`vllm-quick quantize --format quick`, or use its AWQ form"
                )
        modules = cls.get_from_keys_or(config, ["modules_to_not_convert"], None)
        return cls(group_size, method, modules)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        """Claim a checkpoint only when asked to: an AWQ checkpoint with ``--quantization
        quick``, or a QUICK checkpoint (without a flag, or with ``quick``). AWQ checkpoints served
        without the flag stay with vLLM's own AWQ support."""
        method = str(hf_quant_cfg.get("quant_method", "")).lower()
        if method == "awq" and user_quant == NAME:
            return NAME
        if method == NAME and user_quant in (None, NAME):
            return NAME
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            if self.is_layer_skipped(prefix):
                return UnquantizedLinearMethod()
            from vllm_quick.linear import QuickLinearMethod

            return QuickLinearMethod(self, prefix)
        if _is_moe_layer(layer) and not self.is_layer_skipped(prefix):
            raise ValueError(
                f"quick: layer {prefix!r} is a mixture-of-experts layer, which the QUICK kernel "
                "does not support (only dense linear layers are)"
            )
        # Everything else (embeddings, the lm_head since lm_head: true is refused) is not ours:
        # None makes vLLM use its unquantised method.
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # Models that rename modules (e.g. "model." -> "language_model.model.") tell the config so
        # that checkpoint module names still match vLLM's prefixes.
        if self.modules_to_not_convert:
            self.modules_to_not_convert = hf_to_vllm_mapper.apply_list(self.modules_to_not_convert)
        if self.unquantized_modules:
            self.unquantized_modules = set(hf_to_vllm_mapper.apply_list(sorted(self.unquantized_modules)))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Checkpoints may leave some linears unquantised without listing them in
        ``modules_to_not_convert`` (AutoAWQ does, for layers it skipped). For a local checkpoint
        folder, find them from the safetensors headers (no weights are read, nothing is
        downloaded): a module with a floating-point ``weight`` and no ``qweight``."""
        folder = Path(model_name)
        if folder.is_dir():
            self.unquantized_modules = find_unquantized_modules(folder)

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------
    def is_layer_skipped(self, prefix: str) -> bool:
        """True if ``prefix`` is listed in ``modules_to_not_convert`` (AutoAWQ's substring
        semantics). A fused layer (``qkv_proj``, ``gate_up_proj``) is matched by its own name or
        through its checkpoint shards (``q_proj`` ...) from the model's
        ``packed_modules_mapping``; all shards must agree."""
        if not self.modules_to_not_convert and not self.unquantized_modules:
            return False
        if self._matches(prefix):
            return True
        parent, _, name = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(name)
        if not shards:
            return False
        shard_prefixes = [f"{parent}.{s}" if parent else s for s in shards]
        skipped = [self._matches(p) for p in shard_prefixes]
        if any(skipped) and not all(skipped):
            listed = ", ".join(f"{p} ({'skip' if s else 'quantised'})" for p, s in zip(shard_prefixes, skipped))
            raise ValueError(
                f"quick: fused layer {prefix!r} mixes quantised and unquantised shards ({listed}); "
                "modules_to_not_convert must list all shards of a fused layer or none"
            )
        return all(skipped)

    def _matches(self, prefix: str) -> bool:
        # modules_to_not_convert: AutoAWQ's substring rule; names found in the files: exact.
        return prefix in self.unquantized_modules or any(m in prefix for m in self.modules_to_not_convert)


def _check_group_size(group_size) -> None:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"quick: group_size={group_size} is not supported; supported: "
            f"{', '.join(str(g) for g in SUPPORTED_GROUP_SIZES)} (-1 = per output channel)"
        )


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def find_unquantized_modules(folder: Path) -> set[str]:
    """Names of modules in ``folder/*.safetensors`` that have a float ``weight`` and no
    ``qweight``, read from the files' JSON headers only."""
    float_weight, quantized = set(), set()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        for name, info in header.items():
            module, _, param = name.rpartition(".")
            if param == "qweight":
                quantized.add(module)
            elif param == "weight" and isinstance(info, dict) and info.get("dtype") in _FLOAT_DTYPES:
                float_weight.add(module)
    return float_weight - quantized


def _is_moe_layer(layer: torch.nn.Module) -> bool:
    try:
        from vllm.model_executor.layers.fused_moe import RoutedExperts
    except ImportError:  # pragma: no cover - older vLLM without this class
        return False
    return isinstance(layer, RoutedExperts)
