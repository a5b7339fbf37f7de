"""QuickConfig: registration, the two checkpoint formats, and every start-up refusal."""

from __future__ import annotations

import pytest
import torch

from vllm_quick.layout import LAYOUT_VERSION


def awq_cfg(**over):
    cfg = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    cfg.update(over)
    return cfg


def quick_cfg(**over):
    cfg = {"quant_method": "quick", "bits": 4, "group_size": 64, "zero_point": True,
           "layout_version": LAYOUT_VERSION}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def QuickConfig():
    import vllm_quick

    vllm_quick.register()
    from vllm_quick.config import QuickConfig

    return QuickConfig


# ----------------------------------------------------------------------------------------------
# registration and the happy paths
# ----------------------------------------------------------------------------------------------
def test_registered_with_vllm(QuickConfig):
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    assert "quick" in QUANTIZATION_METHODS
    assert get_quantization_config("quick") is QuickConfig
    assert QuickConfig.get_name() == "quick"
    assert set(QuickConfig.get_supported_act_dtypes()) == {torch.float16, torch.bfloat16, torch.float32}
    assert QuickConfig.get_min_capability() >= 75


def test_plugin_entry_point_points_at_register():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "quick"]
    if not eps:
        pytest.fail("entry point vllm.general_plugins:quick not installed (pip install -e . first)")
    assert eps[0].value == "vllm_quick:register"


def test_stock_autoawq_config(QuickConfig):
    # The keys AutoAWQ actually writes to config.json.
    cfg = QuickConfig.from_config({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                   "version": "gemm", "modules_to_not_convert": None})
    assert (cfg.group_size, cfg.checkpoint_format, cfg.modules_to_not_convert) == (128, "awq", [])


def test_legacy_awq_keys(QuickConfig):
    # quant_config.json of older AutoAWQ: w_bit / q_group_size, no version (gemm then).
    cfg = QuickConfig.from_config({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True})
    assert cfg.group_size == 64 and cfg.checkpoint_format == "awq"


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_quick_config(QuickConfig, group_size):
    cfg = QuickConfig.from_config(quick_cfg(group_size=group_size, modules_to_not_convert=["lm_head"]))
    assert cfg.group_size == group_size and cfg.checkpoint_format == "quick"
    assert cfg.modules_to_not_convert == ["lm_head"]


def test_config_filenames_like_awq(QuickConfig):
    assert set(QuickConfig.get_config_filenames()) == {"quant_config.json", "quantize_config.json"}


# ----------------------------------------------------------------------------------------------
# refusals at start-up: each names the value and what is supported
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, pattern",
    [
        (awq_cfg(bits=8), r"bits=8 is not supported.*4-bit"),
        (awq_cfg(bits=3), r"bits=3"),
        (awq_cfg(zero_point=False), r"zero_point=False is not supported"),
        (awq_cfg(group_size=16), r"group_size=16 is not supported; supported: 32, 64, 128, -1"),
        (awq_cfg(group_size=256), r"group_size=256 is not supported"),
        (awq_cfg(version="gemv"), r"version='gemv' is not supported; only gemm"),
        (awq_cfg(version="GEMV_FAST"), r"version='gemv_fast'"),
        (awq_cfg(lm_head=True), r"lm_head.*not supported"),
        (quick_cfg(layout_version=LAYOUT_VERSION + 1), rf"layout_version={LAYOUT_VERSION + 1}.*{LAYOUT_VERSION}"),
        (quick_cfg(layout_version=None), r"layout_version=None"),
        (quick_cfg(bits=8), r"bits=8"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, r"quant_method='gptq'.*awq, quick"),
    ],
)
def test_unsupported_configs_are_refused(QuickConfig, cfg, pattern):
    with pytest.raises(ValueError, match=pattern):
        QuickConfig.from_config(cfg)


def test_awq_version_upper_case_gemm_is_accepted(QuickConfig):
    assert QuickConfig.from_config(awq_cfg(version="GEMM")).checkpoint_format == "awq"


# ----------------------------------------------------------------------------------------------
# which checkpoints the plugin claims
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hf_cfg, user_quant, expected",
    [
        (awq_cfg(), None, None),  # an AWQ model served without --quantization quick: not ours
        (awq_cfg(), "awq", None),
        (awq_cfg(), "awq_marlin", None),
        (awq_cfg(), "quick", "quick"),
        (quick_cfg(), None, "quick"),
        (quick_cfg(), "quick", "quick"),
        (quick_cfg(), "awq", None),
        ({"quant_method": "gptq", "bits": 4}, "quick", None),
        ({"quant_method": "AWQ", "bits": 4}, "quick", "quick"),
    ],
)
def test_override_quantization_method(QuickConfig, hf_cfg, user_quant, expected):
    assert QuickConfig.override_quantization_method(hf_cfg, user_quant) == expected
    assert QuickConfig.override_quantization_method(hf_cfg, user_quant, hf_config=None) == expected


def test_vllm_model_config_resolves_quick_only_when_asked(QuickConfig, tmp_path):
    """vLLM's own resolution (ModelConfig._verify_quantization) on a local AWQ config.json."""
    import json

    from vllm.config import ModelConfig

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 1, "vocab_size": 512, "max_position_embeddings": 512,
        "torch_dtype": "float16", "quantization_config": awq_cfg(group_size=64),
    }))
    assert ModelConfig(model=str(tmp_path), quantization="quick", dtype="float32",
                       skip_tokenizer_init=True).quantization == "quick"
    assert ModelConfig(model=str(tmp_path), dtype="float16",
                       skip_tokenizer_init=True).quantization != "quick"


# ----------------------------------------------------------------------------------------------
# per-layer decisions (create_weights time)
# ----------------------------------------------------------------------------------------------
def test_group_size_must_divide_layer_input(vllm_dist, QuickConfig):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    cfg = QuickConfig.from_config(awq_cfg(group_size=128))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj'.*group_size 128 does not divide.*192"):
        ColumnParallelLinear(192, 128, bias=False, params_dtype=torch.float16, quant_config=cfg,
                             prefix="model.layers.1.mlp.up_proj")


def test_quick_format_needs_tile_aligned_outputs(vllm_dist, QuickConfig):
    from vllm.model_executor.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear

    cfg = QuickConfig.from_config(quick_cfg())
    with pytest.raises(ValueError, match=r"'lm\.fc'.*\[96\].*multiple of 64"):
        ColumnParallelLinear(128, 96, bias=False, params_dtype=torch.float16, quant_config=cfg, prefix="lm.fc")
    # each shard of a fused layer must be aligned, not only their sum
    with pytest.raises(ValueError, match=r"gate_up_proj.*\[96, 32\]"):
        MergedColumnParallelLinear(128, [96, 32], bias=False, params_dtype=torch.float16, quant_config=cfg,
                                   prefix="model.layers.0.mlp.gate_up_proj")
    # the AWQ form of the same shape is fine: it is padded at load time
    awq = QuickConfig.from_config(awq_cfg(group_size=64))
    ColumnParallelLinear(128, 96, bias=False, params_dtype=torch.float16, quant_config=awq, prefix="lm.fc")


def test_awq_outputs_must_pack(vllm_dist, QuickConfig):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    cfg = QuickConfig.from_config(awq_cfg(group_size=64))
    with pytest.raises(ValueError, match=r"'odd'.*\[100\].*multiple of 8"):
        ColumnParallelLinear(128, 100, bias=False, params_dtype=torch.float16, quant_config=cfg, prefix="odd")


def _qkv(cfg, prefix="model.layers.0.self_attn.qkv_proj"):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    return QKVParallelLinear(256, 64, 4, 2, bias=False, params_dtype=torch.float16, quant_config=cfg, prefix=prefix)


def test_modules_to_not_convert(vllm_dist, QuickConfig):
    from vllm.model_executor.layers.linear import ColumnParallelLinear, UnquantizedLinearMethod

    from vllm_quick.linear import QuickLinearMethod

    cfg = QuickConfig.from_config(awq_cfg(group_size=64, modules_to_not_convert=["layers.1.self_attn", "mlp.down"]))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert isinstance(_qkv(cfg).quant_method, QuickLinearMethod)
    skipped = _qkv(cfg, "model.layers.1.self_attn.qkv_proj")
    assert isinstance(skipped.quant_method, UnquantizedLinearMethod)
    assert skipped.weight.shape == (512, 256)  # a plain weight, loadable from an fp16 tensor
    down = ColumnParallelLinear(128, 64, bias=False, params_dtype=torch.float16, quant_config=cfg,
                                prefix="model.layers.0.mlp.down_proj")
    assert isinstance(down.quant_method, UnquantizedLinearMethod)


def test_modules_to_not_convert_through_fused_shards(vllm_dist, QuickConfig):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    cfg = QuickConfig.from_config(awq_cfg(group_size=64, modules_to_not_convert=["q_proj", "k_proj", "v_proj"]))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert isinstance(_qkv(cfg).quant_method, UnquantizedLinearMethod)

    mixed = QuickConfig.from_config(awq_cfg(group_size=64, modules_to_not_convert=["q_proj"]))
    mixed.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with pytest.raises(ValueError, match=r"qkv_proj.*mixes quantised and unquantised shards"):
        _qkv(mixed)


def test_lm_head_and_embeddings_stay_unquantised(vllm_dist, QuickConfig):
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
    )

    cfg = QuickConfig.from_config(awq_cfg(group_size=64))
    head = ParallelLMHead(512, 256, params_dtype=torch.float16, quant_config=cfg, prefix="lm_head")
    assert isinstance(head.quant_method, UnquantizedEmbeddingMethod)


def test_unlisted_unquantised_layers_found_in_the_files(vllm_dist, QuickConfig, tmp_path):
    """A checkpoint that leaves layers unquantised without listing them: found from the
    safetensors headers (maybe_update_config), matched exactly, through fused shards too."""
    from safetensors.torch import save_file
    from vllm.model_executor.layers.linear import ColumnParallelLinear, UnquantizedLinearMethod

    from vllm_quick.linear import QuickLinearMethod

    i32 = torch.zeros(2, 2, dtype=torch.int32)
    f16 = torch.zeros(2, 2, dtype=torch.float16)
    tensors = {"model.embed_tokens.weight": f16, "model.layers.0.mlp.down_proj.weight": f16}
    for p in ("q_proj", "k_proj", "v_proj"):
        tensors[f"model.layers.0.self_attn.{p}.qweight"] = i32
        tensors[f"model.layers.0.self_attn.{p}.scales"] = f16
        tensors[f"model.layers.1.self_attn.{p}.weight"] = f16
    tensors["model.layers.2.self_attn.q_proj.weight"] = f16  # q unquantised, k/v quantised
    for p in ("k_proj", "v_proj"):
        tensors[f"model.layers.2.self_attn.{p}.qweight"] = i32
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))

    cfg = QuickConfig.from_config(awq_cfg(group_size=64))
    cfg.maybe_update_config(str(tmp_path))
    assert cfg.unquantized_modules == {
        "model.embed_tokens", "model.layers.0.mlp.down_proj", "model.layers.2.self_attn.q_proj",
        *(f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")),
    }
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert isinstance(_qkv(cfg, "model.layers.0.self_attn.qkv_proj").quant_method, QuickLinearMethod)
    assert isinstance(_qkv(cfg, "model.layers.1.self_attn.qkv_proj").quant_method, UnquantizedLinearMethod)
    down = ColumnParallelLinear(128, 64, bias=False, params_dtype=torch.float16, quant_config=cfg,
                                prefix="model.layers.0.mlp.down_proj")
    assert isinstance(down.quant_method, UnquantizedLinearMethod)
    # exact names: layers.0.mlp.down_proj does not make layers.10.mlp.down_proj unquantised
    down10 = ColumnParallelLinear(128, 64, bias=False, params_dtype=torch.float16, quant_config=cfg,
                                  prefix="model.layers.0.mlp.down_proj_extra")
    assert isinstance(down10.quant_method, QuickLinearMethod)
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.qkv_proj.*mixes"):
        _qkv(cfg, "model.layers.2.self_attn.qkv_proj")
    # a hub id (not a local folder) is left alone: nothing is fetched
    other = QuickConfig.from_config(awq_cfg(group_size=64))
    other.maybe_update_config("someone/some-model-awq")
    assert other.unquantized_modules == set()
