"""Property tests of the ``quick::gemm`` op's reference path (CPU), against float64 math.

The quantised weight is built in natural order (codes, zeros, scales), packed the AWQ way and
converted with ``layout.awq_to_quick`` (which pads N to a multiple of 64), exactly as the plugin
does at load time. The op's output must equal ``x @ ((codes - zeros) * scales) (+ bias)`` computed
in float64, element by element, within a bound derived from the arithmetic the reference does
(exact dequantisation in fp32, an fp32 matmul, one rounding to the output dtype):

    |y - y64| <= u_out * |y64| + (1 + u_out) * K * 2^-24 * (|x| @ |W| + |bias|) + tiny

where ``u_out`` is the unit roundoff of x's dtype (0 for float32). A misplaced nibble, zero or
scale moves an element by about |W| and fails this by orders of magnitude.

Also: ``torch.library.opcheck`` on the op (schema, fake tensor, autograd registration, AOT
dispatch), the meta/fake shape function, and bad inputs raising ValueError naming the tensor.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from vllm_quick import layout, ops  # noqa: F401  (ops registers torch.ops.quick.gemm)

GROUPS = (32, 64, 128, -1)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BIASES = (None, "float32", "act")
X_DIMS = (1, 2, 3)
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def make_case(seed: int, group_size: int, k: int | None = None, n: int | None = None):
    """Random natural-order codes/zeros/scales and their interleaved, N-padded op tensors."""
    rng = random.Random(seed)
    if k is None:
        k = group_size * rng.randint(1, 4) if group_size > 0 else 16 * rng.randint(1, 24)
    if n is None:
        n = 8 * rng.randint(1, 40)  # mostly not a multiple of 64: exercises the padding
    g = k if group_size == -1 else group_size
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.int32)
    scales = ((torch.rand(k // g, n, generator=gen) + 0.05) * 0.05).half()
    qweight, qzeros, s = layout.awq_to_quick(layout.awq_pack(codes), layout.awq_pack(zeros), scales)
    w64 = (codes - zeros.repeat_interleave(g, 0)).double() * scales.double().repeat_interleave(g, 0)
    return {"k": k, "n": n, "g": g, "qweight": qweight, "qzeros": qzeros, "scales": s, "w64": w64}


def x_shape(ndim: int, k: int, rng: random.Random) -> tuple[int, ...]:
    if ndim == 1:
        return (k,)
    if ndim == 2:
        return (rng.choice([1, 2, 3, 7, 16, 33]), k)
    return (rng.randint(1, 3), rng.randint(1, 9), k)


def assert_matches_float64(y, x, w64, bias, label: str) -> None:
    k = x.shape[-1]
    x64 = x.double()
    y64 = x64 @ w64
    magnitude = x64.abs() @ w64.abs()
    if bias is not None:
        y64 = y64 + bias.double()
        magnitude = magnitude + bias.double().abs()
    u = UNIT_ROUNDOFF[x.dtype]
    bound = u * y64.abs() + (1 + u) * k * 2.0**-24 * magnitude + 1e-7
    err = (y.double() - y64).abs()
    worst = (err - bound).flatten().argmax()
    assert bool((err <= bound).all()), (
        f"{label}: element {worst.item()} off by {err.flatten()[worst].item():.3e} "
        f"(allowed {bound.flatten()[worst].item():.3e}, value {y64.flatten()[worst].item():.3e})"
    )


def _property_cases():
    cases = []
    for i, (g, dtype, bias, ndim) in enumerate(itertools.product(GROUPS, DTYPES, BIASES, X_DIMS)):
        dname = str(dtype).replace("torch.", "")
        cases.append(pytest.param(i, g, dtype, bias, ndim, id=f"g{g}-{dname}-bias_{bias}-x{ndim}d"))
    return cases


@pytest.mark.parametrize("seed,group_size,dtype,bias_kind,ndim", _property_cases())
def test_op_equals_float64_math(seed, group_size, dtype, bias_kind, ndim):
    case = make_case(1000 + seed, group_size)
    k, n = case["k"], case["n"]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape(ndim, k, rng), generator=gen).to(dtype)
    bias = None
    if bias_kind is not None:
        bias = torch.randn(n, generator=gen).to(torch.float32 if bias_kind == "float32" else dtype)
    y = torch.ops.quick.gemm(x, case["qweight"], case["qzeros"], case["scales"], bias, case["g"], n)
    assert y.dtype == dtype
    assert tuple(y.shape) == (*x.shape[:-1], n)
    label = f"K={k} N={n} g={group_size} {dtype} bias={bias_kind} x{tuple(x.shape)}"
    assert_matches_float64(y, x, case["w64"], bias, label)


@pytest.mark.parametrize("n", [8, 56, 64, 72, 200, 256])
def test_padding_columns_never_leak(n):
    """Only size_n columns come back, and they do not depend on what sits in the padding."""
    case = make_case(7, 64, k=128, n=n)
    x = torch.randn(5, 128)
    y = torch.ops.quick.gemm(x, case["qweight"], case["qzeros"], case["scales"], None, 64, n)
    assert tuple(y.shape) == (5, n)
    assert_matches_float64(y, x, case["w64"], None, f"N={n}")


def test_group_size_equal_to_k_is_per_channel():
    """group_size = K (one group) through the op equals the per-channel (-1) weight."""
    case = make_case(11, -1, k=256, n=96)
    x = torch.randn(3, 256)
    y = torch.ops.quick.gemm(x, case["qweight"], case["qzeros"], case["scales"], None, 256, 96)
    assert_matches_float64(y, x, case["w64"], None, "g=K")


def test_meta_shape():
    case = make_case(3, 64, k=128, n=200)
    x = torch.empty(2, 3, 128, dtype=torch.float16, device="meta")
    args = [t.to("meta") for t in (case["qweight"], case["qzeros"], case["scales"])]
    y = torch.ops.quick.gemm(x, *args, None, 64, 200)
    assert y.device.type == "meta" and tuple(y.shape) == (2, 3, 200) and y.dtype == torch.float16


@pytest.mark.parametrize(
    "dtype,bias_kind,shape",
    [
        (torch.float32, None, (4, 128)),
        (torch.float16, "act", (2, 3, 128)),
        (torch.bfloat16, "float32", (128,)),
    ],
)
def test_opcheck(dtype, bias_kind, shape):
    case = make_case(5, 64, k=128, n=72)
    x = torch.randn(shape).to(dtype)
    bias = None if bias_kind is None else torch.randn(72).to(torch.float32 if bias_kind == "float32" else dtype)
    torch.library.opcheck(
        torch.ops.quick.gemm.default,
        (x, case["qweight"], case["qzeros"], case["scales"], bias, 64, 72),
    )


# ----------------------------------------------------------------------------------------------
# bad inputs: ValueError naming the tensor (or argument) at fault
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def good():
    case = make_case(9, 64, k=128, n=200)  # padded to 256
    return {
        "x": torch.randn(3, 128),
        "qweight": case["qweight"],
        "qzeros": case["qzeros"],
        "scales": case["scales"],
        "bias": None,
        "group_size": 64,
        "size_n": 200,
    }


def _call(args):
    return torch.ops.quick.gemm(
        args["x"], args["qweight"], args["qzeros"], args["scales"], args["bias"], args["group_size"], args["size_n"]
    )


BAD_INPUTS = {
    "scales float32": (lambda a: a.update(scales=a["scales"].float()), "scales"),
    "scales bfloat16": (lambda a: a.update(scales=a["scales"].bfloat16()), "scales"),
    "scales wrong groups": (lambda a: a.update(scales=a["scales"][:1].contiguous()), "scales"),
    "scales wrong N": (lambda a: a.update(scales=a["scales"][:, :192].contiguous()), "scales"),
    "qzeros wrong shape": (lambda a: a.update(qzeros=a["qzeros"][:, :-8].contiguous()), "qzeros"),
    "qzeros int64": (lambda a: a.update(qzeros=a["qzeros"].long()), "qzeros"),
    "qweight int64": (lambda a: a.update(qweight=a["qweight"].long()), "qweight"),
    "qweight 2-D": (lambda a: a.update(qweight=a["qweight"].reshape(a["qweight"].shape[0], -1)), "qweight"),
    "x K mismatch": (lambda a: a.update(x=torch.randn(3, 144)), "qweight"),
    "x int32": (lambda a: a.update(x=torch.ones(3, 128, dtype=torch.int32)), "x"),
    "size_n too large": (lambda a: a.update(size_n=264), "size_n"),
    "size_n in the tile before": (lambda a: a.update(size_n=192), "size_n"),
    "size_n zero": (lambda a: a.update(size_n=0), "size_n"),
    "bias wrong length": (lambda a: a.update(bias=torch.randn(256)), "bias"),
    "group_size not dividing K": (lambda a: a.update(group_size=48), "group_size"),
    "group_size zero": (lambda a: a.update(group_size=0), "group_size"),
}


@pytest.mark.parametrize("what", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_it(good, what):
    mutate, name = BAD_INPUTS[what]
    _call(good)  # the unmodified call is fine
    mutate(good)
    with pytest.raises(ValueError, match=name):
        _call(good)


@pytest.mark.parametrize("n,chunk_tiles", [(200, 1), (448, 3), (448, 7), (448, 32), (64, 1)])
def test_dequant_chunk_loop_covers_every_column(monkeypatch, n, chunk_tiles):
    """The dequant_l2 loop of ops.dequant_matmul, on the CPU with the dequantise kernel emulated
    from the layout's reference (the kernel itself is checked on the GPU): chunks of
    ``chunk_tiles`` 64-column tiles, a partial last chunk and the padded columns beyond size_n
    all land in the right columns of y, bias included, equal to the whole-layer product."""
    case = make_case(seed=n + chunk_tiles, group_size=64, k=128, n=n)
    dense = layout.dequantize_quick(case["qweight"], case["qzeros"], case["scales"])  # [K, Np] fp32
    calls = []

    def fake_dequantize(qweight, qzeros, scales, group_size, dtype, tile_begin=0, tile_count=-1, out=None):
        count = qweight.shape[1] - tile_begin if tile_count < 0 else tile_count
        calls.append((tile_begin, count))
        block = dense[:, tile_begin * 64:(tile_begin + count) * 64].to(dtype)
        if out is None:
            return block
        assert out.shape == block.shape and out.is_contiguous()
        out.copy_(block)
        return out

    monkeypatch.setattr(ops, "kernel_dequantize", fake_dequantize)
    monkeypatch.setattr(ops, "dequant_chunk_tiles", lambda k, n_tiles, element_size, chunk_bytes: chunk_tiles)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(n))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n + 1))
    for b in (None, bias):
        y = ops.dequant_matmul(x, case["qweight"], case["qzeros"], case["scales"], b, 64, n, chunk_bytes=1)
        ref = x @ dense[:, :n] + (0 if b is None else b)
        assert y.shape == (5, n)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    n_tiles = case["qweight"].shape[1]
    assert calls[: (n_tiles + chunk_tiles - 1) // chunk_tiles] == [
        (t, min(chunk_tiles, n_tiles - t)) for t in range(0, n_tiles, chunk_tiles)]
