"""serving_configs/llama3_8b_*.yaml, the model folders they serve (benchmarks/serving_models.py)
and the benchmark-only ``awq_legacy`` method (benchmarks/awq_legacy.py), on the CPU.

The H100 comparison is only fair if the five servers differ in nothing but the quantization
method: checked here key by key. vLLM's own argument parser (the CPU build, 0.32) must accept
every file, and its model config must accept the two model folders as each server will use them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from load_tests.run_load import parse_bench_comments, server_env

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "serving_configs"
SERVERS = {  # name: (quantization, model folder)
    "quick": ("quick", "llama3-8b-awq"),
    "awq": ("awq", "llama3-8b-awq"),
    "awq_marlin": ("awq_marlin", "llama3-8b-awq"),
    "awq_legacy": ("awq_legacy", "llama3-8b-awq"),
    "fp16": (None, "llama3-8b-fp16"),
}
COMMON_ENV = {"VLLM_DISABLE_COMPILE_CACHE": "1"}
MARLIN_ONLY = "CutlassW4A8LinearKernel,MacheteLinearKernel,AllSparkLinearKernel"


def config_path(name: str) -> Path:
    return CONFIGS / f"llama3_8b_{name}.yaml"


def load(name: str) -> dict:
    return yaml.safe_load(config_path(name).read_text())


# ----------------------------------------------------------------------------------------------
# the YAML files
# ----------------------------------------------------------------------------------------------
def test_exactly_the_five_servers():
    assert sorted(p.name for p in CONFIGS.glob("llama3_8b_*.yaml")) == sorted(
        config_path(n).name for n in SERVERS)


def test_identical_settings_except_quantization():
    reference = {k: v for k, v in load("quick").items() if k != "quantization"}
    for name, (quant, _) in SERVERS.items():
        settings = load(name)
        assert settings.get("quantization") == quant, name
        assert {k: v for k, v in settings.items() if k != "quantization"} == reference, name


def test_settings_are_the_benchmark_ones():
    s = load("quick")
    assert s["load-format"] == "dummy" and s["dtype"] == "float16"
    assert s["max-num-seqs"] == 256 and s["max-model-len"] >= 512 + 128
    assert 0 < s["gpu-memory-utilization"] <= 0.95
    assert s["host"] == "127.0.0.1"
    # default torch.compile + CUDA graphs: nothing may turn them off
    assert not any(k in s for k in ("enforce-eager", "compilation-config", "cudagraph-capture-sizes"))


def test_bench_comments():
    for name, (_, model) in SERVERS.items():
        bench = parse_bench_comments(config_path(name))
        assert bench["name"] == name and bench["model"] == model
        env = dict(bench["env"])
        assert {k: env.pop(k) for k in COMMON_ENV} == COMMON_ENV, name
        if name == "awq_marlin":
            assert env == {"VLLM_DISABLED_KERNELS": MARLIN_ONLY}
        elif name == "awq_legacy":
            assert env == {"PYTHONPATH": "{repo}/benchmarks/awq_legacy_plugin:{repo}",
                           "VLLM_QUICK_BENCH_AWQ_LEGACY": "1"}
        else:
            assert env == {}, name
    # why, in words, for whoever starts these servers by hand
    assert "Marlin runs only when" in config_path("awq_marlin").read_text()
    assert "AutoAWQLinearMethod" in config_path("awq_legacy").read_text()


def test_vllm_parser_accepts_every_config(serving_models):
    """vLLM's `vllm serve` parser reads each file (`--config`), the command-line port wins, and the
    engine arguments are the file's."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    for name, (quant, model) in SERVERS.items():
        args = parser.parse_args(["serve", str(serving_models[model]), "--config", str(config_path(name)),
                                  "--port", "18123"])
        assert args.model_tag == str(serving_models[model])
        args.model = args.model_tag
        engine = AsyncEngineArgs.from_cli_args(args)
        assert (engine.quantization, engine.load_format, engine.dtype) == (quant, "dummy", "float16"), name
        assert (engine.max_num_seqs, engine.enforce_eager) == (256, False), name
        assert args.port == 18123 and args.host == "127.0.0.1"


# ----------------------------------------------------------------------------------------------
# the model folders
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serving_models(tmp_path_factory) -> dict[str, Path]:
    from benchmarks.serving_models import FOLDERS, write_serving_models

    folders = write_serving_models(tmp_path_factory.mktemp("serving_models"))
    return {FOLDERS[kind]: path for kind, path in folders.items()}


def test_model_folders_have_llama3_8b_shapes(serving_models):
    awq = json.loads((serving_models["llama3-8b-awq"] / "config.json").read_text())
    fp16 = json.loads((serving_models["llama3-8b-fp16"] / "config.json").read_text())
    expected = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0,
                "max_position_embeddings": 8192, "architectures": ["LlamaForCausalLM"]}
    for config in (awq, fp16):
        assert {k: config[k] for k in expected} == expected
    assert awq["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": None}
    assert "quantization_config" not in fp16
    for folder in serving_models.values():
        assert not list(folder.glob("*.safetensors")), "dummy weights: the folders hold no checkpoint"


def test_tokenizer_covers_the_vocabulary(serving_models):
    from transformers import AutoTokenizer

    from benchmarks.serving_models import ORDINARY, words

    tok = AutoTokenizer.from_pretrained(str(serving_models["llama3-8b-awq"]))
    assert len(tok) == 128256
    assert (tok.bos_token_id, tok.eos_token_id) == (128000, 128009)
    vocab = words()
    assert len(set(vocab)) == ORDINARY
    text = " ".join(vocab[i] for i in (5, 77_777, 127_999, 1, 0))
    ids = tok(text)["input_ids"]
    assert ids == [128000, 5, 77_777, 127_999, 1, 0]  # one token per word, after <|begin_of_text|>
    assert tok.decode(ids, skip_special_tokens=True) == text
    # every id the dummy model can generate decodes (the ordinary ones to words, the rest to specials)
    assert tok.convert_ids_to_tokens([0, 127_999, 128_000, 128_255]) == [vocab[0], vocab[-1], "<|begin_of_text|>",
                                                                          "<|reserved_special_token_247|>"]
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("folder, quantization, expected", [
    ("llama3-8b-awq", "quick", "quick"),
    ("llama3-8b-fp16", None, None),
])
def test_vllm_model_config_accepts_folders(serving_models, folder, quantization, expected):
    from vllm.config import ModelConfig

    import vllm_quick

    vllm_quick.register()
    mc = ModelConfig(model=str(serving_models[folder]), quantization=quantization, dtype="float16",
                     max_model_len=2048)
    assert mc.quantization == expected
    assert (mc.get_vocab_size(), mc.get_hidden_size(), mc.hf_config.num_key_value_heads) == (128256, 4096, 8)


# ----------------------------------------------------------------------------------------------
# awq_legacy
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def awq_legacy():
    auto_awq = pytest.importorskip("vllm.model_executor.layers.quantization.auto_awq")
    if not hasattr(auto_awq, "AutoAWQLinearMethod"):
        pytest.skip("this vLLM has no AutoAWQLinearMethod (awq_legacy only matters on the GPU's vLLM 0.26)")
    from benchmarks import awq_legacy

    return awq_legacy


def test_awq_legacy_register_needs_the_switch(awq_legacy, monkeypatch):
    calls = []
    monkeypatch.setattr(awq_legacy, "register_now", lambda: calls.append(1))
    monkeypatch.setattr(awq_legacy, "_registered", False)
    monkeypatch.delenv(awq_legacy.ENV_SWITCH, raising=False)
    awq_legacy.register()
    assert calls == []
    monkeypatch.setenv(awq_legacy.ENV_SWITCH, "1")
    awq_legacy.register()
    assert calls == [1]


def test_awq_legacy_registered_config(awq_legacy, serving_models):
    from vllm.config import ModelConfig
    from vllm.model_executor.layers.quantization import get_quantization_config

    cls = awq_legacy.register_now()
    assert get_quantization_config("awq_legacy") is cls is awq_legacy.AWQLegacyConfig
    assert cls.get_name() == "awq_legacy"
    cfg = cls.from_config(json.loads((serving_models["llama3-8b-awq"] / "config.json").read_text())
                          ["quantization_config"])
    assert (cfg.weight_bits, cfg.group_size, cfg.zero_point) == (4, 128, True)
    # claims an AWQ checkpoint only when asked for by name
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
    assert cls.override_quantization_method(awq, "awq_legacy") == "awq_legacy"
    assert cls.override_quantization_method(awq, None) is None
    assert cls.override_quantization_method(awq, "awq") is None
    mc = ModelConfig(model=str(serving_models["llama3-8b-awq"]), quantization="awq_legacy", dtype="float16",
                     max_model_len=2048)
    assert mc.quantization == "awq_legacy"


def test_awq_legacy_uses_autoawq_linear_method(awq_legacy, vllm_dist):
    import torch
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQLinearMethod

    cfg = awq_legacy.register_now().from_config({"bits": 4, "group_size": 128, "zero_point": True,
                                                 "modules_to_not_convert": ["o_proj"]})
    qkv = QKVParallelLinear(512, 64, 8, 2, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.qkv_proj",
                            params_dtype=torch.float16)
    assert type(qkv.quant_method) is AutoAWQLinearMethod
    assert tuple(qkv.qweight.shape) == (512, (8 + 2 + 2) * 64 // 8) and qkv.scales.shape[0] == 512 // 128
    skipped = RowParallelLinear(512, 512, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.o_proj",
                                params_dtype=torch.float16)
    assert not isinstance(skipped.quant_method, AutoAWQLinearMethod)  # modules_to_not_convert still honoured


def test_awq_legacy_plugin_loads_only_with_the_config_env(awq_legacy):
    """The `# bench-env:` lines of llama3_8b_awq_legacy.yaml make a fresh vLLM process register
    awq_legacy through its plugin loader; without them the entry point is not even visible."""
    env = server_env({k: v.replace("{repo}", str(REPO))
                      for k, v in parse_bench_comments(config_path("awq_legacy"))["env"].items()})
    probe = ("from importlib.metadata import entry_points\n"
             "names = [e.name for e in entry_points(group='vllm.general_plugins')]\n"
             "print('awq_legacy' in names)\n")
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd="/")
    assert plain.stdout.strip() == "False", plain.stderr
    probe += ("from vllm.plugins import load_general_plugins\nload_general_plugins()\n"
              "from vllm.model_executor.layers.quantization import get_quantization_config\n"
              "print(get_quantization_config('awq_legacy').__name__)\n")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env,
                            cwd="/")
    assert loaded.stdout.split() == ["True", "AWQLegacyConfig"], loaded.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# benchmarks/serving_bench.sh (the GPU-side run): what it would run
# ----------------------------------------------------------------------------------------------
def test_serving_bench_dry_run():
    import shlex

    from load_tests.run_load import parse_args

    r = subprocess.run(["bash", str(REPO / "benchmarks" / "serving_bench.sh")], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "SERVING_BENCH_DRY_RUN": "1"}, cwd="/")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(SERVERS)
    for line, name in zip(lines, SERVERS):
        argv = shlex.split(line)
        assert argv[1:3] == ["-m", "load_tests.run_load"]
        args = parse_args(argv[3:])  # every option is one run_load knows
        assert args.serve == [f"serving_configs/llama3_8b_{name}.yaml"]
        assert (args.concurrency, args.requests_per_user, args.prompt_tokens, args.output_tokens) == (
            "16,64,256", 4, 512, 128)
        assert args.token_ids == "0:128000"  # the bench tokenizer's ordinary words
        assert args.crosscheck == (["quick:64"] if name == "quick" else [])
        assert args.soak == (["quick:2000:256"] if name == "quick" else [])  # issue 5: 2,000 at 256


def test_serving_bench_refuses_unknown_server():
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "serving_bench.sh"), "quick", "int8"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown server 'int8'" in r.stderr
