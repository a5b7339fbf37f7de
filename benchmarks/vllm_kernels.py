"""One int4 GEMM, seven ways: adapters that run the *same* quantised weight through each backend.

Every backend gets the same natural-order quantised weight and must compute the same function

    y[m, n] = sum_k x[m, k] * (codes[k, n] - zeros[k // g, n]) * scales[k // g, n]

so that timings compare like with like and each backend's output can be checked against one fp32
reference (``kernel_bench.py`` does that for every case; an adapter that computes something else is
reported as wrong, not timed).

Interface (per backend, see ``BACKENDS``)::

    reason = backend.unsupported(K, N, group_size, act_dtype)   # None, or why it cannot run
    state  = backend.prepare(codes, zeros, scales, group_size, act_dtype)
    y      = backend.run(state, x)                               # x [M, K] act_dtype, contiguous

``codes`` int32 [K, N] (0..15), ``zeros`` int32 [G, N] (0..15), ``scales`` fp16 [G, N], all on the
GPU; ``group_size`` is a positive group size or -1 for one group over all of K (per-channel).

The vLLM calls mirror what vLLM 0.26 does for an AWQ checkpoint (``vllm/_custom_ops.py``,
``model_executor/kernels/linear/mixed_precision/{marlin,machete,humming}.py``,
``model_executor/layers/quantization/auto_awq.py``); ``CALLS`` below spells each one out.
vLLM is imported lazily, so ``quick`` and ``cublas`` work without it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_quick import layout

PACK = 8  # int4 values per int32

# The exact calls each adapter makes (printed into the benchmark report).
CALLS = {
    "quick": "torch.ops.quick.gemm(x, qweight, qzeros, scales, None, group, N) on "
    "vllm_quick.layout.awq_to_quick(awq_pack(codes), awq_pack(zeros), scales) (the op as the plugin "
    "calls it: it picks the QUICK kernel or dequantise + cuBLAS by M, see vllm_quick/dispatch.py)",
    "quick_kernel": "vllm_quick.ops.kernel_gemm(x, qweight, qzeros, scales, None, group, N): the QUICK kernel "
    "itself at every M, bypassing the op's M dispatch",
    "quick_dequant": "vllm_quick.ops.dequant_matmul(x, ...): the op's large-M path (dequantise "
    "kernel + cuBLAS) at every M, to measure where it overtakes the kernel (benchmarks/dispatch_table.py)",
    "quick_dequant_fp16": "vllm_quick.ops.dequant_fp16_matmul(x, ...): the "
    "dequant_fp16 path for bf16 activations (x and the product scaled by a power of two into fp16's range, "
    "fp16 cuBLAS, exact unscaling in bf16) at every M",
    "quick_fp16_ws256": "vllm_quick.ops.kernel_fp16_for_bf16(x, ..., tile=ws256): bf16 activations "
    "scaled by a power of two into fp16 and through the fp16 tile ws256, exact unscaling in bf16 (the "
    "op's 'fp16:ws256' path) at every M",
    "cublas": "torch.nn.functional.linear(x, W) with W = dequant(codes, zeros, scales) as [N, K] "
    "in the activation dtype (what an unquantised vLLM layer runs)",
    "awq_gemm": "torch.ops._C.awq_gemm(x, qweight_awq, scales_fp16, qzeros_awq, split_k_iters=8) "
    "(AutoAWQ GEMM kernel, the call of vLLM's AutoAWQLinearMethod; fp16 only)",
    "marlin": "ops.marlin_gemm(x, None, awq_marlin_repack(qweight_awq, K, N, 4), None, "
    "marlin_permute_scales(scales), None, None, marlin_zero_points(zeros), g_idx=empty, perm=empty, "
    "workspace, scalar_types.uint4, M, N, K, is_k_full=True, use_atomic_add=False, "
    "use_fp32_reduce=True, is_zp_float=False)",
    "machete": "ops.machete_mm(a=x, b_q=machete_prepack_B(qweight_gptq.t().contiguous().t(), act, uint4, "
    "act), b_type=scalar_types.uint4, b_group_zeros=-scales*zeros (act dtype), b_group_scales=scales "
    "(act dtype), b_group_size=g) (vLLM's MacheteLinearKernel, chosen for AWQ on sm90)",
    "humming": "vLLM's HummingLinearKernel(MPLinearLayerConfig(uint4, zero_points=True)) on a layer "
    "holding the GPTQ-standard tensors vLLM's AWQ loader makes: process_weights_after_loading(layer), "
    "apply_weights(layer, x)",
}


class Unsupported(Exception):
    """This backend cannot run this case (the message says why)."""


@dataclass
class State:
    """A prepared weight: ``weights`` are per copy (cloned for L2 rotation), ``shared`` is not."""

    backend: str
    weights: dict[str, Any]
    shared: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def clone_state(state: State) -> State:
    """A copy with its own weight memory (same values): one more entry of the L2 rotation."""
    weights = {}
    for key, value in state.weights.items():
        if isinstance(value, torch.Tensor):
            weights[key] = value.clone()
        else:  # an nn.Module holding the weights (humming)
            weights[key] = copy.deepcopy(value)
    return State(state.backend, weights, state.shared, state.meta)


def weight_bytes(state: State) -> int:
    """Bytes of the per-copy weight tensors (what one call streams from memory)."""
    total = 0
    for value in state.weights.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, torch.nn.Module):
            for t in list(value.parameters()) + list(value.buffers()):
                total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------
# packing helpers (natural-order codes -> the packed formats the kernels read)
# ----------------------------------------------------------------------------------------------
def effective_group(k: int, group_size: int) -> int:
    return k if group_size == -1 else group_size


def pack_along_k(codes: torch.Tensor) -> torch.Tensor:
    """Codes [K, N] -> int32 [K/8, N], nibble i of word (w, n) = codes[8w + i, n] (GPTQ order:
    what vLLM's AWQ loader converts to before Marlin/Machete/Humming)."""
    k, n = codes.shape
    if k % PACK:
        raise ValueError(f"packing along K needs K % 8 == 0, got K={k}")
    grouped = codes.reshape(k // PACK, PACK, n).permute(0, 2, 1)  # [K/8, N, 8]
    return layout.pack_nibbles(grouped)


def pack_along_n_transposed(zeros: torch.Tensor) -> torch.Tensor:
    """Zeros [G, N] -> int32 [N/8, G], nibble i of word (w, g) = zeros[g, 8w + i] (the standard
    zero-point format vLLM's AWQ loader makes: packed along N, output dim first)."""
    g, n = zeros.shape
    if n % PACK:
        raise ValueError(f"packing along N needs N % 8 == 0, got N={n}")
    grouped = zeros.t().reshape(n // PACK, PACK, g).permute(0, 2, 1)  # [N/8, G, 8]
    return layout.pack_nibbles(grouped)


def bind_call(fn: Callable, per_call: tuple[str, ...], /, **kwargs) -> Callable:
    """``fn`` with ``kwargs`` bound by name, keeping only the parameters ``fn`` has; the names in
    ``per_call`` are left for each call to pass (by keyword).

    The vLLM wrappers changed arguments between releases (0.26's ``marlin_gemm`` takes ``g_idx``
    and ``perm``, later ones do not); binding by name keeps one adapter for both and fails loudly
    if ``fn`` needs something this adapter does not supply.
    """
    params = inspect.signature(fn).parameters
    missing = [
        name
        for name, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and name not in kwargs
        and name not in per_call
    ]
    unknown = [name for name in per_call if name not in params]
    if unknown:
        raise Unsupported(f"{getattr(fn, '__qualname__', fn)} has no parameters {unknown}")
    if missing:
        raise Unsupported(
            f"{getattr(fn, '__qualname__', fn)} needs arguments {missing} that this adapter (written "
            f"against vLLM 0.26) does not pass"
        )
    return functools.partial(fn, **{k: v for k, v in kwargs.items() if k in params})


# ----------------------------------------------------------------------------------------------
# lazy vLLM access
# ----------------------------------------------------------------------------------------------
@functools.cache
def _vllm():
    """(vllm module, vllm._custom_ops, scalar_types); raises Unsupported if vLLM does not import."""
    try:
        import vllm
        import vllm._custom_ops as ops
        from vllm.scalar_type import scalar_types
    except Exception as e:  # ImportError, or a broken install raising anything else
        raise Unsupported(f"vLLM does not import: {type(e).__name__}: {e}") from e
    return vllm, ops, scalar_types


def vllm_version() -> str | None:
    try:
        return _vllm()[0].__version__
    except Unsupported:
        return None


def _c_op(name: str):
    """``torch.ops._C.<name>`` (vLLM's CUDA op library, loaded by importing vllm._custom_ops)."""
    _vllm()
    if not hasattr(torch.ops._C, name):
        raise Unsupported(f"torch.ops._C.{name} is not registered by this vLLM build")
    return getattr(torch.ops._C, name)


def _missing_ops(*names: str) -> str | None:
    """Why ``vllm._custom_ops`` cannot serve a backend needing ``names``, or None."""
    try:
        _, ops, _ = _vllm()
    except Unsupported as e:
        return str(e)
    missing = [fn for fn in names if not hasattr(ops, fn)]
    return f"vllm._custom_ops has no {missing[0]}" if missing else None


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
class Backend:
    name = ""

    def unsupported(self, k: int, n: int, group_size: int, act_dtype: torch.dtype) -> str | None:
        return None

    def prepare(self, codes, zeros, scales, group_size: int, act_dtype: torch.dtype) -> State:
        raise NotImplementedError

    def run(self, state: State, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def call(self) -> str:
        return CALLS[self.name]


class QuickBackend(Backend):
    """Our op on the interleaved layout, made from AWQ tensors exactly as the plugin loads them."""

    name = "quick"

    def unsupported(self, k, n, group_size, act_dtype):
        from vllm_quick import ops

        if ops.kernel_extension() is None:
            return "vllm_quick._C is not built: torch.ops.quick.gemm would run the slow reference"
        g = effective_group(k, group_size)
        if g % layout.TILE_K or k % g:
            return f"group size {g} must be a multiple of {layout.TILE_K} dividing K={k}"
        # Never time the reference fallback: ask the op whether its kernel takes this call.
        probe = getattr(ops, "kernel_unsupported_reason", None)
        if probe is not None:
            reason = probe(torch.empty((0, k), dtype=act_dtype, device="meta"), g)
            if reason:
                return f"the kernel does not take this case ({reason}); the op would use the reference"
        return None

    def prepare(self, codes, zeros, scales, group_size, act_dtype):
        import vllm_quick.ops  # noqa: F401  (registers torch.ops.quick.gemm)

        k, n = codes.shape
        qweight, qzeros, s = layout.awq_to_quick(layout.awq_pack(codes), layout.awq_pack(zeros), scales)
        return State(
            self.name,
            {"qweight": qweight, "qzeros": qzeros, "scales": s},
            meta={"group": effective_group(k, group_size), "n": n},
        )

    def run(self, state, x):
        w = state.weights
        return torch.ops.quick.gemm(
            x, w["qweight"], w["qzeros"], w["scales"], None, state.meta["group"], state.meta["n"]
        )


def quick_op_path(m: int, act_dtype: torch.dtype, weight_elements: int | None = None) -> str:
    """Which path torch.ops.quick.gemm takes for M rows of a K x N = weight_elements layer on this
    GPU: a kernel tile name ("x16", ...), "auto" or "dequant" (vllm_quick/dispatch.py; small
    layers have their own plan); "<tile>+<tile>" where the op splits off its last rows
    (dispatch.row_split)."""
    try:
        from vllm_quick import dispatch
    except ImportError:
        return "kernel"
    device = torch.device("cuda", torch.cuda.current_device())
    path = dispatch.choose(m, act_dtype, device, weight_elements=weight_elements)
    split = dispatch.row_split(m, path, act_dtype, device, weight_elements=weight_elements)
    return path if split is None else f"{path}+{split[1]}"


class QuickKernelBackend(QuickBackend):
    """The compiled QUICK kernel called directly, whatever path the op would choose for this M."""

    name = "quick_kernel"

    def run(self, state, x):
        from vllm_quick import ops

        w = state.weights
        return ops.kernel_gemm(x, w["qweight"], w["qzeros"], w["scales"], None, state.meta["group"], state.meta["n"])


# The kernel's tile configurations, in the order of vllm_quick._C.TILES (csrc/quick_gemm.cu,
# with_tile): "x" tiles keep exact integer fragments (fp16 and bf16), "s" tiles scale inside the
# fragments (fp16 only), "w" tiles feed those fragments to Hopper's wgmma (fp16, sm_90 only), and
# "w64x" feeds it the exact ones (fp16 and bf16, sm_90 only); "ws256" / "ws192" / "ws128" / "ws64" are the
# warp-specialised wgmma tiles (TMA producer warpgroup, 256 / 192 / 128 / 64 tokens, sm_90 only; fp16
# fragments, bf16 calls through an exact fp16 copy of x and a bf16 output). One backend per tile, "quick_<tile>", to
# derive vllm_quick/dispatch.py.
KERNEL_TILES = ("x16", "x32", "x64", "s16", "s32", "s64", "s128", "s16m", "s32m", "s64m", "w64", "w128", "w128n",
                "w64x", "ws256", "ws128", "ws64", "ws64b2", "ws128w4", "ws16", "ws8", "ws16b2",
                "ws32b2", "ws8w", "ws16w", "ws32w", "ws64w", "ws128w", "ws192")
# Tiles with scaled fp16 fragments that take fp16 activations only: the kernel refuses bf16 for
# them (ws256 takes bf16 through its fp16 copy of x).
# (s16m and s32m take bf16 through an exact fp16 copy of x, like the ws tiles: not fp16 only.)
FP16_ONLY_TILES = tuple(t for t in KERNEL_TILES
                        if (t.startswith("s") and t not in ("s16m", "s32m"))
                        or (t.startswith("w") and not t.endswith("x") and not t.startswith("ws")))
for _tile in KERNEL_TILES:
    CALLS[f"quick_{_tile}"] = (f"vllm_quick.ops.kernel_gemm(x, qweight, qzeros, scales, None, group, N, tile) with "
                               f"tile = TILES.index({_tile!r}): the QUICK kernel with that tile at every M")


# Plan settings a tile can be timed under beside its default ("quick_<tile>_<variant>"), for A/B
# comparisons in one run: the kernel reads them on every call, so a CUDA graph keeps the plan it
# was captured with.
TILE_VARIANTS = {
    "gk": {"VLLM_QUICK_CLUSTER_REDUCE": "0"},  # split-K through global memory, not a cluster (sm_90)
    "ca": {"VLLM_QUICK_CLUSTER_REDUCE": "always"},  # clusters wherever they can run (see plan())
    "sp16": {"VLLM_QUICK_MAX_SPLITS": "16"},   # up to 16 K splits instead of 8
    "sp4": {"VLLM_QUICK_MAX_SPLITS": "4"},     # at most 4 K splits (less fp32 partial traffic)
    "sp6": {"VLLM_QUICK_MAX_SPLITS": "6"},
}
# The tiles whose split-K may run in a cluster (blocks of at most 64 rows) get the variants.
VARIANT_TILES = ("x16", "x32", "x64", "s16m", "s32m", "s64m", "w64", "w64x")
# The ws tiles share out only the last wave's tiles along K (csrc/quick_stream_k.cuh); "t<s>"
# forces s K ranges for each of them instead of the plan's estimate ("t1": every tile whole),
# "sk" one full wave of stream-K blocks wherever a wave is partial, "nosk" the estimate without
# stream-K (session 10's tail splits).
WS_VARIANTS = {f"t{s}": {"VLLM_QUICK_WS_SPLITS": str(s)} for s in (1, 2, 3, 4, 6, 8)}
WS_VARIANTS.update(sk={"VLLM_QUICK_WS_STREAMK": "always"}, nosk={"VLLM_QUICK_WS_STREAMK": "0"},
                   nopdl={"VLLM_QUICK_PDL": "0"},  # without programmatic dependent launch
                   nowm={"VLLM_QUICK_WS_WEIGHT_MAP": "0"},  # weights by a bulk copy per k-tile row
                   oldfix={"VLLM_QUICK_WS_LEAN_FIXUP": "0"})  # shared tiles' fix-up with every thread's fences
# Settings of the op alone (no tile of their own): quick_op_<variant> only.
OP_VARIANTS = {**WS_VARIANTS, "nors": {"VLLM_QUICK_ROW_SPLIT": "0"},  # without the row split (dispatch.row_split)
               "no192": {"VLLM_QUICK_WS192": "0"}}  # ws256 where the plans say ws192 (dispatch.WS192_ENV)
WS_VARIANT_TILES = ("ws256", "ws128", "ws64", "ws64b2", "ws128w4", "ws16", "ws8", "ws16b2", "ws32b2", "ws8w",
                    "ws16w", "ws32w", "ws64w", "ws128w", "ws192")
TILE_VARIANTS.update(WS_VARIANTS)
_VARIANTS_OF = {**{t: [v for v in TILE_VARIANTS if v not in WS_VARIANTS] for t in VARIANT_TILES},
                **{t: list(WS_VARIANTS) for t in WS_VARIANT_TILES}}
for _tile, _variants in _VARIANTS_OF.items():
    for _variant in _variants:
        CALLS[f"quick_{_tile}_{_variant}"] = (f"quick_{_tile} with the environment {TILE_VARIANTS[_variant]} while "
                                              "it is called (and captured)")
for _variant, _env in OP_VARIANTS.items():
    CALLS[f"quick_op_{_variant}"] = f"quick with the environment {_env} while it is called (and captured)"


@contextlib.contextmanager
def _environment(overrides: dict[str, str]):
    old = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class QuickTileBackend(QuickKernelBackend):
    """The QUICK kernel forced onto one tile configuration (and optionally a TILE_VARIANTS plan
    setting)."""

    def __init__(self, tile: str, variant: str | None = None):
        self.tile = tile
        self.env = TILE_VARIANTS[variant] if variant else {}
        self.name = f"quick_{tile}_{variant}" if variant else f"quick_{tile}"

    def unsupported(self, k, n, group_size, act_dtype):
        from vllm_quick import ops

        if self.tile in FP16_ONLY_TILES and act_dtype != torch.float16:
            return f"tile {self.tile} (scaled fragments) is fp16 only"
        if self.tile.startswith("w") and torch.cuda.get_device_capability() != (9, 0):
            return f"tile {self.tile} (wgmma) needs an sm_90 GPU"
        reason = super().unsupported(k, n, group_size, act_dtype)
        if reason is None and tuple(ops.kernel_extension().TILES) != KERNEL_TILES:
            reason = f"vllm_quick._C.TILES is {ops.kernel_extension().TILES}, this script knows {KERNEL_TILES}"
        return reason

    def run(self, state, x):
        from vllm_quick import ops

        w = state.weights
        with _environment(self.env):
            return ops.kernel_gemm(x, w["qweight"], w["qzeros"], w["scales"], None, state.meta["group"],
                                   state.meta["n"], KERNEL_TILES.index(self.tile))


class QuickOpVariantBackend(QuickBackend):
    """The op as the plugin calls it (each M's planned tile) under an OP_VARIANTS setting (a ws-tile
    setting or one of the op's own): "quick_op_<variant>", for A/B timings across the plans."""

    def __init__(self, variant: str):
        self.env = OP_VARIANTS[variant]
        self.name = f"quick_op_{variant}"

    def run(self, state, x):
        with _environment(self.env):
            return super().run(state, x)


class QuickDequantBackend(QuickBackend):
    """The op's large-M path (dequantise + cuBLAS) called directly, whatever M."""

    name = "quick_dequant"

    def run(self, state, x):
        from vllm_quick import ops

        w = state.weights
        return ops.dequant_matmul(
            x, w["qweight"], w["qzeros"], w["scales"], None, state.meta["group"], state.meta["n"]
        )


class QuickDequantFp16Backend(QuickBackend):
    """The dequant_fp16 path (bf16 activations through an fp16 dense weight and fp16 cuBLAS,
    ops.dequant_fp16_matmul) called directly, whatever M; bf16 only."""

    name = "quick_dequant_fp16"

    def unsupported(self, k, n, group_size, act_dtype):
        if act_dtype != torch.bfloat16:
            return "dequant_fp16 is the bf16 path (for fp16 it is quick_dequant)"
        return super().unsupported(k, n, group_size, act_dtype)

    def run(self, state, x):
        from vllm_quick import ops

        w = state.weights
        return ops.dequant_fp16_matmul(
            x, w["qweight"], w["qzeros"], w["scales"], None, state.meta["group"], state.meta["n"]
        )


class QuickFp16TileBackend(QuickTileBackend):
    """bf16 activations through an fp16-only tile (the op's "fp16:<tile>" paths,
    ops.kernel_fp16_for_bf16) called directly, whatever M; bf16 only."""

    def __init__(self, tile: str):
        super().__init__(tile)
        self.name = f"quick_fp16_{tile}"

    def unsupported(self, k, n, group_size, act_dtype):
        if act_dtype != torch.bfloat16:
            return f"{self.name} is a bf16 path (for fp16 it is quick_{self.tile})"
        return super().unsupported(k, n, group_size, torch.float16)

    def run(self, state, x):
        from vllm_quick import ops

        w = state.weights
        return ops.kernel_fp16_for_bf16(x, w["qweight"], w["qzeros"], w["scales"], None, state.meta["group"],
                                        state.meta["n"], KERNEL_TILES.index(self.tile))


class CublasBackend(Backend):
    """The unquantised baseline: F.linear on the dequantised weight (cuBLAS)."""

    name = "cublas"

    def prepare(self, codes, zeros, scales, group_size, act_dtype):
        w = layout.dequantize(codes, zeros, scales).to(act_dtype)  # [K, N], fp32 math then cast
        return State(self.name, {"weight": w.t().contiguous()})  # [N, K] like nn.Linear

    def run(self, state, x):
        return torch.nn.functional.linear(x, state.weights["weight"])


class AwqGemmBackend(Backend):
    """vLLM's AutoAWQ GEMM kernel, straight on the AWQ-packed tensors."""

    name = "awq_gemm"

    def unsupported(self, k, n, group_size, act_dtype):
        try:
            _c_op("awq_gemm")
        except Unsupported as e:
            return str(e)
        if act_dtype != torch.float16:
            return "awq_gemm takes float16 activations only"
        g = effective_group(k, group_size)
        if g % 32:
            return f"awq_gemm needs a group size that is a multiple of 32, got {g}"
        if n % 64:
            return f"awq_gemm needs N % 64 == 0, got N={n}"
        return None

    def prepare(self, codes, zeros, scales, group_size, act_dtype):
        return State(
            self.name,
            {
                "qweight": layout.awq_pack(codes),
                "qzeros": layout.awq_pack(zeros),
                "scales": scales.to(torch.float16).contiguous(),
            },
            shared={"op": _c_op("awq_gemm")},
        )

    def run(self, state, x):
        w = state.weights
        # split_k_iters = 8 = the AWQ pack factor, as vLLM's AutoAWQLinearMethod passes.
        return state.shared["op"](x, w["qweight"], w["scales"], w["qzeros"], 8)


MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MACHETE_GROUP_SIZES = (-1, 64, 128)  # query_machete_supported_group_sizes(fp16/bf16)


class MarlinBackend(Backend):
    """Marlin (``marlin_gemm``) on an ``awq_marlin_repack``-ed weight, uint4 with zero points."""

    name = "marlin"

    def unsupported(self, k, n, group_size, act_dtype):
        missing = _missing_ops("marlin_gemm", "awq_marlin_repack")
        if missing:
            return missing
        if group_size not in MARLIN_GROUP_SIZES:
            return f"Marlin supports group sizes {MARLIN_GROUP_SIZES}, got {group_size}"
        if not ((n % 64 == 0 and k % 128 == 0) or (n % 128 == 0 and k % 64 == 0)):
            return f"Marlin needs (N%64, K%128) or (N%128, K%64) == 0 without padding, got K={k} N={n}"
        if act_dtype not in (torch.float16, torch.bfloat16):
            return f"Marlin takes float16/bfloat16, got {act_dtype}"
        return None

    def prepare(self, codes, zeros, scales, group_size, act_dtype):
        _, ops, scalar_types = _vllm()
        from vllm.model_executor.layers.quantization.utils.marlin_utils import (
            marlin_make_workspace_new,
            marlin_permute_scales,
            marlin_zero_points,
        )

        k, n = codes.shape
        g_rows = zeros.shape[0]
        device = codes.device
        qweight = ops.awq_marlin_repack(layout.awq_pack(codes), size_k=k, size_n=n, num_bits=4)
        s = marlin_permute_scales(
            scales.to(act_dtype).contiguous(), size_k=k, size_n=n, group_size=group_size
        )
        # Natural-order zeros [G, N]: exactly what vLLM hands marlin_zero_points after undoing the
        # AWQ packing (MarlinLinearKernel: unpack_cols(qzeros.t()) -> marlin_zero_points).
        zp = marlin_zero_points(zeros.to(torch.int32).contiguous(), size_k=g_rows, size_n=n, num_bits=4)
        empty = torch.empty(0, dtype=torch.int32, device=device)
        workspace = marlin_make_workspace_new(device)
        gemm = bind_call(
            ops.marlin_gemm,
            ("a", "b_q_weight", "b_scales", "b_zeros", "size_m"),
            c=None,
            b_bias=None,
            a_scales=None,
            global_scale=None,
            g_idx=empty,
            perm=empty,
            workspace=workspace,
            b_q_type=scalar_types.uint4,
            size_n=n,
            size_k=k,
            is_k_full=True,
            use_atomic_add=False,
            use_fp32_reduce=True,
            is_zp_float=False,
        )
        return State(
            self.name,
            {"qweight": qweight, "scales": s, "zeros": zp.to(device)},
            shared={"gemm": gemm, "workspace": workspace},
        )

    def run(self, state, x):
        w = state.weights
        return state.shared["gemm"](
            a=x, b_q_weight=w["qweight"], b_scales=w["scales"], b_zeros=w["zeros"], size_m=x.shape[0]
        )


def marlin_repack_matches_gptq_route(codes: torch.Tensor) -> bool:
    """Self-check for --smoke: ``awq_marlin_repack`` of the AWQ packing equals
    ``gptq_marlin_repack`` of the GPTQ packing (the route vLLM 0.26's AWQ loader takes)."""
    _, ops, _ = _vllm()
    k, n = codes.shape
    a = ops.awq_marlin_repack(layout.awq_pack(codes), size_k=k, size_n=n, num_bits=4)
    empty = torch.empty(0, dtype=torch.int32, device=codes.device)
    b = bind_call(ops.gptq_marlin_repack, ("b_q_weight",), perm=empty, size_k=k, size_n=n, num_bits=4)(
        b_q_weight=pack_along_k(codes)
    )
    return torch.equal(a, b)


class MacheteBackend(Backend):
    """Machete (CUTLASS, sm90): what vLLM 0.26 picks for AWQ (uint4 + group zeros) on Hopper."""

    name = "machete"

    def unsupported(self, k, n, group_size, act_dtype):
        missing = _missing_ops("machete_mm", "machete_prepack_B")
        if missing:
            return missing
        if not torch.cuda.is_available():
            return "Machete needs a CUDA device"
        if torch.cuda.get_device_capability() != (9, 0):
            return f"Machete needs compute capability 9.0, got {torch.cuda.get_device_capability()}"
        if act_dtype not in (torch.float16, torch.bfloat16):
            return f"Machete here takes float16/bfloat16, got {act_dtype}"
        if group_size not in MACHETE_GROUP_SIZES:
            return f"Machete supports group sizes {MACHETE_GROUP_SIZES} for 16-bit activations, got {group_size}"
        if k % 64 or n % 128:
            return f"Machete needs K % 64 == 0 and N % 128 == 0, got K={k} N={n}"
        return None

    def prepare(self, codes, zeros, scales, group_size, act_dtype):
        _, ops, scalar_types = _vllm()
        w = pack_along_k(codes)  # [K/8, N]
        # Machete wants the packed weight column-major (vLLM passes x.t().contiguous().t()).
        b_q = ops.machete_prepack_B(
            w.t().contiguous().t(), a_type=act_dtype, b_type=scalar_types.uint4, group_scales_type=act_dtype
        )
        s = scales.to(act_dtype).contiguous()
        # Machete computes q * s + z: vLLM pre-applies the scales to AWQ zero points, in the
        # activation dtype, as z = -s * zero (MacheteLinearKernel.transform_w_zp).
        z = (-1.0 * s * zeros.to(s.dtype)).contiguous()
        mm = bind_call(
            ops.machete_mm,
            ("a", "b_q", "b_group_zeros", "b_group_scales"),
            b_type=scalar_types.uint4, b_group_size=group_size)
        return State(self.name, {"b_q": b_q, "scales": s, "zeros": z}, shared={"mm": mm})

    def run(self, state, x):
        w = state.weights
        return state.shared["mm"](a=x, b_q=w["b_q"], b_group_zeros=w["zeros"], b_group_scales=w["scales"])


class _LinearShell(torch.nn.Module):
    """The attributes of a vLLM LinearBase that the Humming path reads, and nothing else."""

    def __init__(self, k: int, n: int, dtype: torch.dtype):
        super().__init__()
        self.input_size = k
        self.input_size_per_partition = k
        self.output_size = n
        self.output_partition_sizes = [n]
        self.params_dtype = dtype
        self.has_bias = False
        self.bias = None


def _param(t: torch.Tensor, **attrs) -> torch.nn.Parameter:
    p = torch.nn.Parameter(t, requires_grad=False)
    for key, value in attrs.items():
        setattr(p, key, value)
    return p


class HummingBackend(Backend):
    """Humming (JIT GEMM library) through vLLM's own HummingLinearKernel, on the GPTQ-standard
    tensors vLLM's AWQ loader produces (``_convert_awq_to_standard_format``)."""

    name = "humming"

    def unsupported(self, k, n, group_size, act_dtype):
        try:
            _vllm()
            from vllm.utils.import_utils import has_humming
        except Exception as e:  # noqa: BLE001 -- whatever fails to import means no Humming
            return f"vLLM has no Humming support: {type(e).__name__}: {e}"
        if not has_humming():
            return "the humming package (pip: humming-kernels) is not installed"
        if act_dtype not in (torch.float16, torch.bfloat16):
            return f"Humming here takes float16/bfloat16, got {act_dtype}"
        return None

    def prepare(self, codes, zeros, scales, group_size, act_dtype):
        _, _, scalar_types = _vllm()
        from vllm.model_executor.kernels.linear.mixed_precision.humming import (
            HummingLinearKernel,
        )
        from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
            MPLinearLayerConfig,
        )

        k, n = codes.shape
        layer = _LinearShell(k, n, act_dtype)
        # Tensor layouts and dim attributes as after vLLM 0.26's AWQ -> standard conversion.
        layer.qweight = _param(pack_along_k(codes), input_dim=0, output_dim=1, packed_dim=0, packed_factor=PACK)
        layer.qzeros = _param(
            pack_along_n_transposed(zeros), output_dim=0, input_dim=1, packed_dim=0, packed_factor=PACK
        )
        layer.scales = _param(scales.to(act_dtype).contiguous(), input_dim=0, output_dim=1)
        config = MPLinearLayerConfig(
            full_weight_shape=(k, n),
            partition_weight_shape=(k, n),
            weight_type=scalar_types.uint4,
            act_type=act_dtype,
            group_size=group_size,
            zero_points=True,
            has_g_idx=False,
        )
        kernel = HummingLinearKernel(
            config, w_q_param_name="qweight", w_s_param_name="scales", w_zp_param_name="qzeros"
        )
        kernel.process_weights_after_loading(layer)
        return State(self.name, {"layer": layer}, shared={"kernel": kernel})

    def run(self, state, x):
        return state.shared["kernel"].apply_weights(state.weights["layer"], x)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        QuickBackend(),
        QuickKernelBackend(),
        QuickDequantBackend(),
        QuickDequantFp16Backend(),
        *(QuickTileBackend(t) for t in KERNEL_TILES),
        *(QuickTileBackend(t, v) for t, variants in _VARIANTS_OF.items() for v in variants),
        *(QuickOpVariantBackend(v) for v in OP_VARIANTS),
        QuickFp16TileBackend("ws256"),
        CublasBackend(),
        AwqGemmBackend(),
        MarlinBackend(),
        MacheteBackend(),
        HummingBackend(),
    )
}
BACKEND_NAMES = tuple(BACKENDS)
# What kernel_bench.py runs by default, and the keys every result row has under "us".
DEFAULT_BACKENDS = ("quick", "cublas", "awq_gemm", "marlin", "machete", "humming")


def prepare(name: str, codes, zeros, scales, group_size: int, act_dtype: torch.dtype) -> State:
    """``BACKENDS[name].prepare`` after its support check (raises Unsupported with the reason)."""
    backend = BACKENDS[name]
    k, n = codes.shape
    reason = backend.unsupported(k, n, group_size, act_dtype)
    if reason:
        raise Unsupported(reason)
    return backend.prepare(codes, zeros, scales, group_size, act_dtype)


def run(state: State, x: torch.Tensor) -> torch.Tensor:
    return BACKENDS[state.backend].run(state, x)
