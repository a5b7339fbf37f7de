"""Helpers shared by the tests that build real vLLM linear layers with ``QuickConfig``
(tests/test_linear.py, tests/test_tensor_parallel.py).

A layer is built with vLLM's own class, fed checkpoint-format tensors (AWQ or pre-interleaved
QUICK) through its parameters' ``weight_loader`` exactly as model loading does, then finished
with ``process_weights_after_loading``.
"""

from __future__ import annotations

import torch

from vllm_quick import layout

FORMATS = ("awq", "quick")


def random_quantized(k: int, n: int, group_size: int, scale_dtype=torch.float16):
    """Random codes/zeros/scales for a K x N weight: returns (codes, zeros, scales, W fp32)."""
    group = k if group_size == -1 else group_size
    codes = torch.randint(0, 16, (k, n), dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // group, n), dtype=torch.int32)
    scales = (torch.rand(k // group, n) * 0.02 + 0.001).to(scale_dtype)
    return codes, zeros, scales, layout.dequantize(codes, zeros, scales)


def checkpoint_tensors(fmt: str, codes, zeros, scales) -> dict[str, torch.Tensor]:
    """What a checkpoint of format ``fmt`` stores for one linear layer."""
    if fmt == "awq":
        return {"qweight": layout.awq_pack(codes), "qzeros": layout.awq_pack(zeros), "scales": scales}
    return {
        "qweight": layout.interleave_weight(codes),
        "qzeros": layout.interleave_zeros(zeros),
        "scales": layout.interleave_scales(scales),
    }


def load_into(layer, tensors: dict[str, torch.Tensor], shard_id=None) -> None:
    """Load tensors the way vLLM's model loader does: through each parameter's weight_loader."""
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        if shard_id is None:
            param.weight_loader(param, tensor)
        else:
            param.weight_loader(param, tensor, shard_id)


def quick_config(fmt: str, group_size: int = 64, **kw):
    from vllm_quick.config import QuickConfig

    return QuickConfig(group_size=group_size, checkpoint_format=fmt, **kw)


def finish(layer):
    from vllm_quick.linear import QuickLinearMethod

    assert isinstance(layer.quant_method, QuickLinearMethod)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def run(layer, x, bias=None):
    return layer.quant_method.apply(layer, x, bias)


def assert_matches(y, x, w, bias=None):
    expected = x.to(torch.float32) @ w
    if bias is not None:
        expected = expected + bias.to(torch.float32)
    torch.testing.assert_close(y.to(torch.float32), expected, rtol=1e-5, atol=1e-5)


def layer_weight(layer) -> torch.Tensor:
    """The finished layer's weight, dequantised from its interleaved tensors: fp32 [K, size_n]
    (the padding columns an AWQ layer gets at load time are cut off)."""
    w = layout.dequantize_quick(layer.qweight, layer.qzeros, layer.scales)
    return w[:, : layer.quick_size_n]
