"""GPU tests of the compiled QUICK kernel behind ``torch.ops.quick.gemm``.

    python -m pytest -m gpu -q -s tests/test_gpu_kernel.py      (about 1-3 minutes on an H100)

Skipped where there is no CUDA device. Where there is one, a missing or broken ``vllm_quick._C``
is a *failure*: the op would quietly use its reference path and every check would pass.

Accuracy: ``rel = ||y - ref||_F / ||ref||_F`` with ``ref = x.float() @ dequant(W)`` computed on
the GPU in fp32 (TF32 off). The limit is 2e-3, or 1.25x the error that rounding the exact result
to the output dtype costs on the same data if that is larger (bf16 output rounding alone is
~1.6e-3: a kernel cannot beat it). Every case also checks: output dtype and shape, no NaN/inf,
every column written (a column of zeros, or of another column's values, fails the per-column
check), and that the kernel path (not the reference fallback) was taken.

The op picks its path by M (vllm_quick/dispatch.py: the QUICK kernel, or dequantise + cuBLAS at
large M). Each accuracy case checks the op as called, and where the op took the dequant path it
also checks the QUICK kernel itself (``vllm_quick._C.gemm``), so the kernel is verified at every M.

Coverage: all 12 layer shapes x M in {1, 2, 7, 16, 33, 64, 128, 255, 256, 1024, 4096} x
{fp16, bf16} at group size 128; group sizes 32, 64 and per-channel (-1) on 5 of the shapes;
padded N (N not a multiple of 64); bias; 3-D and non-contiguous x; CUDA-graph replay equal to
eager bit for bit (and eager equal to eager: the kernel's split-K reduction is deterministic);
``torch.compile`` of a module calling the op; bad inputs on CUDA raising ValueError.

A compact table of the worst error per shape/dtype/group is printed at the end of the module
(with ``-s``) and written to the file named by ``QUICK_GPU_SUMMARY`` if that is set.
"""

from __future__ import annotations

import importlib
import os
import re
import zlib
from dataclasses import dataclass

import pytest
import torch

from benchmarks import kernel_bench, vllm_kernels
from vllm_quick import layout, ops

# Development aid only: QUICK_GPU_TESTS_ON_CPU=1 runs the accuracy cases through the CPU reference
# path, to check this file's own logic on a machine without a GPU (kernel-only tests still skip).
ON_CPU = os.environ.get("QUICK_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()), reason="needs a CUDA GPU"),
]

# name -> (K, N): the 12 Llama layer shapes of the issue, the same list the benchmark sweeps
SHAPES = {name: (k, n) for name, k, n in kernel_bench.SHAPES}
M_ALL = (1, 2, 7, 16, 33, 64, 128, 255, 256, 1024, 4096)
OTHER_GROUPS = (32, 64, -1)
# Shapes for the other group sizes: a small one, K not a power of two (11008), a 13B layer,
# the largest K (split-K heavy) and a wide N.
OTHER_GROUP_SHAPES = ("llama2-7b.o", "llama2-7b.down", "llama2-13b.qkv", "llama2-70b.down", "llama3-8b.gate_up")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
REL_LIMIT = 2e-3
FLOOR_FACTOR = 1.25  # the limit is max(REL_LIMIT, FLOOR_FACTOR * output-rounding floor)


def _accuracy_cases():
    cases = []
    for name in SHAPES:
        groups = (128,) + (OTHER_GROUPS if name in OTHER_GROUP_SHAPES else ())
        for g in groups:  # grouped by weight so that one cached weight serves consecutive cases
            for dname in DTYPES:
                for m in M_ALL:
                    cases.append(pytest.param(name, g, dname, m, id=f"{name}-g{g}-{dname}-M{m}"))
    return cases


# ----------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kernel():
    """The compiled extension. CUDA present but no extension = failure, never a skip."""
    if ON_CPU:
        pytest.skip("QUICK_GPU_TESTS_ON_CPU=1: kernel-only test")
    try:
        ext = importlib.import_module("vllm_quick._C")
    except ImportError as e:
        pytest.fail(
            f"CUDA is available but the extension vllm_quick._C does not import ({e}). Build it "
            "first (python setup.py build_ext --inplace, or pip install --no-build-isolation -e .); "
            "without it torch.ops.quick.gemm silently runs the slow reference path."
        )
    if ops.kernel_extension() is None:
        pytest.fail("vllm_quick._C imports but vllm_quick.ops.kernel_extension() returned None")
    return ext


@pytest.fixture(autouse=True)
def _fp32_reference_precision():
    # The fp32 reference must be real fp32: TF32 would add ~1e-3 of error to it.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@dataclass
class Weight:
    k: int
    n: int
    group: int  # effective group size (K for per-channel)
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    w32: torch.Tensor  # [K, N] fp32 dequantised, natural order


_WEIGHT_CACHE: dict[tuple, Weight] = {}


def make_weight(k: int, n: int, group_size: int, seed: int = 0) -> Weight:
    """A random quantised weight, through the real AWQ -> QUICK conversion; cached (one at a time:
    the largest is several GB with its fp32 copy)."""
    g = k if group_size == -1 else group_size
    key = (k, n, g, seed)
    if key not in _WEIGHT_CACHE:
        _WEIGHT_CACHE.clear()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        gen = torch.Generator(device=DEVICE).manual_seed(1000 + 7 * k + 13 * n + g + seed)
        codes = torch.randint(0, 16, (k, n), generator=gen, device=DEVICE, dtype=torch.int32)
        zeros = torch.randint(0, 16, (k // g, n), generator=gen, device=DEVICE, dtype=torch.int32)
        # ~1e-3 scales keep |y| ~ 1 for K up to 28672; any fp16 value is fine for the kernel.
        scales = ((torch.rand((k // g, n), generator=gen, device=DEVICE) + 0.5) * 2.0**-10).half()
        qweight, qzeros, s = layout.awq_to_quick(layout.awq_pack(codes), layout.awq_pack(zeros), scales)
        w32 = layout.dequantize(codes, zeros, scales)
        del codes
        _WEIGHT_CACHE[key] = Weight(k, n, g, qweight, qzeros, s, w32)
    return _WEIGHT_CACHE[key]


def random_x(shape, dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=DEVICE).to(dtype)


def quick_gemm(x, w: Weight, bias=None, size_n=None):
    return torch.ops.quick.gemm(x, w.qweight, w.qzeros, w.scales, bias, w.group, size_n or w.n)


def assert_kernel_path(x, group: int) -> None:
    """The op must run the compiled kernel here, not its reference fallback."""
    if ON_CPU:
        return
    reason = ops.kernel_unsupported_reason(x, group) if hasattr(ops, "kernel_unsupported_reason") else None
    assert reason is None, f"this case would run the reference path, not the kernel: {reason}"


def op_path(m: int, dtype: torch.dtype, k: int, n: int) -> str:
    """The path torch.ops.quick.gemm takes for M rows of a K x N layer here: "kernel" or "dequant"."""
    if ON_CPU:
        return "reference"
    try:
        from vllm_quick import dispatch
    except ImportError:
        return "kernel"
    return dispatch.choose_path(m, dtype, torch.device("cuda", torch.cuda.current_device()), weight_elements=k * n)


@dataclass
class Check:
    rel: float
    max_abs: float
    floor: float
    limit: float


def check_output(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, label: str) -> Check:
    """All the per-case assertions; returns the numbers for the summary. Errors and norms are taken
    in float64: squares of fp32 outputs overflow beyond ~1e19 and underflow below ~1e-19 (bf16
    activations span 1e-38 .. 3e38)."""
    assert y.dtype == dtype, f"{label}: output dtype {y.dtype}, expected {dtype}"
    assert tuple(y.shape) == tuple(ref.shape), f"{label}: output shape {tuple(y.shape)}, expected {tuple(ref.shape)}"
    finite = torch.isfinite(y)
    if not bool(finite.all()):
        first = tuple((~finite).nonzero()[0].tolist())
        raise AssertionError(f"{label}: {int((~finite).sum())} NaN/inf outputs, first at {first}")
    y2 = y.double().reshape(-1, ref.shape[-1])
    r2 = ref.double().reshape(-1, ref.shape[-1])
    ref_norm = r2.norm()
    rel = float((y2 - r2).norm() / ref_norm)
    max_abs = float((y2 - r2).abs().max())
    floor = float((r2.to(dtype).double() - r2).norm() / ref_norm)  # perfect kernel, rounded output
    limit = max(REL_LIMIT, FLOOR_FACTOR * floor)
    assert rel <= limit, (
        f"{label}: relative error {rel:.3e} > {limit:.3e} (output rounding alone gives {floor:.3e}); "
        f"max abs error {max_abs:.3e}, max |ref| {float(r2.abs().max()):.3e}"
    )
    # Every column written: per-column error against the column's own size (floored at a quarter
    # of the median column norm, so tiny reference columns don't demand impossible precision). A
    # column of zeros or garbage has an error as large as the column itself and fails this.
    col_err = (y2 - r2).norm(dim=0)
    col_ref = r2.norm(dim=0)
    scale = torch.clamp(col_ref, min=0.25 * float(col_ref.median()))
    bad = (col_err > 0.1 * scale).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{label}: {bad.numel()} of {r2.shape[1]} columns are wrong (unwritten or misplaced?), first "
        f"{bad[:8].tolist()}; e.g. column {int(bad[0])}: error {float(col_err[bad[0]]):.3e} vs norm "
        f"{float(col_ref[bad[0]]):.3e}"
    )
    return Check(rel, max_abs, floor, limit)


# summary of the accuracy sweep: (shape, dtype, group) -> worst case
RESULTS: dict[tuple, dict] = {}


def record(shape: str, dtype: str, group: int, path: str, m: int, c: Check) -> None:
    key = (shape, dtype, group, path)
    cur = RESULTS.get(key)
    if cur is None:
        RESULTS[key] = cur = {"cases": 0, "rel": -1.0, "m": None, "max_abs": 0.0, "floor": 0.0, "limit": c.limit}
    cur["cases"] += 1
    cur["max_abs"] = max(cur["max_abs"], c.max_abs)
    if c.rel > cur["rel"]:
        cur.update(rel=c.rel, m=m, floor=c.floor, limit=c.limit)


def summary_table() -> str:
    lines = [
        ("QUICK accuracy vs fp32 reference, worst case per shape/dtype/group/path "
         "(path: kernel = QUICK kernel, dequant = the op's dequantise + cuBLAS path)"),
        (f"{'shape':20s} {'K':>6s} {'N':>6s} {'group':>5s} {'dtype':9s} {'path':9s} {'cases':>5s} "
         f"{'worst rel':>10s} {'at M':>5s} {'rounding':>9s} {'limit':>9s} {'max abs':>9s}"),
    ]
    order = {name: i for i, name in enumerate(SHAPES)}
    def key(item):
        (shape, dtype, group, path), _ = item
        return (order.get(shape, 99), shape, group, dtype, path)

    for (shape, dtype, group, path), r in sorted(RESULTS.items(), key=key):
        k, n = SHAPES.get(shape, (0, 0))
        lines.append(
            f"{shape:20s} {k:6d} {n:6d} {group:5d} {dtype:9s} {path:9s} {r['cases']:5d} {r['rel']:10.3e} "
            f"{r['m']!s:>5s} {r['floor']:9.2e} {r['limit']:9.2e} {r['max_abs']:9.2e}"
        )
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _print_summary():
    yield
    if not RESULTS:
        return
    text = summary_table()
    print("\n" + text, flush=True)
    path = os.environ.get("QUICK_GPU_SUMMARY")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    _WEIGHT_CACHE.clear()


# ----------------------------------------------------------------------------------------------
# accuracy sweep
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,group_size,dtype_name,m", _accuracy_cases())
def test_accuracy(kernel_or_cpu, shape, group_size, dtype_name, m):
    k, n = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    w = make_weight(k, n, group_size)
    x = random_x((m, k), dtype, seed=zlib.crc32(f"{shape}/{group_size}/{dtype_name}/{m}".encode()))
    assert_kernel_path(x, w.group)
    label = f"{shape} K={k} N={n} g={group_size} {dtype_name} M={m}"
    path = op_path(m, dtype, k, n)
    y = quick_gemm(x, w)
    ref = x.float() @ w.w32
    c = check_output(y, ref, dtype, f"{label} (op, {path} path)")
    record(shape, dtype_name, group_size, path, m, c)
    if path == "dequant":  # the op did not run the QUICK kernel: check the kernel itself too
        y_kernel = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n)
        c = check_output(y_kernel, ref, dtype, f"{label} (QUICK kernel called directly)")
        record(shape, dtype_name, group_size, "kernel", m, c)


@pytest.fixture
def kernel_or_cpu(request):
    """The kernel fixture, except in the CPU dry run of this file's logic."""
    if ON_CPU:
        return None
    return request.getfixturevalue("kernel")


# ----------------------------------------------------------------------------------------------
# every tile configuration of the kernel, whatever the dispatch plan picks today
# ----------------------------------------------------------------------------------------------
TILES = vllm_kernels.KERNEL_TILES  # vllm_quick._C.TILES, in order
TILE_SHAPES = {"llama2-7b.o": (4096, 4096), "llama2-7b.down": (11008, 4096), "padded": (512, 200)}
TILE_M = (1, 7, 16, 33, 64, 100, 255)


def test_tile_names_match_the_extension(kernel):
    assert tuple(kernel.TILES) == TILES


@pytest.mark.parametrize("group_size", [128, 32, -1])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("tile", TILES)
def test_every_tile(kernel, tile, dtype_name, group_size):
    """Each tile on every M (one block row or several, split-K or not), padded N included; two
    calls equal bit for bit. Scaled tiles ("s", and the wgmma tiles but w64x and the ws ones) are fp16
    only and refuse bf16 with a ValueError, except s16m / s32m, which take bf16 through an exact
    fp16 copy of x like the ws tiles; "w" tiles run on sm_90 only and say so elsewhere."""
    dtype = DTYPES[dtype_name]
    index = TILES.index(tile)
    if tile.startswith("w") and torch.cuda.get_device_capability() != (9, 0):
        w = make_weight(512, 256, 128)
        with pytest.raises(ValueError, match="needs an sm_90 GPU"):
            ops.kernel_gemm(random_x((4, 512), torch.float16, seed=1), w.qweight, w.qzeros, w.scales, None,
                            w.group, 256, index)
        return
    for shape, (k, n) in TILE_SHAPES.items():
        w = make_weight(k, n, group_size)
        for m in TILE_M:
            x = random_x((m, k), dtype, seed=zlib.crc32(f"tile/{shape}/{m}".encode()))
            args = (x, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
            if tile in vllm_kernels.FP16_ONLY_TILES and dtype != torch.float16:
                with pytest.raises(ValueError, match="not a tile configuration"):
                    ops.kernel_gemm(*args)
                return
            y = ops.kernel_gemm(*args)
            check_output(y, x.float() @ w.w32, dtype,
                         f"tile {tile} {shape} K={k} N={n} g={group_size} {dtype_name} M={m}")
            assert torch.equal(y, ops.kernel_gemm(*args)), f"tile {tile} M={m}: two calls differ"


WS_TILES = ["ws256", "ws128", "ws64", "ws64b2", "ws128w4", "ws16", "ws8", "ws16b2", "ws32b2", "ws8w", "ws16w", "ws32w",
            "ws64w", "ws128w", "ws192"]


@pytest.mark.parametrize("tile", WS_TILES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_ws_tile_partial_blocks_and_split_k(kernel, monkeypatch, group_size, dtype_name, tile):
    """The warp-specialised tiles ws256 / ws128 with an odd number of 64-column tiles (the last
    block's second consumer warpgroup idles but still joins the split-K barrier), more than one
    block of 256 / 128 tokens, split-K forced on and off, with and without bias (the staged epilogue and the
    element stores): every group layout (one kernel for group size 32, another for the rest)
    matches the reference, for fp16 and for bf16 (through the fp16 copy of x, unscaled in the
    epilogue or in the split-K reduction)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{tile} runs on sm_90 only")
    dtype = DTYPES[dtype_name]
    index = TILES.index(tile)
    for (k, n), m in (((1024, 192), 300), ((2048, 320), 40), ((4096, 64), 513)):
        w = make_weight(k, n, group_size)
        x = random_x((m, k), dtype, seed=zlib.crc32(f"ws/{k}/{n}/{m}".encode()))
        bias = random_x((n,), dtype, seed=5)
        for splits in ("1", "8"):
            monkeypatch.setenv("VLLM_QUICK_MAX_SPLITS", splits)
            for b in (None, bias):
                y = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, b, w.group, n, index)
                ref = x.float() @ w.w32 + (0 if b is None else b.float())
                check_output(y, ref, dtype, f"{tile} {dtype_name} K={k} N={n} M={m} g={group_size} "
                             f"splits<={splits} bias={b is not None}")


@pytest.mark.parametrize("tile", WS_TILES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_ws_tile_stream_k(kernel, monkeypatch, group_size, dtype_name, tile):
    """The ws tiles compute the last, partial wave's tiles as pieces of K (csrc/quick_stream_k.cuh):
    with e.g. 165 tiles on 132 SMs, 132 whole tiles and 33 tiles split 3 or 8 ways
    (VLLM_QUICK_WS_SPLITS), or shared out by one full wave of stream-K blocks
    (VLLM_QUICK_WS_STREAMK=always: blocks that end one tile and start the next), the tail in the
    last, partial row block (rows >= M), an odd tile count (an idle warpgroup in the last column
    block), with and without bias; and a call whose every tile is shared. Each matches the
    reference and a second call gives the same bits (the reduction sums in a fixed order, and
    every counter was left at zero). Per-channel groups too (test_ws_tile_repeats_give_the_same_bits)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{tile} runs on sm_90 only")
    dtype = DTYPES[dtype_name]
    index = TILES.index(tile)
    tokens = int(re.match(r"ws(\d+)", tile)[1])
    # blocks the GPU holds at once: one per SM, more for ws64b2 and the mma.sync ws tiles (the
    # occupancy plan() sizes its grids by)
    per_sm = kernel.plan(tokens, 1024, 64 * 65, 128, dtype == torch.bfloat16, index)["blocks_per_sm"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count * per_sm
    n = 64 * 65  # 33 column blocks of 128 (17 of 256 for ws128w4), the last with one 64-column tile
    column_blocks = 17 if tile.endswith("w4") else 33
    row_blocks = sms // column_blocks + 1  # e.g. 165 tiles on 132 SMs: 132 whole, 33 split
    # the last row block partial (rows >= M), never empty: 40 rows short, half a block for the small tiles
    short = 40 if tokens > 40 else tokens // 2
    for k, m in ((1024, row_blocks * tokens - short), (1024, 2 * tokens - 3)):
        w = make_weight(k, n, group_size)
        x = random_x((m, k), dtype, seed=zlib.crc32(f"tail/{k}/{m}".encode()))
        bias = random_x((n,), dtype, seed=6)
        tiles = column_blocks * ((m + tokens - 1) // tokens)
        tail = tiles % sms
        for splits, streamk in (("1", "0"), ("3", "0"), ("8", "0"), ("", "always")):
            monkeypatch.setenv("VLLM_QUICK_WS_SPLITS", splits)
            monkeypatch.setenv("VLLM_QUICK_WS_STREAMK", streamk)
            plan = kernel.plan(m, k, n, w.group, dtype == torch.bfloat16, index)
            if splits == "1":
                assert (plan["sk_tiles"], plan["dp_blocks"]) == (0, tiles), plan
            elif splits:
                assert (plan["splits"], plan["sk_blocks"], plan["dp_blocks"]) == (int(splits), int(splits) * tail,
                                                                                  tiles - tail), plan
            else:
                # one full wave, or fewer blocks where a share would drop below two stages
                one_wave = min(sms, tail * (k // 64) // 2)
                assert (plan["sk_blocks"], plan["dp_blocks"], plan["sk_tiles"]) == (one_wave, tiles - tail, tail), plan
            for b in (None, bias):
                y = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, b, w.group, n, index)
                ref = x.float() @ w.w32 + (0 if b is None else b.float())
                what = (f"{tile} {dtype_name} K={k} N={n} M={m} g={group_size} ws_splits={splits} "
                        f"streamk={streamk} bias={b is not None}")
                check_output(y, ref, dtype, what)
                again = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, b, w.group, n, index)
                assert torch.equal(again, y), f"{what}: a second call differs"


# The ws tiles whose consumers are mma.sync warps (csrc/quick_gemm_ws.cuh, ws_tile_uses_mma_sync).
MMA_SYNC_WS_TILES = ["ws8", "ws16", "ws16b2", "ws32b2", "ws8w", "ws16w", "ws32w"]


@pytest.mark.parametrize("tile", MMA_SYNC_WS_TILES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_ws_tile_repeats_give_the_same_bits(kernel, monkeypatch, dtype_name, tile):
    """Session 15's failure, kept as a test: ws32w (then ws48w) gave different results between calls
    on the same inputs, with per-channel groups where blocks share a tile (stream-K over one wave, or
    tail splits), in one warp's 32 columns -- now and then, not every call (up to 15 of 15 calls in
    a run, often 0). So: 12 calls each on the two layers and schedules that showed it, every one
    equal to the first bit for bit and close to the reference."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{tile} runs on sm_90 only")
    dtype = DTYPES[dtype_name]
    index = TILES.index(tile)
    for k, n, m in ((4096, 4096, 255), (11008, 4096, 100)):
        w = make_weight(k, n, -1)
        x = random_x((m, k), dtype, seed=zlib.crc32(f"repeat/{k}/{m}".encode()))
        ref = x.float() @ w.w32
        for splits, streamk in (("", "always"), ("3", "0")):
            monkeypatch.setenv("VLLM_QUICK_WS_SPLITS", splits)
            monkeypatch.setenv("VLLM_QUICK_WS_STREAMK", streamk)
            assert kernel.plan(m, k, n, w.group, dtype == torch.bfloat16, index)["sk_tiles"] > 0
            ys = [ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n, index) for _ in range(12)]
            what = f"{tile} {dtype_name} K={k} N={n} M={m} per-channel ws_splits={splits} streamk={streamk}"
            check_output(ys[0], ref, dtype, what)
            differ = [i for i, y in enumerate(ys) if not torch.equal(y, ys[0])]
            assert not differ, f"{what}: calls {differ} differ from the first"


@pytest.mark.parametrize("tile", ["ws8", "ws32w", "ws64b2", "ws128w", "ws192", "ws256"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_ws_copy_settings_keep_the_bits(kernel, monkeypatch, dtype_name, tile):
    """How the ws tiles move data must not change a bit of y: the weights by one 2-D TMA copy per
    stage or a bulk copy per k-tile row (VLLM_QUICK_WS_WEIGHT_MAP), with or without programmatic
    dependent launch (VLLM_QUICK_PDL), the shared tiles' fix-up with thread 0's or every thread's
    fences (VLLM_QUICK_WS_LEAN_FIXUP). Group 32 (two group rows a stage) and 128, a schedule with
    shared tiles (stream-K) and an odd tile count."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{tile} runs on sm_90 only")
    dtype = DTYPES[dtype_name]
    index = TILES.index(tile)
    k, n = 4096, 4160
    m = {"ws8": 5, "ws32w": 29, "ws64b2": 61, "ws128w": 125, "ws192": 189, "ws256": 253}[tile]  # a partial row block
    monkeypatch.setenv("VLLM_QUICK_WS_STREAMK", "always")
    for group_size in (32, 128):
        w = make_weight(k, n, group_size)
        x = random_x((m, k), dtype, seed=zlib.crc32(f"copy-settings/{tile}/{group_size}".encode()))
        y = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
        check_output(y, x.float() @ w.w32, dtype, f"{tile} {dtype_name} g={group_size}")
        for name, value in (("VLLM_QUICK_WS_WEIGHT_MAP", "0"), ("VLLM_QUICK_PDL", "0"),
                            ("VLLM_QUICK_WS_LEAN_FIXUP", "0")):
            monkeypatch.setenv(name, value)
            other = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
            monkeypatch.delenv(name)
            assert torch.equal(other, y), f"{tile} {dtype_name} g={group_size}: {name}={value} changes y"


def _sm90_plan_case(dtype_name: str, label: str):
    """What the tests of sm_90's large-M plans share (skipped elsewhere): the dispatch module, the
    dtype and device, a mid-sized layer (K, N, weight) and a bias for it."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("ws192 and the row split follow sm_90's plans")
    from vllm_quick import dispatch

    dtype = DTYPES[dtype_name]
    k, n = 2048, 4160
    bias = random_x((n,), dtype, seed=zlib.crc32(f"{label}/bias/{dtype_name}".encode()))
    return dispatch, dtype, torch.device("cuda", torch.cuda.current_device()), (k, n, make_weight(k, n, 128)), bias


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_op_runs_ws192_where_the_plan_says(kernel, monkeypatch, dtype_name):
    """sm_90's plans give ws192 at M = 129-192, 273-384 and 529-576 on a mid-sized layer: the op's y
    is then exactly one ws192 call's (bias included) and matches the reference; with
    VLLM_QUICK_WS192=0 it is ws256's (row-split where the remainder is small)."""
    dispatch, dtype, dev, (k, n, w), bias = _sm90_plan_case(dtype_name, "ws192")
    ws192, ws256 = TILES.index("ws192"), TILES.index("ws256")
    for m, b in ((129, None), (192, bias), (300, None), (575, bias)):
        what = f"{dtype_name} K={k} N={n} M={m} bias={b is not None}"
        assert dispatch.choose(m, dtype, dev, weight_elements=k * n) == "ws192", what
        x = random_x((m, k), dtype, seed=zlib.crc32(f"ws192/{what}".encode()))
        y = torch.ops.quick.gemm(x, w.qweight, w.qzeros, w.scales, b, w.group, n)
        check_output(y, x.float() @ w.w32 + (0 if b is None else b.float()), dtype, f"op on ws192 {what}")
        assert torch.equal(y, ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, b, w.group, n, ws192)), what
        monkeypatch.setenv(dispatch.WS192_ENV, "0")
        other = torch.ops.quick.gemm(x, w.qweight, w.qzeros, w.scales, b, w.group, n)
        monkeypatch.delenv(dispatch.WS192_ENV)
        if dispatch.row_split(m, "ws256", dtype, dev, weight_elements=k * n) is None:
            assert torch.equal(other, ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, b, w.group, n, ws256)), what
        check_output(other, x.float() @ w.w32 + (0 if b is None else b.float()), dtype, f"op without ws192 {what}")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_row_split_is_the_two_tiles_it_names(kernel, monkeypatch, dtype_name):
    """Beyond M = 256 the op runs a small remainder of rows (M mod 256 <= 64 on this layer) on the
    plan's tile for that many rows, and ws256 the rest (dispatch.row_split): its y must be exactly those two
    tile calls' rows, bias included, and match the reference; with VLLM_QUICK_ROW_SPLIT=0 it is
    one ws256 call. On sm_90, whose plans take ws256 there, the split must really happen (else
    this would test nothing). Also: the binding's `out` argument refuses a wrong shape or dtype."""
    dispatch, dtype, dev, (k, n, w), bias = _sm90_plan_case(dtype_name, "row-split")
    ws256 = TILES.index("ws256")
    # (M = 273-384 and 529-576 take ws192 on this layer since session 20: no ws256 there to split)
    for m, b in ((769, None), (800, bias), (832, None), (1080, bias), (1088, None)):
        what = f"{dtype_name} K={k} N={n} M={m} bias={b is not None}"
        path = dispatch.choose(m, dtype, dev, weight_elements=k * n)
        split = dispatch.row_split(m, path, dtype, dev, weight_elements=k * n)
        assert path == "ws256" and split is not None and split[0] == m - m % 256, f"{what}: {path} {split}"
        rows, rest = split
        x = random_x((m, k), dtype, seed=zlib.crc32(f"row-split/{what}".encode()))
        ref = x.float() @ w.w32 + (0 if b is None else b.float())
        y = torch.ops.quick.gemm(x, w.qweight, w.qzeros, w.scales, b, w.group, n)
        check_output(y, ref, dtype, f"row split {what} ({rows} rows ws256 + {m - rows} {rest})")
        head = ops.kernel_gemm(x[:rows], w.qweight, w.qzeros, w.scales, b, w.group, n, ws256)
        tail = ops.kernel_gemm(x[rows:], w.qweight, w.qzeros, w.scales, b, w.group, n, TILES.index(rest))
        assert torch.equal(y[:rows], head) and torch.equal(y[rows:], tail), f"{what}: not the two tiles' rows"
        monkeypatch.setenv(dispatch.ROW_SPLIT_ENV, "0")
        whole = torch.ops.quick.gemm(x, w.qweight, w.qzeros, w.scales, b, w.group, n)
        monkeypatch.delenv(dispatch.ROW_SPLIT_ENV)
        assert torch.equal(whole, ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, b, w.group, n, ws256)), what
        check_output(whole, ref, dtype, f"without the row split {what}")
    x = random_x((40, k), dtype, seed=1)
    for bad in (torch.empty((40, n + 2), dtype=dtype, device=dev), torch.empty((40, n), dtype=torch.float32, device=dev),
                torch.empty((39, n), dtype=dtype, device=dev)):
        with pytest.raises(ValueError, match="out must be"):
            ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n, ws256, out=bad)


@pytest.mark.parametrize("tile", ["ws256", "ws8", "ws32w"])
@pytest.mark.parametrize("x_scale", [1.0, 1e6, 1e-30, 1e30])
def test_ws_tile_bf16_activation_range(kernel, x_scale, tile):
    """bf16 through ws256 moves x into fp16 by powers of two found on the GPU (each row's max |x|): bf16's
    whole exponent range must come back right -- activations beyond fp16's 65504 (1e6, 1e30) and
    below its normal range (1e-30) -- and an inf in one row must not change the other rows. The
    mma.sync ws tiles (ws8, ws32w) multiply bf16 as it is (session 16): the same must hold there."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{tile} runs on sm_90 only")
    index = TILES.index(tile)
    k, n, m = 2048, 448, 70
    w = make_weight(k, n, 128)
    x = (random_x((m, k), torch.float32, seed=zlib.crc32(f"range/{x_scale}".encode())) * x_scale).to(torch.bfloat16)
    y = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
    check_output(y, x.double() @ w.w32.double(), torch.bfloat16, f"{tile} bf16 x*{x_scale}")
    x_inf = x.clone()
    x_inf[3, 7] = float("inf")
    y_inf = ops.kernel_gemm(x_inf, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
    others = torch.arange(m, device=x.device) != 3
    assert torch.equal(y_inf[others], y[others]), f"x*{x_scale}: an inf in row 3 changed other rows"
    assert not bool(torch.isfinite(y_inf[3]).all()), f"x*{x_scale}: the inf of row 3 vanished"


@pytest.mark.parametrize("tile", WS_TILES + ["s16m", "s32m"])
def test_bf16_rows_scaled_apart(kernel, tile):
    """The bf16 copy into fp16 (the wgmma ws tiles, s16m, s32m; the mma.sync ws tiles take bf16 as it
    is since session 16, and the same must hold for them) is scaled per row (csrc/quick_act_scale.cu):
    rows 1e30 and 1e-30 apart in one call, and a row of zeros, each come back with its own relative
    error within the budget (one power of two for the whole input would have pushed the small rows
    into fp16's subnormals, or out of its range altogether). s16m / s32m at M = 150 run several
    row blocks and split K."""
    if tile.startswith("ws") and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{tile} runs on sm_90 only")
    index = TILES.index(tile)
    k, n, m = 1024, 320, 150
    w = make_weight(k, n, 128)
    row_scale = torch.tensor([1e30, 1.0, 1e-30, 3e-5, 7e4], dtype=torch.float32).repeat(m // 5 + 1)[:m]
    x = random_x((m, k), torch.float32, seed=zlib.crc32(f"rows/{tile}".encode())) * row_scale[:, None].to(DEVICE)
    x[17] = 0.0
    x = x.to(torch.bfloat16)
    y = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
    ref = x.double() @ w.w32.double()
    assert torch.equal(y[17], torch.zeros_like(y[17])), f"{tile}: a zero row gave nonzero outputs"
    for row in range(5):
        rows = torch.arange(row, m, 5, device=x.device)
        rows = rows[rows != 17]
        check_output(y[rows], ref[rows], torch.bfloat16, f"{tile} bf16 rows scaled {float(row_scale[row]):.0e}")


@pytest.mark.parametrize("max_splits", ["1", "16", "32", "junk"])
def test_max_splits_setting_keeps_results(kernel, monkeypatch, max_splits):
    """VLLM_QUICK_MAX_SPLITS (a tuning knob of the split-K plan, read on every call) changes how K
    is cut up, never the result: no split at all, more splits than the default 8, and a bad value
    (ignored) all match the reference."""
    monkeypatch.setenv("VLLM_QUICK_MAX_SPLITS", max_splits)
    cases = [((4096, 4096), 1, "s16"), ((11008, 4096), 64, "s32"), ((4096, 4096), 128, "s64"), ((4096, 4096), 16, "x16")]
    if torch.cuda.get_device_capability() == (9, 0):
        cases.append(((4096, 12288), 128, "w128n"))
    for (k, n), m, tile in cases:
        w = make_weight(k, n, 128)
        x = random_x((m, k), torch.float16, seed=zlib.crc32(f"splits/{k}/{m}".encode()))
        y = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n, TILES.index(tile))
        check_output(y, x.float() @ w.w32, torch.float16, f"VLLM_QUICK_MAX_SPLITS={max_splits} {tile} K={k} M={m}")


def test_long_narrow_layers_split_16_ways(kernel, monkeypatch):
    """plan() splits a long-K layer with few column blocks up to 16 ways (session 12: the "down"
    layers), not a wider or shorter one, and VLLM_QUICK_MAX_SPLITS still rules when set; the 16
    splits match the reference for s16m / s32m in both dtypes."""
    monkeypatch.delenv("VLLM_QUICK_MAX_SPLITS", raising=False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if sms < 128:
        pytest.skip("the rule is sized for GPUs of 128+ SMs")
    s16m, s32m = TILES.index("s16m"), TILES.index("s32m")
    assert kernel.plan(16, 11008, 4096, 128, False, s16m)["splits"] == 16
    assert kernel.plan(16, 28672, 8192, 128, False, s16m)["splits"] == 8  # 32 column blocks
    assert kernel.plan(16, 4096, 4096, 128, False, s16m)["splits"] == 8  # 64 stages
    monkeypatch.setenv("VLLM_QUICK_MAX_SPLITS", "4")
    assert kernel.plan(16, 11008, 4096, 128, False, s16m)["splits"] == 4
    monkeypatch.delenv("VLLM_QUICK_MAX_SPLITS")
    k, n = 11008, 4096
    w = make_weight(k, n, 128)
    for dtype in (torch.float16, torch.bfloat16):
        for index, m in ((s16m, 16), (s32m, 32), (s16m, 1)):
            x = random_x((m, k), dtype, seed=zlib.crc32(f"split16/{m}".encode()))
            y = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
            check_output(y, x.float() @ w.w32, dtype, f"{TILES[index]} {dtype} K={k} N={n} M={m} 16 splits")


@pytest.mark.parametrize("tile", ["s16m", "s32m", "x16", "x32", "s64m"])
def test_global_split_k_every_split_reduces_a_slice(kernel, monkeypatch, tile):
    """The mma.sync tiles' global split-K (session 13, reduce_split_k in csrc/quick_common.cuh):
    a split-major grid whose splits wait for each other, then each sums its own slice of the
    tile. Across split counts that do and do not divide the tile's quads (3, 6, 8, 16 splits; 16
    splits of a 64-column tile at M = 1 leave one quad per split), a last row block with padding
    rows and a last column block with one 64-column tile: every result matches the reference,
    a second identical call gives the same bits, and calls with new inputs in between stay right
    (each launch must leave its counters at zero for the next)."""
    monkeypatch.setenv("VLLM_QUICK_CLUSTER_REDUCE", "0")
    index = TILES.index(tile)
    dtypes = [torch.float16] + ([] if tile in vllm_kernels.FP16_ONLY_TILES else [torch.bfloat16])
    for k, n in ((4096, 64 * 65), (2048, 64)):
        w = make_weight(k, n, 128)
        for max_splits in ("3", "6", "8", "16"):
            monkeypatch.setenv("VLLM_QUICK_MAX_SPLITS", max_splits)
            for dtype in dtypes:
                for m in (1, 17, 40):
                    plan = kernel.plan(m, k, n, 128, dtype == torch.bfloat16, index)
                    what = f"{tile} {dtype} K={k} N={n} M={m} splits={plan['splits']}"
                    assert plan["splits"] > 1 and not plan["cluster_reduce"], what
                    x = random_x((m, k), dtype, seed=zlib.crc32(f"slices/{what}".encode()))
                    y = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
                    check_output(y, x.float() @ w.w32, dtype, what)
                    other = random_x((m, k), dtype, seed=zlib.crc32(f"slices/other/{what}".encode()))
                    y_other = ops.kernel_gemm(other, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
                    check_output(y_other, other.float() @ w.w32, dtype, f"{what} (new inputs)")
                    again = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
                    assert torch.equal(again, y), f"{what}: a second call differs"


# Tiles whose split-K may reduce in a thread-block cluster (blocks of at most 64 rows), with an M
# each at which a 4096 x 4096 layer is split.
CLUSTER_CASES = [("s16m", 1), ("s16m", 16), ("x16", 7), ("s32m", 32), ("x32", 33), ("s64m", 64), ("x64", 64)]
CLUSTER_CASES_SM90 = [("w64x", 33), ("w64", 64)]


@pytest.mark.parametrize("max_splits", ["8", "16"])
def test_cluster_split_k_equals_global_split_k(kernel, monkeypatch, max_splits):
    """On sm_90 the K splits of a tile may reduce in a thread-block cluster, through distributed
    shared memory; elsewhere, and with VLLM_QUICK_CLUSTER_REDUCE=0, through the fp32 global
    workspace. Both sum the splits in the same order, so they must agree bit for bit, and match
    the reference. With VLLM_QUICK_CLUSTER_REDUCE=always the plan must really take the cluster
    path on sm_90 (else this test would compare a path with itself), with clusters of 8 and,
    where VLLM_QUICK_MAX_SPLITS allows, 16 CTAs."""
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    monkeypatch.setenv("VLLM_QUICK_MAX_SPLITS", max_splits)
    k, n = 4096, 4096
    w = make_weight(k, n, 128)
    cases = CLUSTER_CASES + (CLUSTER_CASES_SM90 if sm90 else [])
    for dtype in (torch.float16, torch.bfloat16):
        for tile, m in cases:
            if tile in vllm_kernels.FP16_ONLY_TILES and dtype != torch.float16:
                continue
            index = TILES.index(tile)
            monkeypatch.setenv("VLLM_QUICK_CLUSTER_REDUCE", "always")
            plan = kernel.plan(m, k, n, 128, dtype == torch.bfloat16, index)
            assert plan["splits"] > 1, f"{tile} M={m}: expected a split-K plan, got {plan}"
            assert plan["cluster_reduce"] == sm90, f"{tile} M={m}: cluster_reduce should be {sm90} here: {plan}"
            assert (plan["partial_floats"] == 0) == sm90, f"{tile} M={m}: workspace only without clusters: {plan}"
            x = random_x((m, k), dtype, seed=zlib.crc32(f"cluster/{tile}/{m}".encode()))
            args = (x, w.qweight, w.qzeros, w.scales, None, w.group, n, index)
            y_cluster = ops.kernel_gemm(*args)
            monkeypatch.setenv("VLLM_QUICK_CLUSTER_REDUCE", "0")
            assert not kernel.plan(m, k, n, 128, dtype == torch.bfloat16, index)["cluster_reduce"]
            y_global = ops.kernel_gemm(*args)
            what = f"{tile} {dtype} M={m} splits={plan['splits']}"
            check_output(y_cluster, x.float() @ w.w32, dtype, f"cluster split-K {what}")
            assert torch.equal(y_cluster, y_global), f"cluster and global split-K differ: {what}"
    if sm90 and max_splits == "16":
        assert kernel.plan(1, k, n, 128, False, TILES.index("s16m"))["splits"] == 16
    # The default setting: clusters where the fp32 partials are >= 0.1 x the weight bytes (and the
    # clusters fit): at M = 16 on 4096 x 4096, 8 splits x 16 rows x 8 >= 0.1 x 4096; not at M = 1.
    monkeypatch.delenv("VLLM_QUICK_CLUSTER_REDUCE")
    monkeypatch.setenv("VLLM_QUICK_MAX_SPLITS", "8")
    plan = kernel.plan(16, k, n, 128, False, TILES.index("s16m"))
    assert plan["splits"] == 8 and plan["cluster_reduce"] == sm90, plan
    assert not kernel.plan(1, k, n, 128, False, TILES.index("s16m"))["cluster_reduce"]


def test_dispatch_plan_names_supported_tiles(kernel):
    """Every path in this GPU's plan is 'dequant' or a tile the kernel takes for that dtype."""
    from vllm_quick import dispatch

    dev = torch.device("cuda", torch.cuda.current_device())
    for dtype in (torch.float16, torch.bfloat16):
        for _, path in dispatch.plan_for(dtype, dev):
            if path in dispatch.DEQUANT_PATHS:
                # (a bf16 dense weight is over the error budget; dequant_fp16 keeps an fp16 one)
                assert dtype == torch.float16 or path == "dequant_fp16", "bf16 must not take 'dequant'"
                continue
            w = make_weight(512, 256, 128)
            x = random_x((3, 512), dtype, seed=5)
            fp16_tile = dispatch.fp16_tile_of(path)
            if fp16_tile is not None:
                assert dtype == torch.bfloat16, f"{path}: 'fp16:' paths are for bf16 activations"
                index = dispatch.tile_index(fp16_tile, kernel.TILES)
                y = ops.kernel_fp16_for_bf16(x, w.qweight, w.qzeros, w.scales, None, w.group, 256, index)
            else:
                index = dispatch.tile_index(path, kernel.TILES)
                y = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, w.group, 256, index)
            check_output(y, x.float() @ w.w32, dtype, f"plan path {path} {dtype}")


# ----------------------------------------------------------------------------------------------
# padding, bias, input shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [200, 72, 8, 136])
@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_padded_n(kernel_or_cpu, n, group_size, dtype_name):
    """N not a multiple of 64: awq_to_quick pads to Np, the op returns size_n columns."""
    k = 512
    dtype = DTYPES[dtype_name]
    w = make_weight(k, n, group_size)
    assert w.qweight.shape[1] * layout.TILE_N == layout.padded_n(n)
    for m in (1, 33, 128):
        x = random_x((m, k), dtype, seed=m + n)
        assert_kernel_path(x, w.group)
        y = quick_gemm(x, w, size_n=n)
        ref = x.float() @ w.w32[:, :n]
        check_output(y, ref, dtype, f"padded N={n} (Np={layout.padded_n(n)}) g={group_size} {dtype_name} M={m}")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("bias_dtype", ["act", "float32"])
@pytest.mark.parametrize("m", [1, 33, 256])
def test_bias(kernel_or_cpu, dtype_name, bias_dtype, m):
    k, n = 4096, 4096
    dtype = DTYPES[dtype_name]
    w = make_weight(k, n, 128)
    x = random_x((m, k), dtype, seed=m)
    # A bias of realistic size (0.1 of |y|): its own rounding to bf16 stays under the limit.
    bias = 0.1 * random_x((n,), dtype if bias_dtype == "act" else torch.float32, seed=99 + m)
    y = quick_gemm(x, w, bias=bias)
    ref = x.float() @ w.w32 + bias.float()
    check_output(y, ref, dtype, f"bias ({bias_dtype}) {dtype_name} M={m}")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_3d_and_noncontiguous_x(kernel_or_cpu, dtype_name):
    k, n = 4096, 4096
    dtype = DTYPES[dtype_name]
    w = make_weight(k, n, 128)
    x3 = random_x((2, 7, k), dtype, seed=5)
    y3 = quick_gemm(x3, w)
    assert tuple(y3.shape) == (2, 7, n)
    y2 = quick_gemm(x3.reshape(14, k), w)
    assert torch.equal(y3.reshape(14, n), y2), "3-D x must give the rows of the 2-D call, bit for bit"
    check_output(y3, x3.float() @ w.w32, dtype, f"3-D x {dtype_name}")
    wide = random_x((9, k + 64), dtype, seed=6)
    xs = wide[:, 32 : 32 + k]  # rows strided, start offset not 16-byte aligned to the row
    assert not xs.is_contiguous()
    ys = quick_gemm(xs, w)
    assert torch.equal(ys, quick_gemm(xs.contiguous(), w)), "non-contiguous x must equal its contiguous copy"


# ----------------------------------------------------------------------------------------------
# determinism, CUDA graphs, torch.compile (kernel only)
# ----------------------------------------------------------------------------------------------
GRAPH_CASES = [("float16", 1), ("float16", 16), ("float16", 128), ("float16", 255), ("bfloat16", 16), ("bfloat16", 64),
               ("bfloat16", 255)]


@pytest.mark.parametrize("dtype_name,m", GRAPH_CASES)
def test_cuda_graph_equals_eager(kernel, dtype_name, m):
    k, n = 4096, 12288
    dtype = DTYPES[dtype_name]
    w = make_weight(k, n, 128)
    x = random_x((m, k), dtype, seed=11 + m)
    eager1 = quick_gemm(x, w)
    eager2 = quick_gemm(x, w)
    torch.cuda.synchronize()
    assert torch.equal(eager1, eager2), (
        "two eager calls differ (max diff "
        f"{float((eager1.float() - eager2.float()).abs().max()):.3e}): the kernel is not deterministic"
    )
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        quick_gemm(static_x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = quick_gemm(static_x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, eager1), (
        f"graph replay differs from eager (max diff {float((static_y.float() - eager1.float()).abs().max()):.3e})"
    )
    # New data in the captured input buffer: the replay must compute on it (nothing baked in).
    x_new = random_x((m, k), dtype, seed=77 + m)
    static_x.copy_(x_new)
    graph.replay()
    graph.replay()  # twice: split-K counters must be left clean by each replay
    torch.cuda.synchronize()
    eager_new = quick_gemm(x_new, w)
    assert torch.equal(static_y, eager_new), "graph replay on new input differs from eager"
    check_output(static_y, x_new.float() @ w.w32, dtype, f"graph replay {dtype_name} M={m}")
    del graph
    # The QUICK kernel itself under a graph too (the op may have taken the dequant path above).
    k_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(k_graph):
        static_k = ops.kernel_gemm(static_x, w.qweight, w.qzeros, w.scales, None, w.group, n)
    k_graph.replay()
    k_graph.replay()
    torch.cuda.synchronize()
    eager_k = ops.kernel_gemm(x_new, w.qweight, w.qzeros, w.scales, None, w.group, n)
    assert torch.equal(static_k, eager_k), "QUICK kernel: graph replay differs from eager"
    assert torch.equal(eager_k, ops.kernel_gemm(x_new, w.qweight, w.qzeros, w.scales, None, w.group, n)), (
        "QUICK kernel: two eager calls differ (split-K reduction not deterministic?)"
    )
    del k_graph


class _QuickLinear(torch.nn.Module):
    def __init__(self, w: Weight):
        super().__init__()
        self.register_buffer("qweight", w.qweight)
        self.register_buffer("qzeros", w.qzeros)
        self.register_buffer("scales", w.scales)
        self.group, self.n = w.group, w.n

    def forward(self, x):
        return torch.ops.quick.gemm(x, self.qweight, self.qzeros, self.scales, None, self.group, self.n)


def test_torch_compile_equals_eager(kernel):
    k, n = 4096, 4096
    w = make_weight(k, n, 128)
    module = _QuickLinear(w)
    compiled = torch.compile(module, fullgraph=True)
    for dtype in (torch.float16, torch.bfloat16):
        for shape in ((1, k), (7, k), (3, 5, k), (64, k)):
            x = random_x(shape, dtype, seed=sum(shape))
            y_eager = module(x)
            y_comp = compiled(x)
            torch.cuda.synchronize()
            assert torch.equal(y_comp, y_eager), f"torch.compile output differs from eager for x {shape} {dtype}"


def test_bad_inputs_raise_on_cuda(kernel):
    k, n = 512, 256
    w = make_weight(k, n, 128)
    x = random_x((4, k), torch.float16, seed=1)
    with pytest.raises(ValueError, match="scales"):
        torch.ops.quick.gemm(x, w.qweight, w.qzeros, w.scales.float(), None, 128, n)
    with pytest.raises(ValueError, match="size_n"):
        torch.ops.quick.gemm(x, w.qweight, w.qzeros, w.scales, None, 128, n + 2)
    with pytest.raises(ValueError, match="qzeros"):
        torch.ops.quick.gemm(x, w.qweight, w.qzeros[:, :-1].contiguous(), w.scales, None, 128, n)


def test_extension_raises_value_errors(kernel):
    """The binding's own checks (callers that skip the op's Python checks) raise ValueError."""
    k, n = 512, 256
    w = make_weight(k, n, 128)
    x = random_x((4, k), torch.float16, seed=2)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        ops.kernel_gemm(x.cpu(), w.qweight, w.qzeros, w.scales, None, 128, n)
    with pytest.raises(ValueError, match="size_n"):
        ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, 128, n + 64)
    with pytest.raises(ValueError, match="not a tile configuration"):
        ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, 128, n, len(kernel.TILES))
    with pytest.raises(ValueError, match="dtype"):
        ops.kernel_dequantize(w.qweight, w.qzeros, w.scales, 128, torch.float32)
    # still usable afterwards
    y = ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, 128, n)
    check_output(y, x.float() @ w.w32, torch.float16, "after the errors")


@pytest.mark.parametrize("x_scale", [1.0, 1e4])
@pytest.mark.parametrize("path", ["dequant_fp16", "fp16:ws256", "ws256"])
def test_fp16_paths_for_bf16(kernel, monkeypatch, x_scale, path):
    """bf16 activations moved exactly into fp16 by a power of two: the dequant_fp16 path (an fp16
    dense weight, fp16 cuBLAS, ops.fp16_matmul_for_bf16), the "fp16:ws256" path (the fp16 tile
    ws256, ops.kernel_fp16_for_bf16) and ws256 itself (the scaling inside the extension, bf16
    written by the tile), forced through the op by the plan: within the budget
    against the fp32 reference on a padded and an unpadded layer, with and without bias, for
    activations whose products leave fp16's range (x_scale 1e4), and the same under a CUDA graph."""
    from vllm_quick import dispatch

    if path.endswith("ws256") and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{path}: the tile runs on sm_90 only")
    monkeypatch.setenv(dispatch.PLAN_ENV, f"bfloat16=*:{path}")
    monkeypatch.setattr(dispatch, "_env_plans", None)  # re-read the plan from the environment
    dtype = torch.bfloat16
    for (k, n), m in [((4096, 12288), 1), ((4096, 12288), 300), ((11008, 4096), 1024), ((4096, 200), 33)]:
        w = make_weight(k, n, 128)
        x = (random_x((m, k), torch.float32, seed=zlib.crc32(f"fp16/{k}/{n}/{m}".encode())) * x_scale).to(dtype)
        bias = random_x((n,), dtype, seed=3)
        assert dispatch.choose(m, dtype, x.device, weight_elements=k * n) == path
        for b in (None, bias):
            y = quick_gemm(x, w, b)
            ref = x.float() @ w.w32 + (0 if b is None else b.float())
            check_output(y, ref, dtype, f"{path} K={k} N={n} M={m} x*{x_scale} bias={b is not None}")
    static_x = x.clone()
    quick_gemm(static_x, w, bias)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = quick_gemm(static_x, w, bias)
    static_x.copy_(x * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, quick_gemm(x * 0.5, w, bias)), f"{path}: graph replay differs from eager"


def test_group_the_kernel_does_not_take_falls_back_to_the_reference(kernel):
    """Group 96 (a multiple of 32, not of 64) would straddle the kernel's 64-row k stages: the op
    must take its reference path (with a warning), not a wrong kernel result."""
    k, n = 576, 128
    w = make_weight(k, n, 96)
    x = random_x((3, k), torch.float16, seed=4)
    assert "group_size=96" in (ops.kernel_unsupported_reason(x, 96) or "")
    with pytest.raises(ValueError, match="group_size=96"):
        ops.kernel_gemm(x, w.qweight, w.qzeros, w.scales, None, 96, n)
    check_output(quick_gemm(x, w), x.float() @ w.w32, torch.float16, "group 96 via the reference path")


def test_reference_fallback_on_cuda_is_correct(kernel):
    """float32 activations take the reference path on CUDA; it must still be right."""
    k, n = 512, 256
    w = make_weight(k, n, 128)
    x = random_x((5, k), torch.float32, seed=3)
    y = quick_gemm(x, w)
    ref = x @ w.w32
    assert y.dtype == torch.float32
    assert float((y - ref).norm() / ref.norm()) < 1e-5
