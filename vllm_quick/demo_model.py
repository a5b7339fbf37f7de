"""``vllm-quick make-demo``: build the tiny bundled demo model, offline, in seconds.

The demo is a real ``LlamaForCausalLM`` checkpoint with random weights (hidden 256, 2 layers,
4 query heads and 2 KV heads of 64 (GQA), MLP 512) and a byte-level BPE tokenizer trained here on
the few KB of text in :mod:`vllm_quick.demo_corpus`. It is written as an fp16 Hugging Face
checkpoint into a temporary folder and then quantised with :func:`vllm_quick.quantize.
quantize_checkpoint`, so it exercises exactly the path a user's own model takes. Everything is
deterministic: re-running writes byte-identical files.

Its text is gibberish (the weights are random) but everything around it is real: vLLM loads it,
``/v1/completions`` and ``/v1/chat/completions`` (through the chat template) work, and greedy
decoding is reproducible.

Initialisation, chosen for the end-to-end test rather than for realism: decoder Linears have std
``1/sqrt(fan_in)`` (so attention is not uniform and the quantised layers actually shape the
output), embeddings std 1 and ``lm_head`` std 0.25 (logits with std ~4 after the final RMSNorm,
so the greedy choice is rarely a near-tie that two different fp32 matmul orders could flip).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from vllm_quick.quantize import FORMATS, SUPPORTED_GROUP_SIZES, quantize_checkpoint, write_json

# ----------------------------------------------------------------------------------------------
# the model's shape and tokens
# ----------------------------------------------------------------------------------------------
HIDDEN = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
INTERMEDIATE = 512
MAX_POSITIONS = 2048
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5
VOCAB_MULTIPLE = 64
BPE_VOCAB = 512  # BPE training target (specials + 256 byte symbols + merges)
SEED = 20240216

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)  # ids 0..5, in this order

# Each turn: "<|role|>\n{content}</s>\n"; the prompt ends with "<|assistant|>\n" when asked to.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

EMBED_STD = 1.0
LM_HEAD_STD = 0.25


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def train_tokenizer():
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on the embedded corpus.

    Byte-level means every string round-trips, whatever its characters. A post-processor adds
    ``<s>`` in front of every encoded text (as Llama tokenizers do); the chat template writes its
    own ``<s>``, and vLLM encodes chat prompts without adding special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from vllm_quick.demo_corpus import CORPUS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != i:
            raise RuntimeError(f"demo tokenizer: special token {token} did not get id {i}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": list(ROLE_TOKENS),
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def padded_vocab(tokenizer_size: int) -> int:
    return -(-tokenizer_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def llama_config(
    *, vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
    head_dim: int, max_positions: int, rms_norm_eps: float, rope_theta: float,
    bos_token_id: int, eos_token_id: int,
) -> dict:
    """A ``LlamaForCausalLM`` config.json (fp16, untied embeddings). RoPE is written both as
    transformers 5 ``rope_parameters`` and as the older ``rope_theta``/``rope_scaling`` keys so
    either generation of transformers reads it. Also used by benchmarks/serving_models.py."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": "float16",
        "dtype": "float16",
    }


def model_config(vocab_size: int) -> dict:
    """config.json of the demo model."""
    config = llama_config(
        vocab_size=vocab_size, hidden=HIDDEN, intermediate=INTERMEDIATE, layers=LAYERS, heads=HEADS,
        kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_positions=MAX_POSITIONS, rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA, bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS),
    )
    config["pad_token_id"] = SPECIAL_TOKENS.index(PAD)
    return config


def generation_config() -> dict:
    return {
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
    }


def init_weights(vocab_size: int, seed: int = SEED) -> dict:
    """Deterministic fp16 weights under the Hugging Face Llama tensor names."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(torch.float16)

    def linear(n_out, n_in):
        return normal((n_out, n_in), n_in**-0.5)

    ones = lambda n: torch.ones(n, dtype=torch.float16)
    w = {"model.embed_tokens.weight": normal((vocab_size, HIDDEN), EMBED_STD)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = ones(HIDDEN)
        w[f"{p}.self_attn.q_proj.weight"] = linear(HEADS * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.k_proj.weight"] = linear(KV_HEADS * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.v_proj.weight"] = linear(KV_HEADS * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.o_proj.weight"] = linear(HIDDEN, HEADS * HEAD_DIM)
        w[f"{p}.post_attention_layernorm.weight"] = ones(HIDDEN)
        w[f"{p}.mlp.gate_proj.weight"] = linear(INTERMEDIATE, HIDDEN)
        w[f"{p}.mlp.up_proj.weight"] = linear(INTERMEDIATE, HIDDEN)
        w[f"{p}.mlp.down_proj.weight"] = linear(HIDDEN, INTERMEDIATE)
    w["model.norm.weight"] = ones(HIDDEN)
    w["lm_head.weight"] = normal((vocab_size, HIDDEN), LM_HEAD_STD)
    return w


def build_fp16_checkpoint(dst: str | Path) -> Path:
    """Write the unquantised fp16 demo checkpoint (weights, config, tokenizer) into ``dst``."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    vocab_size = padded_vocab(tokenizer.get_vocab_size(with_added_tokens=True))
    tokenizer.save(str(dst / "tokenizer.json"), pretty=False)
    write_json(dst / "tokenizer_config.json", tokenizer_config())
    write_json(dst / "generation_config.json", generation_config())
    write_json(dst / "config.json", model_config(vocab_size))
    save_file(init_weights(vocab_size), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def make_demo_model(dst: str | Path, fmt: str = "awq", group_size: int = 64, progress: bool = False) -> Path:
    """Build the demo model and quantise it (``fmt`` "awq" or "quick") into ``dst``; returns it.

    A checkpoint already in ``dst`` is replaced (its weight files and config are rewritten).
    """
    with tempfile.TemporaryDirectory(prefix="vllm-quick-demo-") as tmp:
        build_fp16_checkpoint(tmp)
        return quantize_checkpoint(tmp, dst, group_size=group_size, fmt=fmt, overwrite=True, progress=progress)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dst", metavar="DST", help="output folder (created; an old demo there is replaced)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="awq", help="checkpoint format (default awq)")
    parser.add_argument(
        "--group-size", type=int, default=64, choices=SUPPORTED_GROUP_SIZES, help="quantisation group size (default 64)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        dst = make_demo_model(args.dst, fmt=args.fmt, group_size=args.group_size)
    except (ValueError, OSError) as e:
        print(f"vllm-quick make-demo: error: {e}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in Path(dst).iterdir() if p.is_file())
    config = json.loads((Path(dst) / "config.json").read_text())
    print(
        f"wrote the {args.fmt} demo model (group size {args.group_size}, vocab {config['vocab_size']}, "
        f"{size / 1e6:.1f} MB) to {dst}"
    )
    return 0
