"""``vllm-quick dequantize``: write an AWQ or QUICK checkpoint back as a plain unquantised one.

Every quantised Linear ``<prefix>`` (``qweight``/``qzeros``/``scales``) becomes
``<prefix>.weight`` ``[N, K]`` holding exactly ``vllm_quick.layout.dequantize(codes, zeros,
scales)``, computed in fp32, transposed to the Hugging Face ``[out, in]`` orientation and only
then cast to ``--dtype``. With the default ``float32`` the values are bit-identical to the weight
the CPU reference path of ``quick::gemm`` multiplies with, so serving both checkpoints in fp32
gives the same greedy tokens (the end-to-end test relies on that). All other tensors are cast to
``--dtype``; config.json loses its ``quantization_config`` and records the dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_quick.quantize import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointReader,
    ShardWriter,
    add_output_arguments,
    copy_extra_files,
    group_by_layer,
    prepare_output_dir,
    read_config,
    set_config_dtype,
    write_json,
)

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "float16", "bfloat16")
QUANT_SUFFIXES = ("qweight", "qzeros", "scales")


def dequantize_linear(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    fmt: str,
    group_size: int,
    name: str = "layer",
) -> torch.Tensor:
    """One quantised Linear -> fp32 ``W`` ``[K, N]`` (``y = x @ W``), ``layout.dequantize`` exactly."""
    from vllm_quick import layout

    if fmt == "awq":
        if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
            raise ValueError(
                f"{name}: AWQ tensors must be 2-D (qweight [K, N/8], qzeros [G, N/8], scales [G, N]), "
                f"got {tuple(qweight.shape)}, {tuple(qzeros.shape)}, {tuple(scales.shape)}"
            )
        codes, zeros = layout.awq_unpack(qweight), layout.awq_unpack(qzeros)
    elif fmt == "quick":
        if qweight.dim() != 3:
            raise ValueError(f"{name}: QUICK qweight must be [K/16, N/64, 128], got {tuple(qweight.shape)}")
        codes, zeros, scales = layout.quick_to_codes(qweight, qzeros, scales)
    else:
        raise ValueError(f"{name}: unknown format {fmt!r}")
    k, n = codes.shape
    groups = 1 if group_size == -1 else k // group_size
    if group_size != -1 and k % group_size:
        raise ValueError(f"{name}: group size {group_size} does not divide K={k}")
    if tuple(zeros.shape) != (groups, n) or tuple(scales.shape) != (groups, n):
        raise ValueError(
            f"{name}: expected zeros and scales [{groups}, {n}] for K={k}, group size {group_size}; "
            f"got {tuple(zeros.shape)} and {tuple(scales.shape)}"
        )
    return layout.dequantize(codes, zeros, scales)


def dequantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    dtype: str | torch.dtype = "float32",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Dequantise the AWQ/QUICK checkpoint folder ``src`` into ``dst``; returns ``dst``."""
    from tqdm import tqdm

    from vllm_quick import layout

    src, dst = Path(src), Path(dst)
    torch_dtype = _torch_dtype(dtype)
    config = read_config(src)
    qc = config.get("quantization_config") or {}
    fmt = qc.get("quant_method")
    if fmt not in ("awq", "quick"):
        raise ValueError(f"{src}: quantization_config.quant_method is {fmt!r}; supported: 'awq', 'quick'")
    if qc.get("bits", 4) != 4 or qc.get("w_bit", 4) != 4:
        raise ValueError(f"{src}: only 4-bit checkpoints are supported, got {qc}")
    if not qc.get("zero_point", True):
        raise ValueError(f"{src}: only zero_point=true (asymmetric) checkpoints are supported")
    if fmt == "quick" and qc.get("layout_version") != layout.LAYOUT_VERSION:
        raise ValueError(
            f"{src}: QUICK layout_version {qc.get('layout_version')!r} differs from this "
            f"vllm-quick's {layout.LAYOUT_VERSION}; re-quantise from the original checkpoint"
        )
    group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))

    reader = CheckpointReader(src)
    names = set(reader.names)
    prefixes = {n[: -len(".qweight")] for n in reader.names if n.endswith(".qweight")}
    for prefix in sorted(prefixes):
        missing = [s for s in QUANT_SUFFIXES if f"{prefix}.{s}" not in names]
        if missing:
            raise ValueError(f"{prefix}: has a qweight but no {', '.join(missing)}")
        if f"{prefix}.weight" in names:
            raise ValueError(f"{prefix}: has both a quantised and an unquantised weight")

    prepare_output_dir(src, dst, overwrite)
    writer = ShardWriter(dst, max_shard_size)
    by_layer, other = group_by_layer(reader.names)

    def write(name: str) -> None:
        prefix, _, suffix = name.rpartition(".")
        if prefix in prefixes and suffix in QUANT_SUFFIXES:
            if suffix != "qweight":  # qzeros/scales are consumed together with the qweight
                return
            t = {s: reader.get(f"{prefix}.{s}") for s in QUANT_SUFFIXES}
            w = dequantize_linear(t["qweight"], t["qzeros"], t["scales"], fmt, group_size, prefix)
            writer.add(f"{prefix}.weight", w.t().contiguous().to(torch_dtype))  # HF [N, K]
        else:
            tensor = reader.get(name)
            writer.add(name, tensor.to(torch_dtype) if tensor.is_floating_point() else tensor)

    with tqdm(total=len(by_layer), desc=f"dequantize ({fmt})", unit="layer", disable=not progress) as bar:
        for layer in sorted(by_layer):
            for name in by_layer[layer]:
                write(name)
            bar.update(1)
    for name in other:
        write(name)
    writer.finish()

    config.pop("quantization_config", None)
    set_config_dtype(config, torch_dtype)
    write_json(dst / "config.json", config)
    copy_extra_files(src, dst)
    return dst


def _torch_dtype(dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype)
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return getattr(torch, name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="AWQ or QUICK checkpoint folder")
    parser.add_argument("dst", metavar="DST", help="output folder (created)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32",
        help="dtype of the written weights (default float32: exact dequantised values)",
    )
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        dst = dequantize_checkpoint(
            args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"vllm-quick dequantize: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote unquantised {args.dtype} checkpoint to {dst}")
    return 0
