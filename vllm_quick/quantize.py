"""``vllm-quick quantize``: round-to-nearest int4 quantisation of a Hugging Face checkpoint.

Reads a Llama-style fp16/bf16/fp32 checkpoint folder (``config.json`` and ``*.safetensors``,
sharded or not) and writes an AWQ-format ("GEMM" version) or a pre-interleaved QUICK checkpoint.

What gets quantised: the ``weight`` of every decoder-layer Linear (``q/k/v/o_proj``,
``gate/up/down_proj`` under ``...layers.<i>.``) unless its module name contains one of
``modules_to_not_convert`` (the same substring rule vLLM applies when loading). Embeddings, norms,
biases and ``lm_head`` are written unquantised, as fp16.

Quantisation (asymmetric, per group of ``group_size`` input features and per output column)::

    lo, hi = min(w, 0), max(w, 0)          over the group (0 is kept inside the range)
    scale  = (hi - lo) / 15                 stored as fp16, rounded *up* (see below)
    zero   = clamp(round(-lo / scale), 0, 15)
    q      = clamp(round(w / scale) + zero, 0, 15)

so ``(q - zero) * scale`` is within ``scale / 2`` of ``w`` for every element. Keeping 0 inside
the range matters only for groups whose weights all have the same sign: with AutoAWQ's plain
``min``/``max`` their zero point falls outside 0..15, gets clamped, and the whole group collapses
onto one value. Rounding the fp16 scale up (never down) guarantees ``hi - lo <= 15 * scale``, so no
value is clipped by more than half a step.

Output tensors per quantised Linear ``<prefix>`` (HF weight ``[N, K]``: N outputs, K inputs):

* ``--format awq``:   ``<prefix>.qweight`` int32 ``[K, N/8]``, ``<prefix>.qzeros`` int32
  ``[K/g, N/8]`` (both :func:`vllm_quick.layout.awq_pack`), ``<prefix>.scales`` fp16 ``[K/g, N]``.
* ``--format quick``: the same names holding :func:`vllm_quick.layout.interleave_weight` /
  ``interleave_zeros`` / ``interleave_scales`` output (``qweight`` int32 ``[K/16, N/64, 128]``);
  needs ``N % 64 == 0``.

The checkpoint I/O helpers at the bottom (reader, sharded writer, file copying) are shared with
:mod:`vllm_quick.dequantize`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Iterable

if TYPE_CHECKING:  # torch is imported lazily so that ``vllm-quick --help`` stays fast
    import torch

SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
FORMATS = ("awq", "quick")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BITS = 4
MAX_CODE = 2**BITS - 1  # 15

# "<anything>layers.<i>.<anything>.<linear name>.weight"
_LINEAR_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?(" + "|".join(LINEAR_NAMES) + r")\.weight$")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3  # bytes, as transformers' "5GB" default


# ----------------------------------------------------------------------------------------------
# the quantiser
# ----------------------------------------------------------------------------------------------
@dataclass
class QuantizedWeight:
    """RTN result for one Linear, in natural (unpacked) order with ``y = x @ W``, ``W`` ``[K, N]``."""

    codes: torch.Tensor  # int32 [K, N], 0..15
    zeros: torch.Tensor  # int32 [G, N], 0..15
    scales: torch.Tensor  # float16 [G, N]


def effective_group_size(group_size: int, k: int) -> int:
    """The number of input features per group: ``group_size``, or K for per-channel (-1)."""
    return k if group_size == -1 else group_size


def check_group_size(group_size: int) -> None:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"unsupported group size {group_size}; supported: 32, 64, 128 or -1 (per-channel)"
        )


def quantize_weight(weight: torch.Tensor, group_size: int, name: str = "weight") -> QuantizedWeight:
    """Quantise one HF Linear weight ``[N, K]`` (any float dtype) by round-to-nearest.

    ``name`` only goes into error messages.
    """
    import torch

    check_group_size(group_size)
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D Linear weight [N, K], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point weight, got {weight.dtype}")
    n, k = weight.shape
    g = effective_group_size(group_size, k)
    if k % g:
        raise ValueError(
            f"{name}: group size {group_size} does not divide K={k} (input features); "
            f"supported group sizes are 32, 64, 128 or -1 (per-channel) dividing K"
        )
    w = weight.detach().to(torch.float32).t().reshape(k // g, g, n)  # [G, g, N]
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: weight contains inf or nan")

    hi = w.amax(dim=1).clamp(min=0.0)  # [G, N]
    lo = w.amin(dim=1).clamp(max=0.0)
    scale32 = (hi - lo).clamp(min=1e-5) / MAX_CODE
    scales = _fp16_round_up(scale32)
    if not torch.isfinite(scales).all():
        raise ValueError(f"{name}: weight range too large for fp16 scales (max |w| = {w.abs().max():.3g})")

    s = scales.to(torch.float32)
    zeros = torch.round(-lo / s).clamp(0, MAX_CODE)
    codes = (torch.round(w / s.unsqueeze(1)) + zeros.unsqueeze(1)).clamp(0, MAX_CODE)
    return QuantizedWeight(
        codes=codes.reshape(k, n).to(torch.int32),
        zeros=zeros.to(torch.int32),
        scales=scales,
    )


def _fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16, rounding up to the next fp16 value wherever plain rounding went down."""
    import torch

    h = x.to(torch.float16)
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.to(torch.float32) < x, up, h)


def pack_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """AWQ tensors (suffix -> tensor) for one quantised Linear."""
    from vllm_quick import layout

    return {
        "qweight": layout.awq_pack(qw.codes),
        "qzeros": layout.awq_pack(qw.zeros),
        "scales": qw.scales.contiguous(),
    }


def pack_quick(qw: QuantizedWeight, name: str = "weight") -> dict[str, torch.Tensor]:
    """Pre-interleaved QUICK tensors (suffix -> tensor) for one quantised Linear."""
    from vllm_quick import layout

    k, n = qw.codes.shape
    check_quick_shape(k, n, k // qw.zeros.shape[0], name)
    return {
        "qweight": layout.interleave_weight(qw.codes),
        "qzeros": layout.interleave_zeros(qw.zeros),
        "scales": layout.interleave_scales(qw.scales),
    }


def check_quick_shape(k: int, n: int, group: int, name: str) -> None:
    from vllm_quick import layout

    if n % layout.TILE_N:
        raise ValueError(
            f"{name}: --format quick needs N % {layout.TILE_N} == 0 (output features), got N={n}; "
            f"write --format awq instead (vLLM's quick method pads AWQ weights at load time)"
        )
    try:
        layout.check_shape(k, n, group)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


# ----------------------------------------------------------------------------------------------
# whole checkpoints
# ----------------------------------------------------------------------------------------------
def is_quantizable(name: str, modules_to_not_convert: Iterable[str] = ()) -> bool:
    """True for the ``.weight`` of a decoder-layer Linear that is not excluded by name."""
    if not _LINEAR_RE.search(name):
        return False
    prefix = name[: -len(".weight")]
    return not any(skip and skip in prefix for skip in modules_to_not_convert)


def quantization_config(fmt: str, group_size: int, modules_to_not_convert: list[str]) -> dict:
    """The ``quantization_config`` entry of config.json (the contract with vllm_quick.config)."""
    from vllm_quick import layout

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    config = {"quant_method": fmt, "bits": BITS, "group_size": group_size, "zero_point": True}
    # AWQ names its packing version; ours names the interleaved layout it was written for.
    config.update({"version": "gemm"} if fmt == "awq" else {"layout_version": layout.LAYOUT_VERSION})
    config["modules_to_not_convert"] = list(modules_to_not_convert)
    return config


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    group_size: int = 128,
    fmt: str = "awq",
    modules_to_not_convert: Iterable[str] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Quantise the checkpoint folder ``src`` into ``dst`` (created); returns ``dst``.

    Every shape is validated before anything is written, so a bad group size or (for ``quick``)
    an N that is not a multiple of 64 fails with a ValueError naming the layer and leaves ``dst``
    untouched. ``overwrite`` allows a ``dst`` that already holds a checkpoint (its weight files
    are replaced).
    """
    import torch
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    check_group_size(group_size)
    skip = [m for m in (modules_to_not_convert or []) if m]

    config = read_config(src)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{src} is already quantised (quant_method={method!r}); give an unquantised checkpoint")
    reader = CheckpointReader(src)

    # Plan and validate everything from the safetensors headers before writing a byte.
    to_quantize = [name for name in reader.names if is_quantizable(name, skip)]
    if not to_quantize:
        raise ValueError(
            f"{src}: found no decoder Linear weights to quantise (expected names such as "
            f"model.layers.0.self_attn.q_proj.weight; modules_to_not_convert={skip})"
        )
    for name in to_quantize:
        _validate_linear(name, reader.shape(name), reader.dtype(name), group_size, fmt)

    prepare_output_dir(src, dst, overwrite)
    writer = ShardWriter(dst, max_shard_size)
    quantized = set(to_quantize)
    by_layer, other = group_by_layer(reader.names)
    with tqdm(total=len(by_layer), desc=f"quantize ({fmt}, g={group_size})", unit="layer", disable=not progress) as bar:
        for layer in sorted(by_layer):
            for name in by_layer[layer]:
                tensor = reader.get(name)
                if name in quantized:
                    prefix = name[: -len(".weight")]
                    qw = quantize_weight(tensor, group_size, prefix)
                    packed = pack_awq(qw) if fmt == "awq" else pack_quick(qw, prefix)
                    for suffix, t in packed.items():
                        writer.add(f"{prefix}.{suffix}", t)
                else:
                    writer.add(name, to_fp16(tensor, name))
            bar.update(1)
    for name in other:
        writer.add(name, to_fp16(reader.get(name), name))
    writer.finish()

    config["quantization_config"] = quantization_config(fmt, group_size, skip)
    set_config_dtype(config, torch.float16)
    write_json(dst / "config.json", config)
    copy_extra_files(src, dst)
    return dst


def _validate_linear(name: str, shape: tuple, dtype: str, group_size: int, fmt: str) -> None:
    prefix = name[: -len(".weight")]
    if len(shape) != 2:
        raise ValueError(f"{prefix}: expected a 2-D Linear weight [N, K], got shape {shape}")
    if dtype not in ("F16", "BF16", "F32"):
        raise ValueError(f"{prefix}: weight dtype {dtype} not supported (need F16, BF16 or F32)")
    n, k = shape
    g = effective_group_size(group_size, k)
    if k % g:
        raise ValueError(
            f"{prefix}: group size {group_size} does not divide K={k} (input features); "
            f"supported group sizes are 32, 64, 128 or -1 (per-channel) dividing K"
        )
    if n % 8:
        raise ValueError(f"{prefix}: AWQ packing needs N % 8 == 0 (output features), got N={n}")
    if fmt == "quick":
        check_quick_shape(k, n, g, prefix)


def to_fp16(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Floating tensors -> fp16 (refusing values fp16 cannot hold); others unchanged."""
    import torch

    if not tensor.is_floating_point() or tensor.dtype == torch.float16:
        return tensor
    out = tensor.to(torch.float16)
    if torch.isinf(out).any() and not torch.isinf(tensor).any():
        raise ValueError(f"{name}: values exceed the fp16 range (max |x| = {tensor.abs().max():.3g})")
    return out


def group_by_layer(names: Iterable[str]) -> tuple[dict[int, list[str]], list[str]]:
    """Split tensor names into ``{layer index: names}`` and the rest (embeddings, final norm...)."""
    by_layer: dict[int, list[str]] = {}
    other: list[str] = []
    for name in names:
        m = _LAYER_RE.search(name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(name)
        else:
            other.append(name)
    return by_layer, other


# ----------------------------------------------------------------------------------------------
# checkpoint I/O (shared with vllm_quick.dequantize)
# ----------------------------------------------------------------------------------------------
WEIGHT_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files never copied from the source folder: weights (rewritten) and the config (rewritten).
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED_NAMES = {"config.json", WEIGHT_INDEX, "pytorch_model.bin.index.json"}


def read_config(src: Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a Hugging Face checkpoint folder)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def set_config_dtype(config: dict, dtype: torch.dtype) -> None:
    """Record the weight dtype under both spellings: ``torch_dtype`` (transformers 4.x, read by
    older vLLM) and ``dtype`` (transformers 5)."""
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    config["dtype"] = name


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint folder (sharded or not)."""

    def __init__(self, src: Path):
        from safetensors import safe_open

        src = Path(src)
        index = src / WEIGHT_INDEX
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{src}: no *.safetensors weights found (pytorch .bin checkpoints are not supported; "
                f"convert them with transformers' save_pretrained(safe_serialization=True))"
            )
        self._handles = {}
        self._file_of: dict[str, str] = {}
        self.names: list[str] = []
        for file in files:
            path = src / file
            if not path.is_file():
                raise FileNotFoundError(f"{src}: {file} is listed in {WEIGHT_INDEX} but missing")
            handle = safe_open(str(path), framework="pt")
            self._handles[file] = handle
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if name in self._file_of:
                    raise ValueError(f"{src}: tensor {name} appears in both {self._file_of[name]} and {file}")
                self._file_of[name] = file
                self.names.append(name)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)

    def shape(self, name: str) -> tuple:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype string (``F16``, ``BF16``, ``F32``, ``I32``...)."""
        return self._handles[self._file_of[name]].get_slice(name).get_dtype()


class ShardWriter:
    """Writes tensors into ``model.safetensors`` or, past ``max_shard_size`` bytes, into
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``."""

    def __init__(self, dst: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE):
        self.dst = Path(dst)
        self.max_shard_size = max_shard_size
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # temporary file, tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        # clone(): safetensors refuses tensors that share storage (e.g. slices of a bigger one)
        self._pending[name] = tensor.detach().contiguous().clone()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = self.dst / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final = [self.dst / SINGLE_FILE]
        else:
            final = [self.dst / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        umask = os.umask(0)
        os.umask(umask)
        for (tmp, names), path in zip(self._shards, final):
            tmp.replace(path)
            os.chmod(path, 0o666 & ~umask)  # safetensors creates its file private (0600)
            weight_map.update({name: path.name for name in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.dst / WEIGHT_INDEX, index)
        return final


def prepare_output_dir(src: Path, dst: Path, overwrite: bool) -> None:
    """Create ``dst``; refuse ``dst == src`` and, unless ``overwrite``, a folder that already
    holds a checkpoint. With ``overwrite`` only old weight files and the index are removed."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"destination {dst} is the source folder; choose another one")
    dst.mkdir(parents=True, exist_ok=True)
    old = sorted(dst.glob("*.safetensors")) + sorted(dst.glob(".shard-*.safetensors.tmp"))
    old += [p for p in (dst / WEIGHT_INDEX, dst / "config.json") if p.exists()]
    if old and not overwrite:
        raise FileExistsError(f"{dst} already holds a checkpoint ({old[0].name}); pass --overwrite to replace it")
    for p in old:
        p.unlink()


def copy_extra_files(src: Path, dst: Path) -> list[str]:
    """Copy the top-level non-weight files (tokenizer, generation config, templates...)."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name in _NOT_COPIED_NAMES or path.name.endswith(_NOT_COPIED_SUFFIXES):
            continue
        shutil.copyfile(path, Path(dst) / path.name)
        copied.append(path.name)
    return copied


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2048"`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[unit])


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="Hugging Face checkpoint folder (config.json + *.safetensors)")
    parser.add_argument("dst", metavar="DST", help="output folder (created)")
    parser.add_argument(
        "--group-size", type=int, default=128, choices=SUPPORTED_GROUP_SIZES,
        help="input features per quantisation group; -1 = per output channel (default 128)",
    )
    parser.add_argument(
        "--format", dest="fmt", choices=FORMATS, default="awq",
        help="awq: AutoAWQ GEMM tensors (serve with --quantization quick or awq); "
        "quick: pre-interleaved QUICK tensors, N must be a multiple of 64 (default awq)",
    )
    parser.add_argument(
        "--modules-to-not-convert", nargs="*", default=[], metavar="NAME",
        help="leave Linears whose name contains any of these unquantised",
    )
    add_output_arguments(parser)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every checkpoint-writing command shares (quantize, dequantize)."""
    parser.add_argument(
        "--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_SIZE,
        help="split the output into shards of at most this size (default 5GB)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in DST")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        dst = quantize_checkpoint(
            args.src, args.dst, group_size=args.group_size, fmt=args.fmt,
            modules_to_not_convert=args.modules_to_not_convert, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"vllm-quick quantize: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.fmt} checkpoint (group size {args.group_size}) to {dst}")
    return 0
