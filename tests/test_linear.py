"""QuickLinearMethod inside real vLLM linear layers (CPU, reference op).

Each test builds a vLLM layer with ``QuickConfig``, feeds checkpoint-format tensors (AWQ or
pre-interleaved QUICK) through the layer's own ``weight_loader`` exactly as model loading does,
runs ``process_weights_after_loading`` and ``apply``, and compares with ``x @ dequant(W)`` in fp32.
Fused layers (gate_up, qkv) and tensor-parallel sharding (simulated ranks) are covered for both
formats: for the interleaved format this is what proves that vLLM's packed-parameter loaders cut
whole 64-column tiles in the right places.
"""

from __future__ import annotations

import pytest
import torch

from vllm_quick import layout

FORMATS = ("awq", "quick")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------
# checkpoint tensors
# ----------------------------------------------------------------------------------------------
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
def test_half_activations(vllm_dist, act_dtype):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    k, n = 256, 128
    codes, zeros, scales, w = random_quantized(k, n, 64)
    layer = ColumnParallelLinear(k, n, bias=False, params_dtype=act_dtype,
                                 quant_config=quick_config("awq"), prefix="fc")
    load_into(layer, checkpoint_tensors("awq", codes, zeros, scales))
    finish(layer)
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


# ----------------------------------------------------------------------------------------------
# tensor parallelism, simulated: build and load rank r of 2, compare with that rank's slice
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rank", [0, 1])
def test_tp2_qkv_and_gate_up(fake_tp, fmt, rank):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    tp, hidden, head_dim, heads, kv_heads = 2, 256, 64, 4, 2
    sizes = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
    qkv = {sid: random_quantized(hidden, n, 64) for sid, n in sizes.items()}
    gate_up = [random_quantized(hidden, 256, 64) for _ in range(2)]
    with fake_tp(rank, tp):
        attn = build_qkv(fmt, hidden, head_dim, heads, kv_heads)
        mlp = MergedColumnParallelLinear(hidden, [256, 256], bias=False, params_dtype=torch.float32,
                                         quant_config=quick_config(fmt), prefix="model.layers.0.mlp.gate_up_proj")
        for sid, (codes, zeros, scales, _) in qkv.items():
            load_into(attn, checkpoint_tensors(fmt, codes, zeros, scales), sid)
        for sid, (codes, zeros, scales, _) in enumerate(gate_up):
            load_into(mlp, checkpoint_tensors(fmt, codes, zeros, scales), sid)
    finish(attn)
    finish(mlp)

    def rank_slice(w):
        width = w.shape[1] // tp
        return w[:, rank * width:(rank + 1) * width]

    x = torch.randn(3, hidden)
    assert_matches(run(attn, x), x, torch.cat([rank_slice(qkv[s][3]) for s in "qkv"], dim=1))
    assert_matches(run(mlp, x), x, torch.cat([rank_slice(g[3]) for g in gate_up], dim=1))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rank", [0, 1])
def test_tp2_row_parallel(fake_tp, fmt, rank):
    from vllm.model_executor.layers.linear import RowParallelLinear

    tp, k, n = 2, 512, 128
    codes, zeros, scales, w = random_quantized(k, n, 128)
    with fake_tp(rank, tp):
        layer = RowParallelLinear(k, n, bias=False, params_dtype=torch.float32,
                                  quant_config=quick_config(fmt, 128), prefix="model.layers.0.mlp.down_proj")
        load_into(layer, checkpoint_tensors(fmt, codes, zeros, scales))
    finish(layer)
    rows = slice(rank * k // tp, (rank + 1) * k // tp)
    x = torch.randn(3, k // tp)
    assert_matches(run(layer, x), x, w[rows])


def test_tp2_per_channel_row_parallel_is_refused(fake_tp):
    """group_size -1 spans the whole input: a row-parallel rank cannot hold a whole group."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    with fake_tp(0, 2), pytest.raises(ValueError, match=r"o_proj.*group_size 256 does not divide.*128"):
        RowParallelLinear(256, 128, bias=False, params_dtype=torch.float32,
                          quant_config=quick_config("awq", -1), prefix="model.layers.0.self_attn.o_proj")
