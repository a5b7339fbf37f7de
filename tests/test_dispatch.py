"""The M-dispatch table and the script that derives it from benchmark results."""

from __future__ import annotations

import pytest
import torch

from benchmarks import dispatch_table
from vllm_quick import dispatch


def test_choose_follows_the_table(monkeypatch):
    monkeypatch.setattr(dispatch, "_major", lambda device: 9)
    monkeypatch.setattr(dispatch, "_env_plans", {})
    monkeypatch.setitem(dispatch.PLANS, 9, {
        torch.float16: ((16, "x16"), (255, "s64"), (None, "dequant")),
        torch.bfloat16: ((16, "x16"), (None, "x64")),
    })
    dev = torch.device("cuda", 0)
    assert [dispatch.choose(m, torch.float16, dev) for m in (1, 16, 17, 255, 256, 9999)] == [
        "x16", "x16", "s64", "s64", "dequant", "dequant"]
    assert dispatch.choose_path(255, torch.float16, dev) == "kernel"
    assert dispatch.choose_path(256, torch.float16, dev) == "dequant"
    assert dispatch.choose(4096, torch.bfloat16, dev) == "x64"


def test_small_layers_take_their_own_plan(monkeypatch):
    """A layer of K x N <= SMALL_LAYER_ELEMENTS follows SMALL_LAYER_PLANS where the family has one
    for the dtype, one of K x N >= LARGE_LAYER_ELEMENTS LARGE_LAYER_PLANS; layers in between,
    unknown sizes and other dtypes follow PLANS."""
    monkeypatch.setattr(dispatch, "_major", lambda device: 9)
    monkeypatch.setattr(dispatch, "_env_plans", {})
    monkeypatch.setitem(dispatch.PLANS, 9, {torch.float16: ((16, "x16"), (None, "w128n")),
                                            torch.bfloat16: ((None, "x64"),)})
    monkeypatch.setitem(dispatch.SMALL_LAYER_PLANS, 9, {torch.float16: ((64, "s32m"), (None, "dequant"))})
    dev = torch.device("cuda", 0)
    small, large = dispatch.SMALL_LAYER_ELEMENTS, dispatch.SMALL_LAYER_ELEMENTS + 1
    assert dispatch.choose(256, torch.float16, dev, weight_elements=small) == "dequant"
    assert dispatch.choose(64, torch.float16, dev, weight_elements=small) == "s32m"
    assert dispatch.choose(256, torch.float16, dev, weight_elements=large) == "w128n"
    assert dispatch.choose(256, torch.float16, dev) == "w128n"
    assert dispatch.choose(256, torch.bfloat16, dev, weight_elements=small) == "x64"
    assert dispatch.choose_path(256, torch.float16, dev, weight_elements=small) == "dequant"
    # Large layers follow LARGE_LAYER_PLANS; between the two sizes, PLANS.
    monkeypatch.setitem(dispatch.LARGE_LAYER_PLANS, 9, {torch.float16: ((None, "ws128w4"),)})
    big = dispatch.LARGE_LAYER_ELEMENTS
    assert dispatch.choose(100, torch.float16, dev, weight_elements=big) == "ws128w4"
    assert dispatch.choose(100, torch.float16, dev, weight_elements=big - 1) == "w128n"
    assert dispatch.choose(100, torch.bfloat16, dev, weight_elements=big) == "x64"


def test_row_split_sends_the_last_rows_to_their_own_tile(monkeypatch):
    """A call planned on ws256 with M = 256 q + r (q >= 1), 0 < r <= 64 (128 on a layer of K x N >=
    LARGE_LAYER_ELEMENTS), runs its last r rows on the plan's tile for M = r; not where r is 0 or
    larger, not below M = 257, not on other paths, not where the rest would go to dequantise +
    cuBLAS, and not with VLLM_QUICK_ROW_SPLIT=0."""
    monkeypatch.setattr(dispatch, "_major", lambda device: 9)
    monkeypatch.setattr(dispatch, "_env_plans", {})
    monkeypatch.delenv(dispatch.ROW_SPLIT_ENV, raising=False)
    monkeypatch.setitem(dispatch.PLANS, 9, {
        torch.float16: ((16, "ws16"), (64, "ws64b2"), (128, "ws128"), (None, "ws256")),
        torch.bfloat16: ((64, "dequant_fp16"), (None, "ws256")),
    })
    dev = torch.device("cuda", 0)

    def split(m, dtype=torch.float16):
        return dispatch.row_split(m, dispatch.choose(m, dtype, dev), dtype, dev)

    assert [split(m) for m in (257, 300, 320, 527, 575, 4100)] == [
        (256, "ws16"), (256, "ws64b2"), (256, "ws64b2"), (512, "ws16"), (512, "ws64b2"), (4096, "ws16")]
    assert [split(m) for m in (1, 128, 200, 256, 321, 384, 420, 512, 4096)] == [None] * 9
    big = dispatch.LARGE_LAYER_ELEMENTS
    rest_on_large = dispatch.choose(128, torch.float16, dev, weight_elements=big)  # (LARGE_LAYER_PLANS)
    assert dispatch.row_split(384, "ws256", torch.float16, dev, weight_elements=big) == (256, rest_on_large)
    assert dispatch.row_split(384, "ws256", torch.float16, dev, weight_elements=big - 1) is None
    assert dispatch.row_split(420, "ws256", torch.float16, dev, weight_elements=big) is None  # r = 164
    assert split(575, torch.bfloat16) is None  # its 63 rows would take dequant_fp16
    assert split(600, torch.bfloat16) is None  # its 88 rows would take ws256 again
    assert dispatch.row_split(575, "ws128", torch.float16, dev) is None  # only ws256 calls split
    assert dispatch.row_split(575, "fp16:ws256", torch.bfloat16, dev) is None  # (ops relies on it: no guard there)
    monkeypatch.setenv(dispatch.ROW_SPLIT_ENV, "0")
    assert split(575) is None


def test_shipped_sm90_plans_take_ws192_where_it_pads_less(monkeypatch):
    """sm_90's shipped plans (session 20's measurement): ws192 from M = 129 to 192 on every layer,
    and from 273 to 384 and 529 to 576 below LARGE_LAYER_ELEMENTS (three blocks of 192 rows hold
    vLLM's mixed step M = 575, where ws256 needs two blocks and a row split); ws256 where ws192
    would pad as much or more, or where the row split leaves ws256 a rest of up to 16 rows.
    VLLM_QUICK_WS192=0 runs ws256 wherever the plan says ws192, and the row split then applies as
    before."""
    monkeypatch.setattr(dispatch, "_major", lambda device: 9)
    monkeypatch.setattr(dispatch, "_env_plans", {})
    monkeypatch.delenv(dispatch.WS192_ENV, raising=False)
    monkeypatch.delenv(dispatch.ROW_SPLIT_ENV, raising=False)
    dev = torch.device("cuda", 0)
    mid, big = 4096 * 14336, dispatch.LARGE_LAYER_ELEMENTS
    ms = (128, 129, 192, 193, 256, 257, 272, 273, 384, 385, 512, 513, 528, 529, 575, 576, 577, 1024)
    for dtype in (torch.float16, torch.bfloat16):
        on_mid = [dispatch.choose(m, dtype, dev, weight_elements=mid) for m in ms]
        assert on_mid == ["ws128", "ws192", "ws192", "ws256", "ws256", "ws256", "ws256", "ws192", "ws192", "ws256",
                          "ws256", "ws256", "ws256", "ws192", "ws192", "ws192", "ws256", "ws256"], dtype
        on_large = [dispatch.choose(m, dtype, dev, weight_elements=big) for m in ms]
        assert on_large == ["ws128w", "ws192", "ws192"] + ["ws256"] * 15, dtype
        # ws256's short rests keep the row split: 257 = 256 + 1, 527 = 512 + 15
        assert dispatch.row_split(257, "ws256", dtype, dev, weight_elements=mid) == (256, "ws8")
        assert dispatch.row_split(527, "ws256", dtype, dev, weight_elements=mid) == (512, "ws16")
        assert dispatch.choose(16, dtype, dev, weight_elements=big) == "ws16w", dtype
        assert dispatch.choose(16, dtype, dev, weight_elements=mid) == "ws16", dtype
        # ws192 calls are never row-split; ws256's still are
        assert dispatch.row_split(575, dispatch.choose(575, dtype, dev, weight_elements=mid), dtype, dev,
                                  weight_elements=mid) is None
        assert dispatch.row_split(575, "ws256", dtype, dev, weight_elements=big) == (512, "ws64w")
    monkeypatch.setenv(dispatch.WS192_ENV, "0")
    assert [dispatch.choose(m, torch.float16, dev, weight_elements=mid) for m in (160, 300, 575)] == ["ws256"] * 3
    assert dispatch.row_split(575, dispatch.choose(575, torch.float16, dev, weight_elements=mid), torch.float16, dev,
                              weight_elements=mid) == (512, "ws64b2")


def test_op_row_split_writes_both_tiles_rows_into_one_y(monkeypatch):
    """The op's CUDA path on a ws256 call of M = 575 (ops._cuda_gemm, with a fake extension that
    records its calls and fills its output with the tile's number): rows [0, 512) go to ws256 and
    [512, 575) to the rest tile, each written into its rows of one y; with VLLM_QUICK_ROW_SPLIT=0
    one ws256 call makes y."""
    from vllm_quick import ops

    calls = []

    class FakeExtension:
        TILES = ("ws64b2", "ws256")

        def gemm(self, x, qweight, qzeros, scales, bias, group_size, size_n, tile, out):
            calls.append((x.shape[0], self.TILES[tile], out is not None))
            y = out if out is not None else x.new_empty((x.shape[0], size_n))
            y.fill_(tile + 1)
            return y, ""

    monkeypatch.setattr(ops, "kernel_extension", lambda: FakeExtension())
    monkeypatch.setattr(dispatch, "_tile_index", {})
    monkeypatch.setattr(dispatch, "_major", lambda device: 9)
    monkeypatch.setattr(dispatch, "_env_plans", {})
    monkeypatch.delenv(dispatch.ROW_SPLIT_ENV, raising=False)
    monkeypatch.setitem(dispatch.PLANS, 9, {torch.float16: ((64, "ws64b2"), (None, "ws256"))})
    k, n = 128, 64
    x = torch.randn(575, k).half()
    weights = (torch.zeros(k // 16, 1, 128, dtype=torch.int32), torch.zeros(1, 8, dtype=torch.int32),
               torch.ones(1, n, dtype=torch.float16))
    y = ops._cuda_gemm(x, *weights, None, 128, n)
    assert calls == [(512, "ws256", True), (63, "ws64b2", True)]
    assert y.shape == (575, n) and bool((y[:512] == 2).all()) and bool((y[512:] == 1).all())
    calls.clear()
    monkeypatch.setenv(dispatch.ROW_SPLIT_ENV, "0")
    y = ops._cuda_gemm(x, *weights, None, 128, n)
    assert calls == [(575, "ws256", False)] and bool((y == 2).all())


def test_unmeasured_gpu_family_lets_the_kernel_choose(monkeypatch):
    monkeypatch.setattr(dispatch, "_major", lambda device: 7)
    monkeypatch.setattr(dispatch, "_env_plans", {})
    assert dispatch.choose(8192, torch.float16, torch.device("cuda", 0)) == "auto"
    assert dispatch.choose_path(8192, torch.float16, torch.device("cuda", 0)) == "kernel"


def test_plan_env_overrides_the_table(monkeypatch):
    monkeypatch.setattr(dispatch, "_major", lambda device: 9)
    monkeypatch.setattr(dispatch, "_env_plans", None)
    monkeypatch.setenv(dispatch.PLAN_ENV, "float16=32:s32,*:s128")
    dev = torch.device("cuda", 0)
    assert dispatch.choose(8, torch.float16, dev) == "s32"
    assert dispatch.choose(4096, torch.float16, dev) == "s128"
    table = next(path for max_m, path in dispatch.PLANS[9][torch.bfloat16] if max_m is None or 8 <= max_m)
    assert dispatch.choose(8, torch.bfloat16, dev) == table  # bf16 not named: the table's plan


@pytest.mark.parametrize("spec,match", [
    ("float32=*:x16", "dtypes"),
    ("float16", "must look like"),
    ("float16=16:x16", "must end with"),
    ("float16=64:x64,16:x16,*:x64", "increase"),
    ("float16=*:x64,*:x16", "increase"),
    ("float16=abc:x16,*:x64", "max M"),
])
def test_bad_plan_specs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        dispatch.parse_plan_spec(spec)


def test_plan_spec_round_trip():
    plans = {torch.float16: ((16, "x16"), (None, "dequant")), torch.bfloat16: ((None, "x64"),)}
    assert dispatch.parse_plan_spec(dispatch.format_plan_spec(plans)) == plans


def test_tile_index_names_known_tiles():
    tiles = ["x16", "x32", "x64", "s16", "s32", "s64", "s128"]
    dispatch._tile_index.clear()
    assert dispatch.tile_index("auto", tiles) == -1
    assert dispatch.tile_index("s64", tiles) == 5
    with pytest.raises(ValueError, match="unknown kernel tile 'y7'"):
        dispatch.tile_index("y7", tiles)
    dispatch._tile_index.clear()


def _row(dtype, m, shape, **us):
    return {"dtype": dtype, "M": m, "shape": shape, "us": {f"quick_{k}": v for k, v in us.items()}}


def test_dispatch_table_picks_the_geometric_mean_winner_per_m():
    rows = [
        # M = 16: x16 fastest on both shapes
        _row("float16", 16, "a", x16=10, s64=20, dequant=50), _row("float16", 16, "b", x16=12, s64=30, dequant=60),
        # M = 32: x16 wins one shape by a hair, s64 the other by a lot -> s64
        _row("float16", 32, "a", x16=20, s64=21, dequant=50), _row("float16", 32, "b", x16=40, s64=20, dequant=60),
        _row("float16", 64, "a", x16=40, s64=22, dequant=50), _row("float16", 64, "b", x16=80, s64=25, dequant=60),
        _row("float16", 256, "a", x16=160, s64=80, dequant=50), _row("float16", 256, "b", x16=320, s64=90, dequant=60),
        # bf16: dequant never competes, s tiles are simply absent
        _row("bfloat16", 256, "a", x16=160, x64=100, dequant=50),
    ]
    plans = dispatch_table.suggest(rows)
    assert plans == {
        "float16": ((16, "x16"), (64, "s64"), (None, "dequant")),
        "bfloat16": ((None, "x64"),),
    }


def test_dispatch_table_offers_fp16_tiles_to_bf16():
    """quick_fp16_<tile> rows (bf16 through an fp16 tile) become 'fp16:<tile>' candidates for bf16,
    never for fp16 (there the tile itself is the candidate)."""
    rows = [_row("bfloat16", 1024, "a", w64x=100, fp16_ws256=60), _row("bfloat16", 16, "a", x16=10, fp16_ws256=60),
            _row("float16", 1024, "a", ws256=50, fp16_ws256=40)]
    assert dispatch_table.suggest(rows) == {"bfloat16": ((16, "x16"), (None, "fp16:ws256")), "float16": ((None, "ws256"),)}


def test_dispatch_table_offers_dequant_fp16_to_bf16_only():
    rows = [_row("bfloat16", 1024, "a", w64x=100, dequant=50, dequant_fp16=60),
            _row("float16", 1024, "a", w64x=100, dequant=50, dequant_fp16=40)]
    assert dispatch_table.suggest(rows) == {"bfloat16": ((None, "dequant_fp16"),), "float16": ((None, "dequant"),)}


def test_dispatch_table_ignores_inaccurate_paths():
    fast_but_wrong = _row("float16", 64, "a", x64=30, s64=10)
    fast_but_wrong["rel_err_backends"] = {"quick_x64": 3e-4, "quick_s64": 5e-3}
    assert dispatch_table.suggest([fast_but_wrong]) == {"float16": ((None, "x64"),)}


def test_dispatch_table_ignores_plan_setting_variants():
    """quick_<tile>_<variant> rows (a tile timed under another plan setting, e.g. _gk with the
    global split-K reduction) are A/B measurements, not paths a plan can name."""
    row = _row("float16", 16, "a", s16m=20, s16m_gk=10, s32m_sp16=5, dequant=50)
    assert dispatch_table.candidates(row) == {"s16m": 20, "dequant": 50}
    assert dispatch_table.suggest([row]) == {"float16": ((None, "s16m"),)}


def test_dispatch_table_needs_candidate_timings(tmp_path, capsys):
    result = tmp_path / "r.json"
    result.write_text('[{"dtype": "float16", "M": 1, "us": {"quick": 1.0}}]')
    assert dispatch_table.main([str(result)]) == 1


def test_dispatch_table_spec_is_a_valid_env_plan(tmp_path, capsys):
    import json

    result = tmp_path / "r.json"
    result.write_text(json.dumps([_row("float16", 16, "a", x16=1.0, dequant=2.0),
                                  _row("float16", 512, "a", x16=9.0, dequant=2.0)]))
    assert dispatch_table.main([str(result), "--spec"]) == 0
    spec = capsys.readouterr().out.strip()
    assert spec == "float16=16:x16,*:dequant"
    assert dispatch.parse_plan_spec(spec)[torch.float16] == ((16, "x16"), (None, "dequant"))


def test_force_reference_env_overrides_the_kernel(monkeypatch):
    from vllm_quick import ops

    x = torch.empty(2, 128, dtype=torch.float16)
    monkeypatch.setenv(ops.FORCE_REFERENCE_ENV, "1")
    assert ops.kernel_unsupported_reason(x, 128) == f"{ops.FORCE_REFERENCE_ENV}=1"
    monkeypatch.delenv(ops.FORCE_REFERENCE_ENV)
    # without the variable, the reason (if any) is about the kernel itself, never the variable
    assert ops.FORCE_REFERENCE_ENV not in (ops.kernel_unsupported_reason(x, 128) or "")


def test_describe_says_what_runs(monkeypatch):
    from vllm_quick import ops

    assert "reference path" in dispatch.describe(torch.float16, torch.device("cpu"))
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(ops, "kernel_extension", lambda: None)
    assert "without the compiled extension" in dispatch.describe(torch.float16, dev)
    monkeypatch.setattr(ops, "kernel_extension", lambda: object())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dispatch, "_major", lambda device: 9)
    monkeypatch.setattr(dispatch, "_env_plans", {})
    monkeypatch.setitem(dispatch.PLANS, 9, {torch.float16: ((16, "s16"), (128, "s64"), (None, "dequant"))})
    monkeypatch.setitem(dispatch.SMALL_LAYER_PLANS, 9, {torch.float16: ((64, "s32m"), (None, "dequant"))})
    monkeypatch.setitem(dispatch.LARGE_LAYER_PLANS, 9, {torch.float16: ((128, "ws128w4"), (None, "dequant"))})
    text = dispatch.describe(torch.float16, dev)
    assert text == ("NVIDIA H100 80GB HBM3 (sm9x), float16: M 1-16: tile s16; M 17-128: tile s64; "
                    "M >= 129: dequantise + cuBLAS; layers of K x N <= 25165824: M 1-64: tile s32m; "
                    "M >= 65: dequantise + cuBLAS; layers of K x N >= 78643200: M 1-128: tile ws128w4; "
                    "M >= 129: dequantise + cuBLAS (measured)")
    # ws256 in a plan: the row split is named too (dispatch.row_split)
    monkeypatch.setitem(dispatch.PLANS, 9, {torch.float16: ((128, "s64"), (None, "ws256"))})
    assert dispatch.describe(torch.float16, dev).endswith(
        "M = 256 q + r with 0 < r <= 64 (128 on the large layers) on ws256: the last r rows on the plan's "
        "tile for M = r (measured)")
    monkeypatch.setattr(dispatch, "_major", lambda device: 8)
    assert dispatch.describe(torch.float16, dev).endswith("M >= 1: the kernel's own tile choice (not measured on this GPU family)")


@pytest.mark.parametrize("table", ["PLANS", "SMALL_LAYER_PLANS", "LARGE_LAYER_PLANS"])
def test_shipped_plans_are_well_formed(table):
    """Each shipped plan round-trips through the env spec parser (which checks increasing M and a
    final '*'), and bf16 plans name only paths within the 2e-3 budget: the exact tiles (x, w64x)
    and dequant_fp16 / "fp16:<tile>" / the ws tiles / s16m / s32m (x in as an exact fp16 copy: one
    fp16 rounding of (q - z) * s, 1.7e-3 measured); another s tile or a dense bf16 weight rounds
    (q - z) * s to bf16, ~2.3e-3 of error. "fp16:" paths name a tile and appear in bf16 plans only."""
    exact_bf16 = {"x16", "x32", "x64", "w64x", "ws256", "ws128", "ws64", "ws64b2", "ws128w4", "ws16", "ws8", "ws16b2", "ws32b2", "ws8w", "ws16w",
                  "ws32w", "ws64w", "ws128w", "ws192", "s16m", "s32m",
                  "dequant_fp16",
                  "auto"}
    for family, plans in getattr(dispatch, table).items():
        assert dispatch.parse_plan_spec(dispatch.format_plan_spec(plans)) == plans, family
        for dtype, plan in plans.items():
            assert plan[-1][0] is None, (family, dtype)
            fp16_tiles = {dispatch.fp16_tile_of(path) for _, path in plan} - {None}
            assert fp16_tiles <= {"ws256", "w128n", "s16m", "s32m", "s64m"}, (family, plan)
            assert not fp16_tiles or dtype == torch.bfloat16, (family, dtype, plan)
            if dtype == torch.bfloat16:
                plain = {path for _, path in plan if dispatch.fp16_tile_of(path) is None}
                assert plain <= exact_bf16, (family, plan)


def test_fp16_paths_parse_and_describe():
    """'fp16:<tile>' (bf16 through an fp16 tile) survives the env spec and names its tile."""
    plans = dispatch.parse_plan_spec("bfloat16=16:x16,*:fp16:ws256")
    assert plans == {torch.bfloat16: ((16, "x16"), (None, "fp16:ws256"))}
    assert dispatch.format_plan_spec(plans) == "bfloat16=16:x16,*:fp16:ws256"
    assert dispatch.fp16_tile_of("fp16:ws256") == "ws256" and dispatch.fp16_tile_of("ws256") is None
    assert dispatch._describe_plan(plans[torch.bfloat16]) == "M 1-16: tile x16; M >= 17: scaled into fp16, tile ws256"
