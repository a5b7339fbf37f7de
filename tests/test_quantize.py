"""vllm-quick quantize / dequantize on small random Llama-style checkpoints (CPU, offline)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_quick import dequantize as dq
from vllm_quick import layout
from vllm_quick import quantize as q

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ----------------------------------------------------------------------------------------------
# fixtures: a tiny HF checkpoint
# ----------------------------------------------------------------------------------------------
def make_checkpoint(
    path: Path,
    *,
    hidden: int = 128,
    intermediate: int = 256,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 64,
    layers: int = 2,
    vocab: int = 96,
    dtype: torch.dtype = torch.float16,
    shards: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write a random Llama-style checkpoint (config.json, safetensors, a tokenizer file)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: (torch.randn(*shape, generator=gen) * 0.05).to(dtype)  # noqa: E731
    w = {"model.embed_tokens.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        w[f"{p}.self_attn.q_proj.weight"] = rnd(heads * head_dim, hidden)
        w[f"{p}.self_attn.k_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        w[f"{p}.self_attn.v_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        w[f"{p}.self_attn.o_proj.weight"] = rnd(hidden, heads * head_dim)
        w[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        w[f"{p}.mlp.gate_proj.weight"] = rnd(intermediate, hidden)
        w[f"{p}.mlp.up_proj.weight"] = rnd(intermediate, hidden)
        w[f"{p}.mlp.down_proj.weight"] = rnd(hidden, intermediate)
    w["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    w["lm_head.weight"] = rnd(vocab, hidden)

    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "torch_dtype": str(dtype).removeprefix("torch."), "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    (path / "generation_config.json").write_text('{"eos_token_id": 1}')
    names = list(w)
    if shards == 1:
        save_file(w, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: w[n] for n in names[s::shards]}
            save_file(part, str(path / file))
            weight_map.update({n: file for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return w


def load_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                assert name not in out, f"{name} in two shards"
                out[name] = f.get_tensor(name)
    return out


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def fp16_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp16")
    return path, make_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# the quantiser on one weight
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_quantize_weight_codes_and_error_bound(group_size):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(192, 256, generator=gen) * 0.1  # HF [N, K]
    w[0, :] = w[0, :].abs() + 0.5  # a row whose groups are all positive
    w[1, :] = -w[1, :].abs() - 0.5  # ... all negative
    w[2, :] = 0.0  # ... all zero
    qw = q.quantize_weight(w, group_size)
    k, n = 256, 192
    g = k if group_size == -1 else group_size
    assert qw.codes.shape == (k, n) and qw.codes.dtype == torch.int32
    assert qw.zeros.shape == (k // g, n) and qw.zeros.dtype == torch.int32
    assert qw.scales.shape == (k // g, n) and qw.scales.dtype == torch.float16
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= 15
    assert int(qw.zeros.min()) >= 0 and int(qw.zeros.max()) <= 15
    assert bool((qw.scales > 0).all())

    deq = layout.dequantize(qw.codes, qw.zeros, qw.scales)  # [K, N]
    half_step = qw.scales.float().repeat_interleave(g, dim=0) / 2
    err = (deq - w.t()).abs()
    assert bool((err <= half_step * (1 + 1e-5) + 1e-7).all()), float((err / half_step).max())
    # the all-zero row dequantises to exact zeros
    assert bool((deq[:, 2] == 0).all())
    # the formula of the brief, with the stored (fp16) scale
    s = qw.scales.float().repeat_interleave(g, dim=0)
    z = qw.zeros.repeat_interleave(g, dim=0)
    expect = (torch.round(w.t() / s) + z).clamp(0, 15).to(torch.int32)
    assert torch.equal(qw.codes, expect)


def test_quantize_weight_scale_is_range_over_15():
    w = torch.linspace(-0.3, 0.45, 64).reshape(1, 64).repeat(8, 1)  # one group per row, N=8
    qw = q.quantize_weight(w, 64)
    expect = torch.tensor(0.75 / 15)
    assert torch.allclose(qw.scales.float(), expect.expand(1, 8), rtol=1e-3)
    assert bool((qw.scales.float() >= expect).all())  # rounded up, never down
    assert bool((qw.zeros == 6).all())  # round(0.3 / 0.05)
    assert int(qw.codes.min()) == 0 and int(qw.codes.max()) == 15


@pytest.mark.parametrize("group_size", [16, 96, 0, 256])
def test_quantize_weight_rejects_unsupported_group_size(group_size):
    with pytest.raises(ValueError, match="group size"):
        q.quantize_weight(torch.randn(64, 256), group_size)


def test_quantize_weight_rejects_group_not_dividing_k():
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.down_proj.*does not divide K=160"):
        q.quantize_weight(torch.randn(64, 160), 64, "model.layers.3.mlp.down_proj")


# ----------------------------------------------------------------------------------------------
# whole checkpoints: AWQ
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "group_size,dtype", [(32, torch.float16), (64, torch.bfloat16), (128, torch.float32), (-1, torch.float16)]
)
def test_awq_checkpoint(tmp_path, group_size, dtype):
    src, dst = tmp_path / "src", tmp_path / "dst"
    orig = make_checkpoint(src, dtype=dtype)
    q.quantize_checkpoint(src, dst, group_size=group_size, fmt="awq", progress=False)
    out = load_all(dst)

    for i in range(2):
        for lin in LINEARS:
            prefix = f"model.layers.{i}.{lin}"
            w = orig[f"{prefix}.weight"]
            n, k = w.shape
            g = k if group_size == -1 else group_size
            assert f"{prefix}.weight" not in out
            qweight, qzeros, scales = (out[f"{prefix}.{s}"] for s in ("qweight", "qzeros", "scales"))
            assert qweight.dtype == torch.int32 and qweight.shape == (k, n // 8), prefix
            assert qzeros.dtype == torch.int32 and qzeros.shape == (k // g, n // 8), prefix
            assert scales.dtype == torch.float16 and scales.shape == (k // g, n), prefix
            expect = q.quantize_weight(w, group_size)
            codes, zeros = layout.awq_unpack(qweight), layout.awq_unpack(qzeros)
            assert torch.equal(codes, expect.codes), prefix
            assert torch.equal(zeros, expect.zeros), prefix
            assert torch.equal(scales, expect.scales), prefix
            deq = layout.dequantize(codes, zeros, scales)
            half_step = scales.float().repeat_interleave(g, dim=0) / 2
            assert bool(((deq - w.float().t()).abs() <= half_step * (1 + 1e-5) + 1e-7).all()), prefix

    # unquantised tensors: same values, as fp16
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert out[name].dtype == torch.float16, name
        assert torch.equal(out[name], orig[name].to(torch.float16)), name
    assert len(out) == len(orig) + 2 * 7 * 2  # each of the 14 linears: 1 weight -> 3 tensors

    config = read_config(dst)
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": [],
    }
    assert config["torch_dtype"] == "float16" and config["dtype"] == "float16"
    assert config["hidden_size"] == 128 and config["architectures"] == ["LlamaForCausalLM"]
    assert (dst / "tokenizer_config.json").read_text() == '{"bos_token": "<s>"}'
    assert (dst / "generation_config.json").is_file()
    assert not (dst / "model.safetensors.index.json").exists()


def test_modules_to_not_convert(tmp_path, fp16_ckpt):
    src, orig = fp16_ckpt
    dst = tmp_path / "dst"
    q.quantize_checkpoint(src, dst, group_size=64, modules_to_not_convert=["mlp", "layers.1.self_attn.v_proj"],
                          progress=False)
    out = load_all(dst)
    for i in range(2):
        for lin in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.{lin}.weight"
            assert torch.equal(out[name], orig[name]) and f"model.layers.{i}.mlp.{lin}.qweight" not in out
    assert "model.layers.1.self_attn.v_proj.weight" in out
    assert "model.layers.0.self_attn.v_proj.qweight" in out and "model.layers.0.self_attn.v_proj.weight" not in out
    qc = read_config(dst)["quantization_config"]
    assert qc["modules_to_not_convert"] == ["mlp", "layers.1.self_attn.v_proj"]


def test_sharded_source_and_sharded_output(tmp_path):
    src, dst, back = tmp_path / "src", tmp_path / "dst", tmp_path / "back"
    orig = make_checkpoint(src, shards=3)
    q.quantize_checkpoint(src, dst, group_size=64, max_shard_size=40_000, progress=False)
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    out = load_all(dst)
    assert set(index["weight_map"]) == set(out)
    for name, file in index["weight_map"].items():
        with safe_open(str(dst / file), framework="pt") as f:
            assert name in f.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    assert "model.layers.1.mlp.down_proj.qweight" in out and "lm_head.weight" in out
    assert not list(dst.glob(".shard-*"))
    # and back again from the sharded output
    dq.dequantize_checkpoint(dst, back, progress=False)
    restored = load_all(back)
    assert set(restored) == set(orig)


# ----------------------------------------------------------------------------------------------
# whole checkpoints: QUICK
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_quick_checkpoint_equals_awq_to_quick(tmp_path, fp16_ckpt, group_size):
    src, orig = fp16_ckpt
    awq_dir, quick_dir = tmp_path / "awq", tmp_path / "quick"
    q.quantize_checkpoint(src, awq_dir, group_size=group_size, fmt="awq", progress=False)
    q.quantize_checkpoint(src, quick_dir, group_size=group_size, fmt="quick", progress=False)
    awq, quick = load_all(awq_dir), load_all(quick_dir)
    assert set(awq) == set(quick)
    for name in orig:
        if name in awq:  # unquantised
            assert torch.equal(awq[name], quick[name])
            continue
        prefix = name[: -len(".weight")]
        n, k = orig[name].shape
        expect = layout.awq_to_quick(*(awq[f"{prefix}.{s}"] for s in ("qweight", "qzeros", "scales")))
        got = tuple(quick[f"{prefix}.{s}"] for s in ("qweight", "qzeros", "scales"))
        assert got[0].shape == (k // 16, n // 64, 128) and got[0].dtype == torch.int32
        for a, b in zip(got, expect):
            assert a.dtype == b.dtype and torch.equal(a, b), prefix
    qc = read_config(quick_dir)["quantization_config"]
    assert qc == {
        "quant_method": "quick", "bits": 4, "group_size": group_size, "zero_point": True,
        "layout_version": layout.LAYOUT_VERSION, "modules_to_not_convert": [],
    }


def test_quick_refuses_n_not_multiple_of_64(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_checkpoint(src, heads=4, kv_heads=1, head_dim=32)  # k_proj/v_proj: N = 32
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj: --format quick needs N % 64 == 0.*N=32"):
        q.quantize_checkpoint(src, dst, group_size=64, fmt="quick", progress=False)
    assert not dst.exists()  # validated before anything is written
    q.quantize_checkpoint(src, dst, group_size=64, fmt="awq", progress=False)  # AWQ is fine
    assert load_all(dst)["model.layers.0.self_attn.k_proj.qweight"].shape == (128, 4)


def test_group_size_must_divide_k(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_checkpoint(src, hidden=192, heads=3)  # K = 192 for q/k/v/gate/up
    with pytest.raises(ValueError, match=r"model\.layers\.0\.(self_attn|mlp)\.\w+_proj: group size 128 does not divide K=192"):
        q.quantize_checkpoint(src, dst, group_size=128, progress=False)
    assert not dst.exists()
    q.quantize_checkpoint(src, dst, group_size=64, progress=False)


@pytest.mark.parametrize("bad", [0, 16, 100, 256])
def test_unsupported_group_size(tmp_path, fp16_ckpt, bad):
    with pytest.raises(ValueError, match="unsupported group size"):
        q.quantize_checkpoint(fp16_ckpt[0], tmp_path / "dst", group_size=bad, progress=False)


def test_refusals(tmp_path, fp16_ckpt):
    src = fp16_ckpt[0]
    dst = tmp_path / "dst"
    q.quantize_checkpoint(src, dst, group_size=64, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        q.quantize_checkpoint(src, dst, group_size=64, progress=False)
    q.quantize_checkpoint(src, dst, group_size=128, fmt="quick", overwrite=True, progress=False)
    assert read_config(dst)["quantization_config"]["quant_method"] == "quick"
    with pytest.raises(ValueError, match="already quantised"):
        q.quantize_checkpoint(dst, tmp_path / "again", progress=False)
    with pytest.raises(ValueError, match="source folder"):
        q.quantize_checkpoint(src, src, progress=False)
    with pytest.raises(ValueError, match="format"):
        q.quantize_checkpoint(src, tmp_path / "x", fmt="gptq", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        q.quantize_checkpoint(empty, tmp_path / "y", progress=False)


# ----------------------------------------------------------------------------------------------
# dequantize
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["awq", "quick"])
def test_dequantize_exact(tmp_path, fp16_ckpt, fmt):
    src, orig = fp16_ckpt
    qdir, back = tmp_path / "q", tmp_path / "back"
    q.quantize_checkpoint(src, qdir, group_size=64, fmt=fmt, progress=False)
    dq.dequantize_checkpoint(qdir, back, dtype="float32", progress=False)
    quant, restored = load_all(qdir), load_all(back)
    assert set(restored) == set(orig)
    for name, w in orig.items():
        r = restored[name]
        assert r.dtype == torch.float32 and r.shape == w.shape, name
        if name in quant:  # unquantised: the fp16 values, widened
            assert torch.equal(r, quant[name].float()), name
            continue
        prefix = name[: -len(".weight")]
        tensors = [quant[f"{prefix}.{s}"] for s in ("qweight", "qzeros", "scales")]
        if fmt == "awq":
            ref = layout.dequantize(layout.awq_unpack(tensors[0]), layout.awq_unpack(tensors[1]), tensors[2])
        else:
            ref = layout.dequantize_quick(*tensors)
        assert torch.equal(r, ref.t()), name  # bit-exact, HF [N, K]
        assert float((r - w.float()).abs().max()) < 0.05 / 2, name
    config = read_config(back)
    assert "quantization_config" not in config
    assert config["torch_dtype"] == "float32" and config["dtype"] == "float32"
    assert (back / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dequantize_dtype(tmp_path, fp16_ckpt, dtype):
    qdir, back = tmp_path / "q", tmp_path / "back"
    q.quantize_checkpoint(fp16_ckpt[0], qdir, group_size=128, progress=False)
    dq.dequantize_checkpoint(qdir, back, dtype=dtype, progress=False)
    restored = load_all(back)
    assert {t.dtype for t in restored.values()} == {getattr(torch, dtype)}
    exact = load_all(tmp_path / "q")
    w = restored["model.layers.0.mlp.up_proj.weight"]
    ref = layout.dequantize(
        layout.awq_unpack(exact["model.layers.0.mlp.up_proj.qweight"]),
        layout.awq_unpack(exact["model.layers.0.mlp.up_proj.qzeros"]),
        exact["model.layers.0.mlp.up_proj.scales"],
    ).t().to(getattr(torch, dtype))
    assert torch.equal(w, ref)
    assert read_config(back)["torch_dtype"] == dtype


def test_dequantize_refuses_unquantised_and_other_methods(tmp_path, fp16_ckpt):
    with pytest.raises(ValueError, match="quant_method"):
        dq.dequantize_checkpoint(fp16_ckpt[0], tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="dtype"):
        dq.dequantize_checkpoint(fp16_ckpt[0], tmp_path / "x", dtype="int8", progress=False)


def test_quick_gemm_matches_dequantized_linear(tmp_path, fp16_ckpt):
    """The reference op on the QUICK tensors equals F.linear with the dequantised fp32 weight:
    the property the end-to-end greedy-equality test rests on."""
    import vllm_quick.ops  # noqa: F401  (registers torch.ops.quick.gemm)

    qdir, back = tmp_path / "q", tmp_path / "back"
    q.quantize_checkpoint(fp16_ckpt[0], qdir, group_size=32, fmt="quick", progress=False)
    dq.dequantize_checkpoint(qdir, back, progress=False)
    quant, restored = load_all(qdir), load_all(back)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    prefix = "model.layers.1.mlp.down_proj"
    y_op = torch.ops.quick.gemm(
        x, quant[f"{prefix}.qweight"], quant[f"{prefix}.qzeros"], quant[f"{prefix}.scales"], None, 32, 128
    )
    y_ref = torch.nn.functional.linear(x, restored[f"{prefix}.weight"])
    assert torch.equal(y_op, y_ref)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_quantize_and_dequantize(tmp_path, fp16_ckpt, capsys):
    src = str(fp16_ckpt[0])
    qdir, back = str(tmp_path / "q"), str(tmp_path / "back")
    args = _parse(q, [src, qdir, "--group-size", "64", "--format", "quick", "--modules-to-not-convert", "down_proj",
                      "--quiet"])
    assert q.run(args) == 0
    qc = read_config(Path(qdir))["quantization_config"]
    assert (qc["quant_method"], qc["group_size"], qc["modules_to_not_convert"]) == ("quick", 64, ["down_proj"])
    assert dq.run(_parse(dq, [qdir, back, "--dtype", "float16", "--quiet"])) == 0
    assert read_config(Path(back))["torch_dtype"] == "float16"
    # errors come back as exit code 1 and a message, not a traceback
    assert q.run(_parse(q, [src, qdir, "--quiet"])) == 1
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(q, [src, qdir, "--group-size", "96"])


def test_cli_defaults():
    args = _parse(q, ["a", "b"])
    assert (args.group_size, args.fmt, args.modules_to_not_convert) == (128, "awq", [])
    assert args.max_shard_size == 5 * 1024**3
    assert _parse(q, ["a", "b", "--max-shard-size", "500MB"]).max_shard_size == 500 * 1024**2
    assert _parse(dq, ["a", "b"]).dtype == "float32"
