"""``QuickLinearMethod``: what each quantised linear layer of a vLLM model runs.

Life of a layer:

1. ``create_weights`` registers ``qweight``, ``qzeros`` and ``scales`` in the *checkpoint's*
   format, as vLLM parameter classes, so vLLM's own loaders shard them for tensor parallelism and
   fused layers (``qkv_proj``, ``gate_up_proj``) with no loading code of ours.
2. vLLM loads the checkpoint tensors through those parameters.
3. ``process_weights_after_loading`` converts AWQ tensors to the interleaved QUICK layout, once
   (a pre-interleaved checkpoint only gets its scales cast), and replaces the vLLM parameters with
   plain ``torch.nn.Parameter`` objects.
4. ``apply`` calls the ``quick::gemm`` custom op and nothing else: vLLM traces ``apply`` into a
   graph, so any Python decision about ``x`` here would be frozen at trace time. The op picks its
   kernel from the real shape at run time.

Checkpoint tensors as registered (per partition: K = input size, N = output size of this rank):

    format  qweight                   qzeros            scales
    awq     int32 [K, N/8]            int32 [G, N/8]    [G, N]   (G = K / group_size)
    quick   int32 [K/16, N/64, 128]   int32 [G, N/8]    [G, N]   (interleaved, see layout.py)

Sharding the interleaved ``qweight`` with vLLM's loaders works because its dimension 1 counts
64-column tiles: declared with ``packed_factor=64`` along the output dimension, the loader divides
a shard's column offset and size by 64 and narrows whole tiles, which is right as long as every
shard's width is a multiple of 64 (checked in ``create_weights``). Row sharding narrows
dimension 0 (16-row tiles, and groups for zeros/scales) the same way; a group may not straddle
two ranks (refused in ``create_weights``), except per-channel zeros/scales (group_size -1), which
every row-parallel rank holds whole.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
)

import vllm_quick.ops  # noqa: F401  (registers torch.ops.quick.gemm)
from vllm_quick import layout

# Scales are loaded in float32, whatever the model dtype: fp16 and bf16 checkpoint scales are
# both exact in it. They are cast to fp16 (what the kernel reads) once, with a range check.
LOAD_SCALES_DTYPE = torch.float32


@register_weight_loader_v2_supported_method
class QuickLinearMethod(LinearMethodBase):
    """Linear method for ``--quantization quick`` (see the module docstring)."""

    def __init__(self, quant_config, prefix: str = "") -> None:
        self.quant_config = quant_config
        self.prefix = prefix

    # ------------------------------------------------------------------------------------------
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        cfg = self.quant_config
        name = self.prefix or getattr(layer, "prefix", "") or type(layer).__name__
        k = input_size_per_partition
        n = sum(output_partition_sizes)
        # Per-channel (group_size -1): one group spanning the whole input. Its zeros and scales
        # ([1, N]) do not depend on k, so a row-parallel rank (k = input_size / tp) keeps all of
        # them: they are registered below without an input dimension, and vLLM's row loader then
        # copies them whole to every rank (as vLLM does for channel-wise GPTQ / compressed-tensors
        # weights), while column-parallel layers still split them along N. The rank's single
        # group is then its own k rows.
        per_channel = cfg.group_size == -1
        group_size = k if per_channel else cfg.group_size
        if k % group_size:
            raise ValueError(
                f"quick: layer {name!r}: group_size {group_size} does not divide its input size "
                f"per partition {k} (input size {input_size}): a group would straddle two "
                "tensor-parallel ranks; use a tensor-parallel size that keeps whole groups on "
                "each rank"
            )
        if k % layout.TILE_K:
            raise ValueError(
                f"quick: layer {name!r}: input size per partition {k} is not a multiple of "
                f"{layout.TILE_K}, which the QUICK kernel needs"
            )
        # Every fused part of this rank must be whole int32 words (AWQ, padded to 64 at load) or
        # whole 64-column tiles (pre-interleaved: cannot be padded).
        if cfg.checkpoint_format == "quick":
            multiple, why = layout.TILE_N, (
                "for a pre-interleaved (quick) checkpoint; serve the AWQ form of this model "
                "instead (it is padded at load), or use a smaller tensor-parallel size"
            )
        else:
            multiple, why = layout.PACK, "(eight 4-bit values per int32)"
        if any(s % multiple for s in output_partition_sizes):
            raise ValueError(
                f"quick: layer {name!r}: output sizes per partition {output_partition_sizes} "
                "(this tensor-parallel rank's share of each fused part) must each be a "
                f"multiple of {multiple} {why}"
            )

        loader = extra_weight_attrs.get("weight_loader")
        groups = k // group_size
        if cfg.checkpoint_format == "quick":
            # [K/16, N/64, 128]: dimension 1 counts 64-column tiles
            qweight_shape, qweight_packing = (k // layout.TILE_K, n // layout.TILE_N, layout.WORDS_PER_TILE), layout.TILE_N
        else:
            # AWQ: [K, N/8], eight 4-bit columns per int32
            qweight_shape, qweight_packing = (k, n // layout.PACK), layout.PACK
        qweight = PackedvLLMParameter(
            data=torch.empty(qweight_shape, dtype=torch.int32),
            input_dim=0,
            output_dim=1,
            packed_dim=1,
            packed_factor=qweight_packing,
            weight_loader=loader,
        )
        if per_channel:  # replicated over row-parallel ranks (see above)
            qzeros = PackedColumnParameter(
                data=torch.empty(1, n // layout.PACK, dtype=torch.int32),
                output_dim=1,
                packed_dim=1,
                packed_factor=layout.PACK,
                weight_loader=loader,
            )
            scales = ChannelQuantScaleParameter(
                data=torch.empty(1, n, dtype=LOAD_SCALES_DTYPE),
                output_dim=1,
                weight_loader=loader,
            )
        else:
            qzeros = PackedvLLMParameter(
                data=torch.empty(groups, n // layout.PACK, dtype=torch.int32),
                input_dim=0,
                output_dim=1,
                packed_dim=1,
                packed_factor=layout.PACK,
                weight_loader=loader,
            )
            scales = GroupQuantScaleParameter(
                data=torch.empty(groups, n, dtype=LOAD_SCALES_DTYPE),
                input_dim=0,
                output_dim=1,
                weight_loader=loader,
            )
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("qzeros", qzeros)
        layer.register_parameter("scales", scales)
        layer.quick_group_size = group_size
        layer.quick_size_n = n

    # ------------------------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        name = self.prefix or getattr(layer, "prefix", "") or type(layer).__name__
        # The model dtype (LinearBase keeps it): what apply() will see as x.dtype. Not scales.dtype,
        # which is LOAD_SCALES_DTYPE whatever the model dtype.
        _log_plan_once(layer.params_dtype, layer.scales.device)
        scales = _scales_to_fp16(layer.scales.data, name)
        qweight, qzeros = layer.qweight.data, layer.qzeros.data
        if self.quant_config.checkpoint_format == "awq":
            # The one-time re-pack; pads N up to a multiple of 64 (padding has zero scale).
            qweight, qzeros, scales = layout.awq_to_quick(qweight, qzeros, scales)
        layer.qweight = _frozen(qweight)
        layer.qzeros = _frozen(qzeros)
        layer.scales = _frozen(scales)

    # ------------------------------------------------------------------------------------------
    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.ops.quick.gemm(
            x, layer.qweight, layer.qzeros, layer.scales, bias, layer.quick_group_size, layer.quick_size_n
        )


# Under the "vllm" logger, so vLLM's log configuration (format, level, handlers) shows our lines too.
logger = logging.getLogger(f"vllm.{__name__}")
_logged_plans: set[tuple[torch.dtype, torch.device]] = set()


def _log_plan_once(dtype: torch.dtype, device: torch.device) -> None:
    """Say once per model dtype and device which paths quick::gemm will take."""
    from vllm_quick import dispatch

    if (dtype, device) not in _logged_plans:
        _logged_plans.add((dtype, device))
        logger.info("quick: %s", dispatch.describe(dtype, device))


def _frozen(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.contiguous(), requires_grad=False)


def _scales_to_fp16(scales: torch.Tensor, layer_name: str) -> torch.Tensor:
    """Cast loaded scales to fp16, refusing values fp16 cannot hold (e.g. huge bf16 scales)."""
    half = scales.to(torch.float16)
    if not torch.isfinite(half).all():
        bad = scales[~torch.isfinite(half)]
        raise ValueError(
            f"quick: layer {layer_name!r}: scales are not finite in float16 (e.g. {bad[0].item()!r}); "
            "the QUICK kernel reads fp16 scales, so they must lie within +-65504"
        )
    return half
