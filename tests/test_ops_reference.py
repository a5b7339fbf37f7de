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


# ---------------------------------------------------------------------------------------------
# ops.fp16_matmul_for_bf16 (the dequant_fp16 path): its arithmetic on the CPU, where the fp32
# product of fp16 operands is emulated in fp32 exactly as cuBLAS does it (the GPU test runs cuBLAS).
# ---------------------------------------------------------------------------------------------
def _bf16_via_fp16_case(seed: int, m: int = 24, k: int = 512, n: int = 200, x_scale: float = 1.0):
    case = make_case(seed=seed, group_size=128, k=k, n=n)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, :3] *= 50.0  # outlier channels, as real activations have
    x = (x * x_scale).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    return case, x, bias


@pytest.mark.parametrize("x_scale", [1.0, 3e6, 1e-9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp16_matmul_for_bf16_rounds_once(x_scale, with_bias):
    """Elementwise: the fp16 dense weight (one fp16 rounding per weight), fp32 accumulation, the
    fp16 output's rounding and the final one to bf16; activations far above fp16's range
    (3e6 * 50) and far below its normal range (1e-9) go through the power-of-two scale without
    overflow or lost bits."""
    case, x, bias = _bf16_via_fp16_case(seed=7, x_scale=x_scale)
    b = bias if with_bias else None
    w16 = case["w64"].to(torch.float16)
    y = ops.fp16_matmul_for_bf16(x, w16, b, ops.column_abs_sum_bound(case["scales"], case["k"], 128))
    assert y.dtype == torch.bfloat16 and y.shape == (x.shape[0], case["n"])
    y64 = x.double() @ case["w64"] + (0 if b is None else b.double())
    magnitude = x.double().abs() @ case["w64"].abs() + (0 if b is None else b.double().abs())
    bound = (2.0**-8 + 2.0**-11) * y64.abs() + (2.0**-11 + case["k"] * 2.0**-24) * 1.01 * magnitude
    err = (y.double() - y64).abs()
    assert bool(torch.isfinite(y).all())
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3e}"
    rel = ((y.double() - y64).norm() / y64.norm()).item()
    assert rel < 2e-3, rel


def test_column_abs_sum_bound_holds():
    """The scales-only bound is >= every column's sum |W[k, n]| (and within 15x of the largest)."""
    for g in (32, 128, -1):
        case = make_case(seed=21, group_size=g, k=256, n=136)
        true = case["w64"].abs().sum(0).max().item()
        bound = ops.column_abs_sum_bound(case["scales"], case["k"], g).item()
        assert true <= bound <= 15 * true, (g, true, bound)


def test_fp16_matmul_for_bf16_beats_a_bf16_dense_weight():
    """Why the path exists: at K = 4096 its error against the exact product stays near bf16's
    output rounding, while a bf16 dense weight (plain dequant for bf16) adds its own rounding."""
    case, x, _ = _bf16_via_fp16_case(seed=3, m=16, k=4096, n=256)
    y64 = x.double() @ case["w64"]
    bound = ops.column_abs_sum_bound(case["scales"], case["k"], 128)
    ours = ops.fp16_matmul_for_bf16(x, case["w64"].to(torch.float16), None, bound)
    dense_bf16 = (x.float() @ case["w64"].to(torch.bfloat16).float()).to(torch.bfloat16)

    def rel(y):
        return ((y.double() - y64).norm() / y64.norm()).item()

    assert rel(ours) < 0.8 * rel(dense_bf16), (rel(ours), rel(dense_bf16))


def test_fp16_matmul_for_bf16_zero_input():
    case, _, _ = _bf16_via_fp16_case(seed=5)
    bound = ops.column_abs_sum_bound(case["scales"], case["k"], 128)
    y = ops.fp16_matmul_for_bf16(torch.zeros(4, case["k"], dtype=torch.bfloat16), case["w64"].half(), None, bound)
    assert torch.equal(y, torch.zeros_like(y))


def test_fp16_matmul_for_bf16_worst_case_does_not_overflow():
    """Every product of the same sign and the largest |q - z| = 15: the output reaches the bound
    max|x| * col_bound itself, which is where a scale chosen from max |x| alone would overflow fp16."""
    k, n, g = 512, 64, 128
    scales = torch.full((k // g, n), 0.5, dtype=torch.float16)
    w16 = torch.full((k, n), 15 * 0.5, dtype=torch.float16)  # codes 15, zeros 0
    x = torch.full((3, k), 3.0, dtype=torch.bfloat16)
    bias = torch.full((n,), -2.0, dtype=torch.bfloat16)
    y = ops.fp16_matmul_for_bf16(x, w16, bias, ops.column_abs_sum_bound(scales, k, g))
    expected = torch.full((3, n), 3.0 * 7.5 * k - 2.0).to(torch.bfloat16)
    assert torch.equal(y, expected), y[0, :4]
