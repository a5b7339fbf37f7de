"""The ``quick::gemm`` custom op: ``y = x @ dequant(W) + bias`` on the interleaved layout.

One op, one schema, three implementations:

* ``CPU`` (and any device without the compiled kernel): the reference path. It dequantises the
  interleaved weight with :func:`vllm_quick.layout.dequantize_quick` (fp32 arithmetic) and runs a
  matmul in fp32, then casts to ``x.dtype``. Slow, simple, exact enough to be the ground truth.
* ``CUDA``: the compiled QUICK kernel (``vllm_quick._C``) with a tile shape chosen by M for small
  and mid M, dequantise + cuBLAS for large M (``vllm_quick.dispatch``); the kernel picks split-K. This
  must happen here, inside the op: vLLM compiles ``apply()`` into a graph, so a Python
  ``if M < ...`` there would be frozen at trace time.
* ``Meta``/fake: output shape only, for ``torch.compile`` and CUDA-graph capture.

Schema (a contract with csrc/quick_ops.cpp)::

    quick::gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor? bias,
                int group_size, int size_n) -> Tensor

    x        [..., K]            float16 | bfloat16 | float32
    qweight  [K/16, Np/64, 128]  int32, interleaved (layout.interleave_weight)
    qzeros   [K/group, Np/8]     int32, interleaved (layout.interleave_zeros)
    scales   [K/group, Np]       float16, interleaved (layout.interleave_scales)
    bias     [size_n] or None    any float dtype (added in fp32, cast with the output)
    returns  [..., size_n]       x.dtype; Np is size_n rounded up to a multiple of 64
"""

from __future__ import annotations

from collections.abc import Callable

import logging
import os

import torch

from vllm_quick import dispatch, layout

# Under the "vllm" logger, so vLLM's log configuration (format, level, handlers) shows our lines too.
logger = logging.getLogger(f"vllm.{__name__}")

SCHEMA = (
    "gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor? bias, "
    "int group_size, int size_n) -> Tensor"
)
SUPPORTED_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_lib = torch.library.Library("quick", "DEF")
_lib.define(SCHEMA)


def check_args(x, qweight, qzeros, scales, bias, group_size: int, size_n: int) -> None:
    """Validate shapes and dtypes; every message names the tensor and what was expected."""
    if x.dtype not in SUPPORTED_ACT_DTYPES:
        raise ValueError(f"quick::gemm: x must be one of {SUPPORTED_ACT_DTYPES}, got {x.dtype}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(
            f"quick::gemm: qweight and qzeros must be int32, got {qweight.dtype}, {qzeros.dtype}"
        )
    if scales.dtype != torch.float16:
        raise ValueError(f"quick::gemm: scales must be float16, got {scales.dtype}")
    k = x.shape[-1]
    if qweight.dim() != 3 or qweight.shape[0] * layout.TILE_K != k or qweight.shape[2] != 128:
        raise ValueError(
            f"quick::gemm: qweight must be [K/16, Np/64, 128] with K={k}, got {tuple(qweight.shape)}"
        )
    n_pad = qweight.shape[1] * layout.TILE_N
    if group_size <= 0 or k % group_size or group_size % layout.TILE_K:
        raise ValueError(f"quick::gemm: group_size={group_size} must be a multiple of 16 dividing K={k}")
    groups = k // group_size
    if tuple(scales.shape) != (groups, n_pad):
        raise ValueError(f"quick::gemm: scales must be [{groups}, {n_pad}], got {tuple(scales.shape)}")
    if tuple(qzeros.shape) != (groups, n_pad // 8):
        raise ValueError(f"quick::gemm: qzeros must be [{groups}, {n_pad // 8}], got {tuple(qzeros.shape)}")
    if not (n_pad - layout.TILE_N < size_n <= n_pad):
        raise ValueError(f"quick::gemm: size_n={size_n} does not fit a padded N of {n_pad}")
    if bias is not None and tuple(bias.shape) != (size_n,):
        raise ValueError(f"quick::gemm: bias must be [{size_n}], got {tuple(bias.shape)}")


def reference_gemm(x, qweight, qzeros, scales, bias, group_size: int, size_n: int) -> torch.Tensor:
    """The reference path: fp32 dequantisation from the interleaved layout, fp32 matmul."""
    check_args(x, qweight, qzeros, scales, bias, group_size, size_n)
    return _reference_unchecked(x, qweight, qzeros, scales, bias, size_n)


def _reference_unchecked(x, qweight, qzeros, scales, bias, size_n: int) -> torch.Tensor:
    # [N, K] contiguous and F.linear: the very call an unquantised fp32 layer makes, so a
    # dequantised checkpoint served in fp32 gives bit-identical logits (the e2e test relies on it).
    w = layout.dequantize_quick(qweight, qzeros, scales)[:, :size_n].t().contiguous()
    b = None if bias is None else bias.to(torch.float32)
    y = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).to(torch.float32), w, b)
    return y.to(x.dtype).reshape(*x.shape[:-1], size_n)


@torch.library.register_fake("quick::gemm")
def _gemm_fake(x, qweight, qzeros, scales, bias, group_size: int, size_n: int):
    return x.new_empty((*x.shape[:-1], size_n))


torch.library.impl(_lib, "gemm", "CPU")(reference_gemm)


# What the compiled kernel handles; anything else takes the reference path (with a warning once).
KERNEL_K_MULTIPLE = 64  # the kernel's k stage (kStageK in csrc/quick_gemm.cu)
# Group sizes the kernel takes: 32 (two whole groups per 64-row k stage) or multiples of 64 (a
# stage inside one group), which covers AWQ's 32/64/128 and per-channel (K % 64 == 0).
KERNEL_SMALL_GROUP = 32


FORCE_REFERENCE_ENV = "VLLM_QUICK_FORCE_REFERENCE"  # "1": reference path on CUDA too (for checks)


def kernel_unsupported_reason(x, group_size: int) -> str | None:
    """Why the compiled kernel cannot run this call, or None if it can."""
    if os.environ.get(FORCE_REFERENCE_ENV) == "1":
        return f"{FORCE_REFERENCE_ENV}=1"
    if kernel_extension() is None:
        return "the compiled extension vllm_quick._C is not available"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{x.dtype} activations (the kernel takes float16 and bfloat16)"
    if x.shape[-1] % KERNEL_K_MULTIPLE:
        return f"K={x.shape[-1]} is not a multiple of {KERNEL_K_MULTIPLE}"
    if group_size != KERNEL_SMALL_GROUP and group_size % KERNEL_K_MULTIPLE:
        return (f"group_size={group_size} is neither {KERNEL_SMALL_GROUP} nor a multiple of "
                f"{KERNEL_K_MULTIPLE}")
    return None


def _cuda_gemm(x, qweight, qzeros, scales, bias, group_size: int, size_n: int):
    check_args(x, qweight, qzeros, scales, bias, group_size, size_n)  # ValueError naming the tensor
    reason = kernel_unsupported_reason(x, group_size)
    if reason is not None:
        _warn_reference_once(reason)
        return _reference_unchecked(x, qweight, qzeros, scales, bias, size_n)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    path = dispatch.choose(x2.shape[0], x.dtype, x.device, weight_elements=x2.shape[1] * size_n)
    fp16_tile = dispatch.fp16_tile_of(path)  # "fp16:<tile>": bf16 through an fp16 tile
    if path == "dequant_fp16" and x2.dtype == torch.bfloat16:
        y = dequant_fp16_matmul(x2, qweight, qzeros, scales, bias, group_size, size_n)
    elif path in dispatch.DEQUANT_PATHS:  # (for fp16 activations dequant_fp16 is plain dequant)
        y = dequant_matmul(x2, qweight, qzeros, scales, bias, group_size, size_n)
    elif fp16_tile is not None and x2.dtype == torch.bfloat16:
        tile = dispatch.tile_index(fp16_tile, kernel_extension().TILES)
        y = kernel_fp16_for_bf16(x2, qweight, qzeros, scales, bias, group_size, size_n, tile)
    else:
        tiles = kernel_extension().TILES
        # (None for any path but plain ws256, an "fp16:<tile>" path included)
        split = dispatch.row_split(x2.shape[0], path, x.dtype, x.device, weight_elements=x2.shape[1] * size_n)
        if split is None:
            y = kernel_gemm(x2, qweight, qzeros, scales, bias, group_size, size_n,
                            dispatch.tile_index(fp16_tile or path, tiles))
        else:  # the last few rows on a tile of their own (dispatch.row_split), into one y
            rows, rest_path = split
            y = x2.new_empty((x2.shape[0], size_n))
            kernel_gemm(x2[:rows], qweight, qzeros, scales, bias, group_size, size_n,
                        dispatch.tile_index(path, tiles), out=y[:rows])
            kernel_gemm(x2[rows:], qweight, qzeros, scales, bias, group_size, size_n,
                        dispatch.tile_index(rest_path, tiles), out=y[rows:])
    return y.reshape(*x.shape[:-1], size_n)


def _raise_if(error: str) -> None:
    # The extension returns its errors instead of throwing them (csrc/quick_ops.cpp says why).
    if error:
        raise (RuntimeError if "launch failed" in error else ValueError)(error)


def kernel_gemm(x2, qweight, qzeros, scales, bias, group_size: int, size_n: int, tile: int = -1,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The QUICK kernel itself on a CUDA ``[M, K]`` x (``tile``: an index into
    ``vllm_quick._C.TILES``, -1 = the kernel's own choice by M), into ``out`` (a contiguous
    ``[M, size_n]`` of x's dtype) when given; ValueError on bad arguments."""
    y, error = kernel_extension().gemm(x2, qweight, qzeros, scales, bias, group_size, size_n, tile, out)
    _raise_if(error)
    return y


def kernel_dequantize(qweight, qzeros, scales, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[K, Np]`` weight in ``dtype`` from the dequantise kernel."""
    w, error = kernel_extension().dequantize(qweight, qzeros, scales, group_size, dtype)
    _raise_if(error)
    return w


def dequant_matmul(x2, qweight, qzeros, scales, bias, group_size: int, size_n: int) -> torch.Tensor:
    """The large-M path on a CUDA ``[M, K]`` x: dense weight from the dequantise kernel, then
    cuBLAS (``bias`` already in x's dtype)."""
    w = kernel_dequantize(qweight, qzeros, scales, group_size, x2.dtype)[:, :size_n]
    return torch.addmm(bias, x2, w) if bias is not None else x2 @ w


def dequant_fp16_matmul(x2, qweight, qzeros, scales, bias, group_size: int, size_n: int) -> torch.Tensor:
    """bf16's large-M path (``dequant_fp16``) on a CUDA bf16 ``[M, K]`` x: an fp16 dense weight from
    the dequantise kernel, then fp16_matmul_for_bf16 (``bias`` already in x's dtype)."""
    w16 = kernel_dequantize(qweight, qzeros, scales, group_size, torch.float16)[:, :size_n]
    return fp16_matmul_for_bf16(x2, w16, bias, column_abs_sum_bound(scales, x2.shape[1], group_size))


def kernel_fp16_for_bf16(x2, qweight, qzeros, scales, bias, group_size: int, size_n: int, tile: int) -> torch.Tensor:
    """bf16 activations through an fp16 kernel tile (the ``"fp16:<tile>"`` paths): the scaling of
    fp16_matmul_for_bf16, with the QUICK kernel as the fp16 GEMM. (The ws tiles do the same inside
    the extension for a bf16 x, a power of two per row and no passes over y:
    csrc/quick_act_scale.cu.) The tile rounds each (q - z) * s once to fp16, like the dense fp16
    weight of dequant_fp16, and accumulates in fp32 (``bias`` already in x's dtype)."""
    bound = column_abs_sum_bound(scales, x2.shape[1], group_size)
    return fp16_product_for_bf16(
        x2, bias, bound, lambda x16, bias16: kernel_gemm(x16, qweight, qzeros, scales, bias16, group_size, size_n, tile))


# fp16_matmul_for_bf16 scales the product so that its bound lands in [2^14, 2^15): below fp16's
# largest finite value (65504, just under 2^16) with a factor 2 to spare.
FP16_TOP_EXPONENT = 15


def column_abs_sum_bound(scales: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """A bound of max over columns n of sum_k |W[k, n]|, from the scales alone (a 0-dim fp32 tensor,
    computed on the scales' device): |q - z| <= 15, so sum_k |W[k, n]| <= 15 * g * sum_groups |s|
    (``scales`` [K/g, Np]; padded columns have zero scales)."""
    g = k if group_size == -1 else group_size
    per_column = torch.linalg.vector_norm(scales, ord=1, dim=0, dtype=torch.float32)
    return per_column.amax() * (15 * g)


def fp16_matmul_for_bf16(x2: torch.Tensor, w16: torch.Tensor, bias: torch.Tensor | None,
                         col_bound: torch.Tensor) -> torch.Tensor:
    """``x2 @ w16 (+ bias)`` for bf16 ``x2`` [M, K] and an fp16 dense weight ``w16`` [K, N] (the
    ``dequant_fp16`` path); ``col_bound`` bounds max_n sum_k |w16[k, n]| (column_abs_sum_bound).

    Why not a bf16 dense weight: it rounds every ``(q - z) * s`` to bf16's 8 significant bits,
    ~2.3e-3 of relative error, over the 2e-3 budget; fp16 keeps 11 bits (2.4e-4). The activations
    go to fp16 without rounding too: a bf16 significand (8 bits) fits fp16's 11, only the exponent
    range differs. So everything is scaled by a power of two 2^e, chosen on the GPU (no host sync:
    graph capture is fine) such that the bound max|x| * col_bound + max|bias| of every output
    lands in [2^14, 2^15): then neither x * 2^e nor the fp16 output (fp32 accumulation in cuBLAS)
    can overflow. 2^-e comes off exactly in bf16 at the end. Roundings: the fp16 output (2^-12),
    then bf16 (2^-9). x values below 2^-24 * 2^-e become fp16 subnormals and lose bits; with the
    conservative bound that is ~2^-28 of max |x| or less for Llama-sized K, far below what moves
    an output. (A first version with an fp32 cuBLAS output, no bound needed, ran 0.32-0.54x
    cuBLAS on the H100: the fp32 output's traffic and kernels cost more than they saved.)"""
    return fp16_product_for_bf16(x2, bias, col_bound, lambda x16, bias16: _fp16_gemm(x16, w16, bias16))


def fp16_product_for_bf16(x2: torch.Tensor, bias: torch.Tensor | None, col_bound: torch.Tensor,
                          gemm16: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """The scaling of fp16_matmul_for_bf16 around any fp16 GEMM ``gemm16(x16, bias16) -> y16`` of
    one fixed weight whose column sums of |W| are bounded by ``col_bound``."""
    bound = torch.linalg.vector_norm(x2, ord=float("inf"), dtype=torch.float32) * col_bound.clamp(min=1.0)
    if bias is not None:  # (clamp: |x| <= bound too, so x * 2^e stays finite)
        bound = bound + torch.linalg.vector_norm(bias, ord=float("inf"), dtype=torch.float32)
    shift = (FP16_TOP_EXPONENT - torch.frexp(bound).exponent).float()  # bound in [2^(x-1), 2^x)
    scale = torch.exp2(shift)
    x16 = (x2 * scale.to(x2.dtype)).to(torch.float16)  # exact: a power of two, in range
    bias16 = None if bias is None else (bias.float() * scale).to(torch.float16)
    y16 = gemm16(x16, bias16)
    return y16.to(torch.bfloat16).mul_(scale.reciprocal().to(torch.bfloat16))  # exact unscaling


def _fp16_gemm(a16: torch.Tensor, b16: torch.Tensor, bias16: torch.Tensor | None) -> torch.Tensor:
    """fp16 cuBLAS (fp32 accumulation, bias added in fp32, one rounding to fp16); elsewhere (the
    CPU tests) the same arithmetic spelled out in fp32."""
    if a16.is_cuda:
        return a16 @ b16 if bias16 is None else torch.addmm(bias16, a16, b16)
    acc = a16.float() @ b16.float()
    return (acc if bias16 is None else acc + bias16.float()).to(torch.float16)


torch.library.impl(_lib, "gemm", "CUDA")(_cuda_gemm)

_warned: set[str] = set()


def _warn_reference_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("quick::gemm on CUDA uses the slow reference path: %s", reason)


_EXT = None
_EXT_TRIED = False


def kernel_extension():
    """The compiled extension module ``vllm_quick._C``, or None if it was not built."""
    global _EXT, _EXT_TRIED
    if not _EXT_TRIED:
        _EXT_TRIED = True
        try:
            from vllm_quick import _C  # type: ignore[attr-defined]

            _EXT = _C
        except ImportError as e:
            logger.info("vllm_quick._C not available (%s); CUDA falls back to the reference", e)
    return _EXT
