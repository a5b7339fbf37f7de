"""Tensor-parallel sharding of the ``quick`` method, simulated on the CPU (issue 6).

For TP = 2 and 4, every rank of a layer is built in this one process (``fake_tp`` in conftest.py:
vLLM believes it is rank r of a group of s while the layer is built and loaded), gets the *full*
checkpoint tensors through its own parameters' weight loaders, as vLLM's model loader hands them
over, and is finished with ``process_weights_after_loading``. Then

(a) the ranks' weights, dequantised from their interleaved tensors and put back together the way
    vLLM split them (column-parallel: each fused part's output columns, kv heads possibly
    replicated; row-parallel: the input rows, K / tp per rank), equal the unsharded checkpoint
    matrix exactly, and the weight of the same layer built at TP = 1;
(b) the ranks' outputs, through the layers' own ``forward``, combine to the TP = 1 layer's output
    (column: concatenated per fused part; row: the partial outputs summed, the bias added once,
    by rank 0, as vLLM's RowParallelLinear does before its all-reduce).

Covered: plain column-parallel, MergedColumnParallel (gate_up), QKVParallel (GQA, and kv heads
fewer than ranks, which vLLM replicates), RowParallel; fused layers stored per part or already
fused on disk; AWQ (interleaved at load) and
pre-interleaved checkpoints; group sizes 32/64/128/-1 (per-channel zeros and scales are kept
whole on every row-parallel rank); AWQ layers whose per-rank width needs padding to whole
64-column tiles. Refused at start-up (layer construction = ``create_weights``) with a ValueError
naming the layer and the sizes: a group straddling two row-parallel ranks, a row-parallel rank
input that is not whole 16-row tiles, and a pre-interleaved checkpoint whose per-rank widths are
not whole 64-column tiles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from _layer_helpers import (
    FORMATS,
    checkpoint_tensors,
    finish,
    layer_weight,
    load_into,
    quick_config,
    random_quantized,
)

from vllm_quick import layout

GROUP_SIZES = (32, 64, 128, -1)
TP_SIZES = (2, 4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------
# layer cases
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One vLLM linear layer: its kind, input size and the parts its checkpoint stores."""

    kind: str  # "column" | "merged" | "qkv" | "row"
    k: int
    parts: tuple  # ((shard_id, full output width), ...); shard_id None: an unfused layer
    head_dim: int = 0  # qkv only
    kv_heads: int = 0  # qkv only

    @property
    def n(self) -> int:
        return sum(width for _, width in self.parts)

    @property
    def prefix(self) -> str:
        return {
            "column": "model.layers.0.mlp.fc",
            "merged": "model.layers.0.mlp.gate_up_proj",
            "qkv": "model.layers.0.self_attn.qkv_proj",
            "row": "model.layers.0.mlp.down_proj",
        }[self.kind]

    def __str__(self) -> str:
        return f"{self.kind}-k{self.k}-" + "-".join(f"{sid if sid is not None else 'n'}{w}" for sid, w in self.parts)


def column(k: int, n: int) -> Case:
    return Case("column", k, ((None, n),))


def merged(k: int, *sizes: int) -> Case:
    return Case("merged", k, tuple(enumerate(sizes)))


def qkv(hidden: int, head_dim: int, heads: int, kv_heads: int) -> Case:
    parts = (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim))
    return Case("qkv", hidden, parts, head_dim=head_dim, kv_heads=kv_heads)


def row(k: int, n: int) -> Case:
    return Case("row", k, ((None, n),))


def build(case: Case, fmt: str, group_size: int, bias: bool = True):
    """The vLLM layer for ``case`` (create_weights runs here); call inside ``fake_tp``."""
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    common = {
        "bias": bias,
        "params_dtype": torch.float32,
        "quant_config": quick_config(fmt, group_size),
        "prefix": case.prefix,
    }
    if case.kind == "column":
        return ColumnParallelLinear(case.k, case.n, **common)
    if case.kind == "merged":
        return MergedColumnParallelLinear(case.k, [w for _, w in case.parts], **common)
    if case.kind == "qkv":
        heads = case.parts[0][1] // case.head_dim
        return QKVParallelLinear(case.k, case.head_dim, heads, case.kv_heads, **common)
    return RowParallelLinear(case.k, case.n, **common)


def make_checkpoint(case: Case, group_size: int):
    """Random quantised parts ``{shard_id: (codes, zeros, scales, W)}`` and biases."""
    quantized = {sid: random_quantized(case.k, width, group_size) for sid, width in case.parts}
    biases = {sid: torch.randn(width) for sid, width in case.parts}
    return quantized, biases


def load(layer, fmt: str, quantized, biases, fused_on_disk: bool = False) -> None:
    """Every checkpoint tensor, full size, through the layer's loaders (vLLM slices per rank).
    ``fused_on_disk``: the checkpoint stores the fused layer as one tensor per name (Phi-3's
    qkv_proj / gate_up_proj), loaded without a shard id; vLLM cuts it into its parts."""
    if fused_on_disk:
        per_part = [checkpoint_tensors(fmt, *quantized[sid][:3]) for sid in quantized]
        load_into(layer, {name: torch.cat([t[name] for t in per_part], dim=1) for name in per_part[0]})
        if layer.bias is not None:
            layer.bias.weight_loader(layer.bias, torch.cat(list(biases.values())))
        return
    for sid, (codes, zeros, scales, _) in quantized.items():
        load_into(layer, checkpoint_tensors(fmt, codes, zeros, scales), sid)
        if layer.bias is not None:
            extra = () if sid is None else (sid,)
            layer.bias.weight_loader(layer.bias, biases[sid], *extra)


def build_rank(fake_tp, case, fmt, group_size, quantized, biases, rank: int, tp: int, fused_on_disk=False):
    with fake_tp(rank, tp):
        layer = build(case, fmt, group_size)
        load(layer, fmt, quantized, biases, fused_on_disk)
    return finish(layer)


# ----------------------------------------------------------------------------------------------
# how vLLM splits a column-parallel layer (stated independently of vLLM's code)
# ----------------------------------------------------------------------------------------------
def column_split(case: Case, tp: int, rank: int) -> list[tuple]:
    """``(shard_id, first column, width)`` of each part's full matrix that ``rank`` holds, in
    the order the rank stores them. q / gate / up / plain: the rank's 1/tp of the columns. k / v:
    whole kv heads; with fewer kv heads than ranks each head is replicated on tp / kv_heads
    consecutive ranks."""
    split = []
    for sid, width in case.parts:
        if sid in ("k", "v"):
            heads_per_rank = max(1, case.kv_heads // tp)
            replicas = max(1, tp // case.kv_heads)
            share = heads_per_rank * case.head_dim
            split.append((sid, (rank // replicas) * share, share))
        else:
            share = width // tp
            split.append((sid, rank * share, share))
    return split


def reassemble_columns(case: Case, tp: int, per_rank: list[torch.Tensor]) -> torch.Tensor:
    """Put the ranks' column blocks (weights or outputs) back into the unsharded order: each
    part's slices concatenated over ranks, parts side by side. Replicated slices must agree."""
    pieces: dict = {sid: {} for sid, _ in case.parts}
    for rank, t in enumerate(per_rank):
        split = column_split(case, tp, rank)
        assert t.shape[-1] == sum(width for _, _, width in split)
        offset = 0
        for sid, first, width in split:
            piece = t[..., offset : offset + width]
            offset += width
            if first in pieces[sid]:  # a replicated kv head: identical on every replica
                assert torch.equal(pieces[sid][first], piece), f"{sid} replica on rank {rank} differs"
            else:
                pieces[sid][first] = piece
    parts = []
    for sid, width in case.parts:
        starts = sorted(pieces[sid])
        assert starts == list(range(0, width, width // len(starts))), (sid, starts)
        parts.append(torch.cat([pieces[sid][s] for s in starts], dim=-1))
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------------------------
# the check itself
# ----------------------------------------------------------------------------------------------
def check_sharding(fake_tp, case: Case, fmt: str, group_size: int, tp: int, fused_on_disk=False) -> list:
    """Build TP=1 and all ``tp`` ranks from one checkpoint; assert (a) and (b) of the module
    docstring. Returns the rank layers."""
    quantized, biases = make_checkpoint(case, group_size)
    full = build_rank(fake_tp, case, fmt, group_size, quantized, biases, 0, 1)
    ranks = [
        build_rank(fake_tp, case, fmt, group_size, quantized, biases, r, tp, fused_on_disk) for r in range(tp)
    ]
    w_checkpoint = torch.cat([quantized[sid][3] for sid, _ in case.parts], dim=1)
    assert torch.equal(layer_weight(full), w_checkpoint)

    k_rank = case.k // tp if case.kind == "row" else case.k
    for layer in ranks:
        assert layer.qweight.shape[0] == k_rank // layout.TILE_K
        assert layer.qweight.shape[1] * layout.TILE_N == layout.padded_n(layer.quick_size_n)
        groups = 1 if group_size == -1 else k_rank // group_size
        assert layer.scales.shape[0] == layer.qzeros.shape[0] == groups
        assert layer.quick_group_size == k_rank // groups

    x = torch.randn(3, case.k)
    y_full, _ = full(x)
    if case.kind == "row":
        # (a) input rows, K/tp per rank, in rank order
        assert torch.equal(torch.cat([layer_weight(layer) for layer in ranks], dim=0), w_checkpoint)
        # (b) each rank multiplies its slice of x; vLLM's all-reduce sums the partial outputs
        x_parts = x.split(k_rank, dim=-1)
        partial = [layer(x_r)[0] for layer, x_r in zip(ranks, x_parts)]
        torch.testing.assert_close(torch.stack(partial).sum(0), y_full, rtol=1e-5, atol=1e-5)
        # the bias is added by rank 0 only
        torch.testing.assert_close(partial[1], x_parts[1] @ layer_weight(ranks[1]), rtol=1e-5, atol=1e-5)
    else:
        # (a) output columns of each fused part
        assert torch.equal(reassemble_columns(case, tp, [layer_weight(layer) for layer in ranks]), w_checkpoint)
        # (b) every rank sees all of x; its outputs are its columns (vLLM gathers them)
        outs = [layer(x)[0] for layer in ranks]
        torch.testing.assert_close(reassemble_columns(case, tp, outs), y_full, rtol=1e-5, atol=1e-5)
    return ranks


# ----------------------------------------------------------------------------------------------
# every layer kind x format x group size x TP
# ----------------------------------------------------------------------------------------------
ALIGNED_CASES = [
    column(256, 512),
    merged(256, 256, 512),  # unequal parts: a wrong shard offset cannot hide
    qkv(256, head_dim=64, heads=8, kv_heads=2),  # GQA; at TP=4 each kv head sits on 2 ranks
    row(512, 192),
]


@pytest.mark.parametrize("tp", TP_SIZES, ids=lambda tp: f"tp{tp}")
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ALIGNED_CASES, ids=str)
def test_shards_reassemble_to_unsharded_layer(fake_tp, case, fmt, group_size, tp):
    check_sharding(fake_tp, case, fmt, group_size, tp)


@pytest.mark.parametrize("tp", TP_SIZES, ids=lambda tp: f"tp{tp}")
@pytest.mark.parametrize("fmt", FORMATS)
def test_single_kv_head_replicated_on_every_rank(fake_tp, fmt, tp):
    """MQA (one kv head): every rank holds the same k and v columns, only q is split."""
    case = qkv(128, head_dim=64, heads=4, kv_heads=1)
    ranks = check_sharding(fake_tp, case, fmt, 128, tp)
    kv = [layer_weight(layer)[:, 256 // tp :] for layer in ranks]
    assert all(torch.equal(kv[0], other) for other in kv[1:])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "k, group_size, tp",
    [(384, 64, 2), (384, 32, 4), (768, 64, 4), (384, -1, 4)],
    ids=["k384-g64-tp2", "k384-g32-tp4", "k768-g64-tp4", "k384-perchannel-tp4"],
)
def test_row_parallel_odd_group_counts_per_rank(fake_tp, fmt, k, group_size, tp):
    """Ranks holding an odd number of whole groups (192 = 3 x 64 rows, 96 = 3 x 32), and a
    per-channel layer whose rank input (96) is no power of two."""
    check_sharding(fake_tp, row(k, 128), fmt, group_size, tp)


@pytest.mark.parametrize("tp", TP_SIZES, ids=lambda tp: f"tp{tp}")
@pytest.mark.parametrize("group_size", (64, -1), ids=lambda g: f"g{g}")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ALIGNED_CASES[1:3], ids=str)
def test_fused_on_disk_checkpoint(fake_tp, case, fmt, group_size, tp):
    """gate_up / qkv stored as one tensor per name (loaded with no shard id): vLLM cuts the
    parts out of the packed tensors (tiles of 64 columns for a pre-interleaved qweight) and then
    shards each part as above."""
    check_sharding(fake_tp, case, fmt, group_size, tp, fused_on_disk=True)


# ----------------------------------------------------------------------------------------------
# per-rank widths that are not whole 64-column tiles
# ----------------------------------------------------------------------------------------------
# Full widths are multiples of 64 (a valid pre-interleaved checkpoint at TP=1), some per-rank
# widths are not (576 = 9 x 64 -> 288 at TP=2, 144 at TP=4).
UNALIGNED_CASES = [
    column(256, 576),
    merged(256, 192, 320),
    qkv(256, head_dim=80, heads=8, kv_heads=4),  # q 640, k / v 320 in all; 80-column heads
]


@pytest.mark.parametrize("tp", TP_SIZES, ids=lambda tp: f"tp{tp}")
@pytest.mark.parametrize(
    "case",
    UNALIGNED_CASES + [qkv(256, head_dim=80, heads=8, kv_heads=2), row(512, 200)],
    ids=str,
)
def test_awq_rank_parts_off_tile_boundaries(fake_tp, case, tp):
    """AWQ ranks whose parts are not whole 64-column tiles: the split happens on the AWQ tensors
    (8-column words), then each rank is interleaved, padded after its last part when its total
    width is not whole tiles (e.g. column 576 -> 288 -> 320 at TP=2; q+k+v 320+80+80 = 480 ->
    512; row N=200 -> 256 on every rank), so the fused parts' offsets are unchanged."""
    ranks = check_sharding(fake_tp, case, "awq", 64, tp)
    for layer in ranks:  # the padding is exactly up to the next whole tile
        width = sum(w for _, _, w in column_split(case, tp, 0)) if case.kind != "row" else case.n
        assert layer.quick_size_n == width
        assert layer.qweight.shape[1] * layout.TILE_N == layout.padded_n(width)


@pytest.mark.parametrize("tp", TP_SIZES, ids=lambda tp: f"tp{tp}")
@pytest.mark.parametrize("case", UNALIGNED_CASES, ids=str)
def test_quick_format_rank_width_not_whole_tiles_is_refused(fake_tp, case, tp):
    quantized, biases = make_checkpoint(case, 64)
    build_rank(fake_tp, case, "quick", 64, quantized, biases, 0, 1)  # valid unsharded
    widths = [width for _, _, width in column_split(case, tp, 0)]
    expected = rf"{re.escape(repr(case.prefix))}.*output sizes per partition {re.escape(str(widths))}.*multiple of 64"
    with fake_tp(0, tp), pytest.raises(ValueError, match=expected) as err:
        build(case, "quick", 64)
    assert "tensor-parallel" in str(err.value) and "AWQ form" in str(err.value)


# ----------------------------------------------------------------------------------------------
# row-parallel inputs that split a group, or a 16-row tile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "k, group_size, tp, per_rank",
    [(384, 128, 2, 192), (768, 128, 4, 192), (384, 64, 4, 96), (480, 32, 4, 120)],
    ids=["k384-g128-tp2", "k768-g128-tp4", "k384-g64-tp4", "k480-g32-tp4"],
)
def test_group_straddling_two_ranks_is_refused(fake_tp, fmt, k, group_size, tp, per_rank):
    case = row(k, 128)
    with fake_tp(0, 1):
        build(case, fmt, group_size)  # the same layer is fine unsharded
    expected = (rf"'model\.layers\.0\.mlp\.down_proj'.*group_size {group_size} does not divide "
                rf"its input size per partition {per_rank} \(input size {k}\).*straddle")
    for rank in range(tp):  # every rank refuses, not only rank 0
        with fake_tp(rank, tp), pytest.raises(ValueError, match=expected):
            build(case, fmt, group_size)


@pytest.mark.parametrize("fmt", FORMATS)
def test_per_channel_rank_input_not_whole_tiles_is_refused(fake_tp, fmt):
    """Per-channel has no group to straddle, but a rank's input must still be 16-row tiles."""
    case = row(480, 128)
    with fake_tp(0, 2):
        build(case, fmt, -1)  # 240 rows per rank: fine
    with fake_tp(0, 4), pytest.raises(
        ValueError, match=r"'model\.layers\.0\.mlp\.down_proj'.*input size per partition 120 is not a multiple of 16"
    ):
        build(case, fmt, -1)
