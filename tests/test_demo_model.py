"""vllm-quick make-demo: the tiny bundled model builds offline, fast, deterministically, and loads."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch
from safetensors import safe_open

from vllm_quick import demo_model, layout
from vllm_quick.dequantize import dequantize_checkpoint


def tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture(scope="module")
def demo_awq(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "awq"
    start = time.perf_counter()
    demo_model.make_demo_model(path)
    return path, time.perf_counter() - start


def test_builds_fast_and_small(demo_awq):
    path, seconds = demo_awq
    assert seconds < 20, f"make-demo took {seconds:.1f}s"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert sum(p.stat().st_size for p in path.iterdir()) < 4_000_000


def test_config(demo_awq):
    path, _ = demo_awq
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    expect = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 64, "intermediate_size": 512, "max_position_embeddings": 2048,
              "tie_word_embeddings": False, "torch_dtype": "float16"}
    assert {k: config[k] for k in expect} == expect
    assert config["vocab_size"] % 64 == 0
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": [],
    }

    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    assert hf.model_type == "llama" and hf.num_key_value_heads == 2 and hf.head_dim == 64
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
    assert rope["rope_theta"] == 10000.0


def test_tensors(demo_awq):
    path, _ = demo_awq
    t = tensors(path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    assert t["model.embed_tokens.weight"].shape == (vocab, 256)
    assert t["lm_head.weight"].shape == (vocab, 256)
    assert t["model.embed_tokens.weight"].dtype == torch.float16
    assert torch.equal(t["model.norm.weight"], torch.ones(256, dtype=torch.float16))
    shapes = {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (256, 128), "self_attn.v_proj": (256, 128),
              "self_attn.o_proj": (256, 256), "mlp.gate_proj": (256, 512), "mlp.up_proj": (256, 512),
              "mlp.down_proj": (512, 256)}
    for i in range(2):
        for lin, (k, n) in shapes.items():
            p = f"model.layers.{i}.{lin}"
            assert t[f"{p}.qweight"].shape == (k, n // 8), p
            assert t[f"{p}.qzeros"].shape == (k // 64, n // 8), p
            assert t[f"{p}.scales"].shape == (k // 64, n), p
    assert len(t) == 3 + 2 * (2 + 7 * 3)


def test_tokenizer_round_trip_and_chat_template(demo_awq):
    from transformers import AutoTokenizer

    path, _ = demo_awq
    tok = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert len(tok) <= config["vocab_size"]
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert (tok.bos_token_id, tok.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])

    for text in ["Hello, how are you today?", "The quick brown fox jumps over the lazy dog.",
                 "Unseen: café, naïve, 你好, emoji 🙂, tabs\tand\nnewlines  "]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # the corpus was learnt: common words are single tokens
    assert len(tok(" the", add_special_tokens=False).input_ids) == 1

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there!</s>\n<|assistant|>\n"
    no_gen = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_gen == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there!</s>\n"
    # role markers are single special tokens, and the rendered prompt carries exactly one <s>
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|user|>")) == 1
    assert ids.count(tok.bos_token_id) == 1


def test_deterministic_and_quick_format(tmp_path, demo_awq):
    path, _ = demo_awq
    again = demo_model.make_demo_model(tmp_path / "again")
    for p in path.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name

    quick = demo_model.make_demo_model(tmp_path / "quick", fmt="quick", group_size=64)
    qc = json.loads((quick / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quick" and qc["layout_version"] == layout.LAYOUT_VERSION
    a, b = tensors(path), tensors(quick)
    p = "model.layers.1.self_attn.k_proj"
    expect = layout.awq_to_quick(a[f"{p}.qweight"], a[f"{p}.qzeros"], a[f"{p}.scales"])
    for got, want in zip((b[f"{p}.qweight"], b[f"{p}.qzeros"], b[f"{p}.scales"]), expect):
        assert torch.equal(got, want)


def test_dequantized_demo_runs_in_transformers(tmp_path, demo_awq):
    """The dequantised demo is a complete HF Llama (no missing/unexpected weights), and its
    logits are far from flat, so greedy decoding has a margin."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = demo_awq
    plain = dequantize_checkpoint(path, tmp_path / "plain", dtype="float32", progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert float(logits.std()) > 2.0
    top2 = logits.topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).median()) > 0.1


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo_model.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "d"), "--format", "quick", "--group-size", "128"])
    assert demo_model.run(args) == 0
    assert "quick demo model" in capsys.readouterr().out
    qc = json.loads((tmp_path / "d" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["group_size"]) == ("quick", 128)
    defaults = parser.parse_args(["x"])
    assert (defaults.fmt, defaults.group_size) == ("awq", 64)
