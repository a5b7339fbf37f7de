"""QuickLinearMethod inside real vLLM linear layers (CPU, reference op).

Each test builds a vLLM layer with ``QuickConfig``, feeds checkpoint-format tensors (AWQ or
pre-interleaved QUICK) through the layer's own ``weight_loader`` exactly as model loading does,
runs ``process_weights_after_loading`` and ``apply``, and compares with ``x @ dequant(W)`` in fp32.
Fused layers (gate_up, qkv) are covered for both formats. Tensor-parallel sharding (simulated
ranks, TP = 2 and 4) is in tests/test_tensor_parallel.py; the helpers both use are in
tests/_layer_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
from _layer_helpers import (
    FORMATS,
    assert_matches,
    checkpoint_tensors,
    finish,
    load_into,
    quick_config,
    random_quantized,
    run,
)

from vllm_quick import layout


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------
# single-shard layers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_column_parallel(vllm_dist, fmt, group_size):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    k, n = 256, 192
    codes, zeros, scales, w = random_quantized(k, n, group_size)
    layer = ColumnParallelLinear(
        k, n, bias=True, params_dtype=torch.float32,
        quant_config=quick_config(fmt, group_size), prefix="model.layers.0.mlp.fc",
    )
    load_into(layer, checkpoint_tensors(fmt, codes, zeros, scales))
    bias = torch.randn(n)
    layer.bias.weight_loader(layer.bias, bias)
    finish(layer)

    assert layer.qweight.shape == (k // 16, n // 64, 128) and layer.scales.dtype == torch.float16
    assert type(layer.qweight) is torch.nn.Parameter and not layer.qweight.requires_grad
    x = torch.randn(5, k)
    out, _ = layer(x)  # the layer's own forward
    assert_matches(out, x, w, bias)
    # leading dimensions are kept
    x3 = torch.randn(2, 3, k)
    assert_matches(run(layer, x3), x3, w)


def test_awq_width_not_multiple_of_64_is_padded(vllm_dist):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    k, n = 128, 200  # 200 = 3 tiles of 64 + 8: padded to 256 at load time
    codes, zeros, scales, w = random_quantized(k, n, 64)
    layer = ColumnParallelLinear(k, n, bias=False, params_dtype=torch.float32,
                                 quant_config=quick_config("awq"), prefix="fc")
    load_into(layer, checkpoint_tensors("awq", codes, zeros, scales))
    finish(layer)
    assert layer.quick_size_n == n and layer.qweight.shape == (k // 16, 4, 128)
    x = torch.randn(3, k)
    y = run(layer, x)
    assert y.shape == (3, n)
    assert_matches(y, x, w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_parallel(vllm_dist, fmt):
    from vllm.model_executor.layers.linear import RowParallelLinear

    k, n = 512, 256
    codes, zeros, scales, w = random_quantized(k, n, 128)
    layer = RowParallelLinear(k, n, bias=True, params_dtype=torch.float32,
                              quant_config=quick_config(fmt, 128), prefix="model.layers.0.mlp.down_proj")
    load_into(layer, checkpoint_tensors(fmt, codes, zeros, scales))
    bias = torch.randn(n)
    layer.bias.weight_loader(layer.bias, bias)
    finish(layer)
    x = torch.randn(4, k)
    out, _ = layer(x)
    assert_matches(out, x, w, bias)


@pytest.mark.parametrize("act_dtype", [torch.float16, torch.bfloat16])
def test_half_activations(vllm_dist, act_dtype, monkeypatch):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    from vllm_quick import dispatch, linear

    k, n = 256, 128
    codes, zeros, scales, w = random_quantized(k, n, 64)
    layer = ColumnParallelLinear(k, n, bias=False, params_dtype=act_dtype,
                                 quant_config=quick_config("awq"), prefix="fc")
    load_into(layer, checkpoint_tensors("awq", codes, zeros, scales))
    described = []
    monkeypatch.setattr(linear, "_logged_plans", set())
    monkeypatch.setattr(dispatch, "describe", lambda dtype, device: described.append(dtype) or "plan")
    finish(layer)
    # The dispatch line is about the model dtype (scales are loaded in fp32 whatever it is).
    assert described == [act_dtype]
    x = torch.randn(4, k).to(act_dtype)
    y = run(layer, x)
    assert y.dtype == act_dtype
    torch.testing.assert_close(y.float(), x.float() @ w, rtol=2e-2, atol=2e-2)


def test_bf16_scales_load_exactly(vllm_dist):
    """Scales are loaded in fp32 (not params_dtype), so bf16 checkpoint scales that fp16 can
    hold exactly survive the trip unchanged."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    k, n = 128, 64
    codes, zeros, scales, w = random_quantized(k, n, 64, scale_dtype=torch.bfloat16)
    layer = ColumnParallelLinear(k, n, bias=False, params_dtype=torch.float16,
                                 quant_config=quick_config("awq"), prefix="fc")
    load_into(layer, checkpoint_tensors("awq", codes, zeros, scales))
    finish(layer)
    _, _, got = layout.quick_to_codes(layer.qweight, layer.qzeros, layer.scales)
    assert torch.equal(got.float(), scales.float())
    x = torch.randn(2, k)
    assert_matches(run(layer, x), x, w)


def test_scales_out_of_fp16_range_are_refused(vllm_dist):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    k, n = 128, 64
    codes, zeros, scales, _ = random_quantized(k, n, 64, scale_dtype=torch.bfloat16)
    scales[0, 3] = 1e6  # representable in bf16, not in fp16
    layer = ColumnParallelLinear(k, n, bias=False, params_dtype=torch.bfloat16,
                                 quant_config=quick_config("awq"), prefix="model.layers.3.mlp.fc")
    load_into(layer, checkpoint_tensors("awq", codes, zeros, scales))
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.fc.*not finite in float16"):
        finish(layer)


# ----------------------------------------------------------------------------------------------
# fused layers: the checkpoint stores the shards separately, vLLM writes them side by side
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_merged_gate_up(vllm_dist, fmt):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    k, sizes = 256, [192, 128]
    shards = [random_quantized(k, s, 64) for s in sizes]
    layer = MergedColumnParallelLinear(k, sizes, bias=False, params_dtype=torch.float32,
                                       quant_config=quick_config(fmt), prefix="model.layers.0.mlp.gate_up_proj")
    for shard_id, (codes, zeros, scales, _) in enumerate(shards):
        load_into(layer, checkpoint_tensors(fmt, codes, zeros, scales), shard_id)
    finish(layer)
    w = torch.cat([s[3] for s in shards], dim=1)
    x = torch.randn(3, k)
    assert_matches(run(layer, x), x, w)


def build_qkv(fmt, hidden=256, head_dim=64, heads=4, kv_heads=2, bias=False):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    return QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=bias, params_dtype=torch.float32,
                             quant_config=quick_config(fmt), prefix="model.layers.0.self_attn.qkv_proj")


@pytest.mark.parametrize("fmt", FORMATS)
def test_qkv_three_shards(vllm_dist, fmt):
    hidden, head_dim, heads, kv_heads = 256, 64, 4, 2
    sizes = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
    shards = {sid: random_quantized(hidden, n, 64) for sid, n in sizes.items()}
    layer = build_qkv(fmt, hidden, head_dim, heads, kv_heads, bias=True)
    biases = {sid: torch.randn(n) for sid, n in sizes.items()}
    for sid, (codes, zeros, scales, _) in shards.items():
        load_into(layer, checkpoint_tensors(fmt, codes, zeros, scales), sid)
        layer.bias.weight_loader(layer.bias, biases[sid], sid)
    finish(layer)
    w = torch.cat([shards[s][3] for s in "qkv"], dim=1)
    bias = torch.cat([biases[s] for s in "qkv"])
    x = torch.randn(6, hidden)
    out, _ = layer(x)
    assert_matches(out, x, w, bias)
