"""Write the model folders of the serving benchmark, offline: Llama-3-8B shapes, no weights.

    python -m benchmarks.serving_models DEST        # -> DEST/llama3-8b-awq, DEST/llama3-8b-fp16

The servers in ``serving_configs/llama3_8b_*.yaml`` run with ``--load-format dummy``: vLLM builds
the model from ``config.json`` and fills it with random values, so no checkpoint has to exist (or
travel to the GPU machine). What a folder needs is therefore only:

* ``config.json`` with Llama-3-8B's shapes (hidden 4096, 32 layers, 32 query / 8 KV heads,
  MLP 14336, vocabulary 128256, RoPE theta 500000, 8192 positions). The ``-awq`` folder adds an
  AutoAWQ GEMM ``quantization_config`` (4 bit, group 128, zero points), so ``--quantization
  quick | awq | awq_marlin | awq_legacy`` all see the same checkpoint; the ``-fp16`` folder has none.
* a tokenizer. Dummy weights generate *any* of the 128256 ids, so the tokenizer covers exactly
  that many (as Llama-3's does: 128000 ordinary tokens, then 256 special ones with Llama-3's names
  and ids), and every generated id detokenizes. It is a word-level tokenizer over made-up
  pronounceable words, split on whitespace: a text of n vocabulary words is exactly n tokens,
  which lets the load tests build chat prompts of an exact length too.

Everything is deterministic; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_quick.demo_model import llama_config

# ----------------------------------------------------------------------------------------------
# Llama-3-8B (Meta-Llama-3-8B config.json values)
# ----------------------------------------------------------------------------------------------
HIDDEN = 4096
LAYERS = 32
HEADS = 32
KV_HEADS = 8
INTERMEDIATE = 14336
VOCAB = 128256
ROPE_THETA = 500000.0
MAX_POSITIONS = 8192
RMS_NORM_EPS = 1e-5

AWQ_QUANTIZATION_CONFIG = {
    "quant_method": "awq",
    "bits": 4,
    "group_size": 128,
    "zero_point": True,
    "version": "gemm",
    "modules_to_not_convert": None,  # as AutoAWQ writes it: every decoder linear is quantised
}

FOLDERS = {"awq": "llama3-8b-awq", "fp16": "llama3-8b-fp16"}

# ----------------------------------------------------------------------------------------------
# tokenizer: 128000 words + Llama-3's 256 special tokens
# ----------------------------------------------------------------------------------------------
ORDINARY = 128000
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
# The first words are the ones the chat template writes, so they are single tokens too.
FIXED_WORDS = ("system", "user", "assistant")
UNK = "<|reserved_special_token_247|>"  # id 128255, the last one: stands for words outside the vocabulary

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_CONSONANTS = "bdfgklmnprstvz"  # 14
_VOWELS = "aeiou"  # 5
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]  # 70; 70**3 = 343000 three-syllable words


def special_tokens() -> list[str]:
    """Llama-3's 256 special tokens, in id order (id = 128000 + index)."""
    names = [BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", START_HEADER, END_HEADER,
             "<|eom_id|>", EOT, "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + VOCAB - ORDINARY - len(names))]
    assert len(names) == VOCAB - ORDINARY and UNK in names
    return names


def words() -> list[str]:
    """``ORDINARY`` distinct lowercase made-up words, deterministic: the fixed chat words, then
    three-syllable words visited in a scrambled order (an odd stride through all 70**3)."""
    n = len(_SYLLABLES)
    total = n**3
    out = list(FIXED_WORDS)
    seen = set(out)
    i = 0
    while len(out) < ORDINARY:
        k = (i * 7919 + 12345) % total  # 7919 is prime and does not divide 343000: a permutation
        i += 1
        w = _SYLLABLES[k // (n * n)] + _SYLLABLES[(k // n) % n] + _SYLLABLES[k % n]
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_tokenizer():
    """The word-level ``tokenizers.Tokenizer`` described in the module docstring."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = special_tokens()
    vocab = {w: i for i, w in enumerate(words())}
    vocab.update({t: ORDINARY + i for i, t in enumerate(specials)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Word level: decoding joins the words with single spaces (special tokens are kept when asked).
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # Like Llama-3: every encoded text starts with <|begin_of_text|> (vLLM adds none to chat prompts,
    # whose template writes its own).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, ORDINARY)]
    )
    if tokenizer.get_vocab_size() != VOCAB:
        raise RuntimeError(f"bench tokenizer has {tokenizer.get_vocab_size()} tokens, expected {VOCAB}")
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,  # the end of a chat turn, as in Llama-3-Instruct
        "pad_token": EOS,
        "unk_token": UNK,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------
def model_config(quantized: bool) -> dict:
    """config.json. RoPE is written both as transformers 5 ``rope_parameters`` and as the older
    ``rope_theta``/``rope_scaling`` keys, so either generation of transformers reads it
    (:func:`vllm_quick.demo_model.llama_config`)."""
    config = llama_config(
        vocab_size=VOCAB, hidden=HIDDEN, intermediate=INTERMEDIATE, layers=LAYERS, heads=HEADS,
        kv_heads=KV_HEADS, head_dim=HIDDEN // HEADS, max_positions=MAX_POSITIONS,
        rms_norm_eps=RMS_NORM_EPS, rope_theta=ROPE_THETA,
        bos_token_id=ORDINARY,  # <|begin_of_text|>
        eos_token_id=ORDINARY + 1,  # <|end_of_text|>
    )
    # As in Meta's config.json. Without the key, transformers 5 warns about a Mistral regex.
    config["transformers_version"] = "4.40.0"
    if quantized:
        config["quantization_config"] = dict(AWQ_QUANTIZATION_CONFIG)
    return config


def generation_config() -> dict:
    return {"bos_token_id": ORDINARY, "eos_token_id": [ORDINARY + 1, ORDINARY + 9]}  # end_of_text, eot_id


# ----------------------------------------------------------------------------------------------
def write_model_folder(dest: str | Path, quantized: bool, tokenizer=None) -> Path:
    """One folder (``config.json``, ``generation_config.json``, the tokenizer files); no weights."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.safetensors"):  # a folder with weights would not be "dummy" any more
        stale.unlink()
    tokenizer = tokenizer or build_tokenizer()
    tokenizer.save(str(dest / "tokenizer.json"))
    for name, payload in (
        ("config.json", model_config(quantized)),
        ("generation_config.json", generation_config()),
        ("tokenizer_config.json", tokenizer_config()),
        ("special_tokens_map.json", {"bos_token": BOS, "eos_token": EOT, "pad_token": EOS, "unk_token": UNK}),
    ):
        (dest / name).write_text(json.dumps(payload, indent=2) + "\n")
    return dest


def write_serving_models(dest: str | Path) -> dict[str, Path]:
    """Both folders under ``dest``: ``{"awq": dest/llama3-8b-awq, "fp16": dest/llama3-8b-fp16}``."""
    tokenizer = build_tokenizer()
    return {kind: write_model_folder(Path(dest) / name, kind == "awq", tokenizer) for kind, name in FOLDERS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", help="folder to write llama3-8b-awq/ and llama3-8b-fp16/ into")
    args = parser.parse_args(argv)
    for kind, path in write_serving_models(args.dest).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
