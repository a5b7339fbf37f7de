"""The QUICK interleaved weight layout, and the AWQ format it is made from.

This module is the single description of the layout. The CUDA kernel consumes exactly what is
written here; ``csrc/quick_layout.cuh`` repeats the same constants and formulas (its comments say
"must match vllm_quick/layout.py"), and ``tests/test_layout.py`` checks the two against each other
through a compiled probe. Change one, change both, and bump ``LAYOUT_VERSION``.

Notation: the logical weight is ``W[k, n]`` with ``k < K`` (input features) and ``n < N`` (output
features); ``y = x @ W``. Each element is an unsigned 4-bit code ``q`` in 0..15, dequantised as
``(q - z[g, n]) * s[g, n]`` with ``g = k // group_size``.

AWQ checkpoint format (AutoAWQ "GEMM" version)
----------------------------------------------
* ``qweight`` int32 ``[K, N / 8]``: word ``(k, w)`` packs columns ``8w .. 8w+7`` of row ``k``;
  nibble ``i`` (bits ``4i .. 4i+3``) holds column ``8w + AWQ_PACK_ORDER[i]``.
* ``qzeros`` int32 ``[K / group, N / 8]``: same packing, one row per group.
* ``scales`` fp16 ``[K / group, N]``.

Why interleave
--------------
Tensor cores take B (the weight) as ``mma.sync.m16n8k16`` fragments. For a 16 (k) x 8 (n) block
B, lane ``t`` (0..31) of the warp holds four values (PTX ISA, "Matrix Fragments for mma.m16n8k16"):

    b0, b1: k = 2*(t % 4) + 0, 1       n = t // 4
    b2, b3: k = 2*(t % 4) + 8, 9       n = t // 4

With the AWQ order a thread would have to gather its four nibbles from four different words, so
kernels such as AutoAWQ's dequantise into shared memory and read back with ``ldmatrix`` (the
write-back that QUICK removes, along with its bank conflicts). QUICK reorders the nibbles once, at
load time, so that each lane reads 16 contiguous bytes and dequantises them straight into its own
B-fragment registers: a warp's 512 bytes are one coalesced, conflict-free read.

Interleaved weight (``qweight``, LAYOUT_VERSION 1)
-------------------------------------------------
The matrix is cut into tiles of ``TILE_K x TILE_N = 16 x 64`` (one k-step of mma, eight n8
blocks). Tiles are stored row-major, ``tile(kt, nt)`` at int32 offset ``(kt * N/64 + nt) * 128``,
so the tensor is int32 ``[K / 16, N / 64, 128]``. Inside a tile, lane ``t`` owns words
``4t .. 4t+3`` (16 bytes, one ``ld.128``/``cp.async`` per lane); word ``j`` (0..3) covers n8-blocks
``2j`` and ``2j + 1``; nibble ``i`` (0..7) of word ``j`` holds

    k_local = 2*(t % 4) + (i // 4) + 8*(i % 2)
    n_local = 8*(2j + (i // 2) % 2) + t // 4          (block nb = 2j + (i//2)%2, column t//4 in it)

Why this nibble order: the "magic number" dequantisation ``lop3(w, 0x000f000f, MAGIC)`` turns
nibbles 0 and 4 into the 2-vector ``(MAGIC + nib0, MAGIC + nib4)`` (fp16 MAGIC 0x6400 = 1024.0,
bf16 0x4300 = 128.0: the nibble lands in the low mantissa bits, so the value is exact), and
subtracting ``MAGIC + zero`` leaves the exact integer ``q - z``. Shifting the word right by 4, 8
and 12 repeats this for nibble pairs (1, 5), (2, 6) and (3, 7). So each word becomes four
fragment registers, already in fragment order (pair m = nibbles m and m + 4):

    pair 0 -> block 2j,   (b0, b1)        pair 2 -> block 2j+1, (b0, b1)
    pair 1 -> block 2j,   (b2, b3)        pair 3 -> block 2j+1, (b2, b3)

Worked example, lane t = 5 (t % 4 = 1, t // 4 = 1), word j = 0: nibble 0 is ``W[2, 1]``, nibble 4
``W[3, 1]`` (b0, b1 of block 0), nibble 1 ``W[10, 1]``, nibble 5 ``W[11, 1]`` (b2, b3 of block 0),
nibble 2 ``W[2, 9]``, nibble 6 ``W[3, 9]``, nibble 3 ``W[10, 9]``, nibble 7 ``W[11, 9]`` (block 1).

The exact ("x") kernel tiles put the integers ``q - z`` into the B fragments and apply scales in
fp32 to the group's partial sums (``acc += sum_group * s``). Rounding ``(q - z) * s`` to bf16
before the mma would cost ~1e-3 of relative error on top of the bf16 output rounding (measured
2.3e-3 in all against the 2e-3 budget); with exact integers only the output rounding remains. The
fp16-only scaled ("s") tiles do put ``(q - z) * s`` into the fragments (fp16 rounds it to ~2^-12
relative): same layout, they only read the scales below in the B fragment's column order.

Interleaved scales (``scales``)
-------------------------------
fp16 ``[K / group, N]``. Scales multiply the *accumulator* (mma's C/D fragment), whose lane ``t``
holds columns ``8*nb + 2*(t % 4) + {0, 1}`` of every block ``nb``. So inside each 64-column tile,
position ``p = 16*a + 2*nb + e`` holds column ``8*nb + 2*a + e`` (a = 0..3, nb = 0..7, e = 0..1):
lane ``t`` loads the 32 bytes at ``16*(t % 4)`` and finds, for each block ``nb``, its two
columns' scales as one half2 at index ``nb``. (A scaled tile needs the scale of its B column
``8*nb + t // 4`` = ``8*nb + 2*a + e`` with ``a = (t // 4) // 2``, ``e = (t // 4) % 2``: the 32
bytes at ``16*a``, half ``e`` of word ``nb``; ``load_fragment_scales`` in csrc/quick_fragments.cuh.)

Interleaved zeros (``qzeros``)
------------------------------
int32 ``[K / group, N / 8]``; inside each 64-column tile (8 words), word ``r`` holds the zeros of
columns ``8*c + r`` (block ``c``, column ``r`` in it) for ``c = 0..7``, nibble ``i`` holding block
``c = ZERO_NIBBLE_BLOCK[i] = 2*(i % 4) + i // 4``. Lane ``t`` (whose B-fragment column is
``t // 4`` in every block) reads word ``t // 4``; the same magic trick on ``word >> 4m`` gives
``(MAGIC + z[block 2m], MAGIC + z[block 2m + 1])`` for m = 0..3, i.e. the zeros of the two
blocks that weight word ``j = m`` feeds.

Shapes the layout accepts: ``K % 16 == 0``, ``N % 64 == 0`` (callers pad N, see ``pad_columns``),
``group_size`` a multiple of 16 that divides K.
"""

from __future__ import annotations

from functools import cache

import torch

# Bumped whenever anything in the description above changes; pre-interleaved ("quick")
# checkpoints record it and are refused when it differs. Must match QUICK_LAYOUT_VERSION in
# csrc/quick_layout.cuh.
LAYOUT_VERSION = 1

TILE_K = 16  # one mma.m16n8k16 k-step; must match kTileK in csrc/quick_layout.cuh
TILE_N = 64  # eight n8 blocks, 16 bytes of nibbles per lane; must match kTileN
WORDS_PER_TILE = TILE_K * TILE_N // 8  # 128 int32 words = 32 lanes x 16 bytes
PACK = 8  # int4 values per int32

# AWQ: nibble i of a packed word holds column AWQ_PACK_ORDER[i] of its group of 8.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Interleaved zeros: nibble i of a zero word holds n8-block ZERO_NIBBLE_BLOCK[i].
ZERO_NIBBLE_BLOCK = tuple(2 * (i % 4) + i // 4 for i in range(8))  # (0, 2, 4, 6, 1, 3, 5, 7)

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# nibble packing
# ----------------------------------------------------------------------------------------------
def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> int32 ``[..., W, 8]``: nibble i of each word at index i (0..15)."""
    _check_int32(packed, "packed")
    return (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """int ``[..., W, 8]`` (each 0..15) -> int32 ``[..., W]``, value i into nibble i."""
    if values.shape[-1] != PACK:
        raise ValueError(f"pack_nibbles needs a last dimension of 8, got {tuple(values.shape)}")
    v = values.to(torch.int64) & 0xF
    words = (v << _SHIFTS.to(v.device, torch.int64)).sum(dim=-1)
    # Back to int32 with two's-complement wrap-around (nibble 7 sets the sign bit).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 ``[R, N/8]`` -> codes int32 ``[R, N]`` in natural column order."""
    nib = unpack_nibbles(packed)  # [R, N/8, 8], nibble order
    inverse = torch.tensor(_inverse(AWQ_PACK_ORDER), device=packed.device)
    return nib[..., inverse].reshape(packed.shape[0], -1)


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[R, N]`` (0..15) -> AWQ-packed int32 ``[R, N/8]``."""
    rows, n = codes.shape
    if n % PACK:
        raise ValueError(f"AWQ packing needs N % 8 == 0, got N={n}")
    grouped = codes.reshape(rows, n // PACK, PACK)
    return pack_nibbles(grouped[..., list(AWQ_PACK_ORDER)])


def _inverse(perm) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


# ----------------------------------------------------------------------------------------------
# the interleave: index tables
# ----------------------------------------------------------------------------------------------
@cache
def weight_tile_source() -> torch.Tensor:
    """For the 1024 nibbles of a tile in storage order (lane, word j, nibble i), the index
    ``k_local * TILE_N + n_local`` of the tile element each one holds (int64 ``[1024]``)."""
    t = torch.arange(32).view(32, 1, 1)
    j = torch.arange(4).view(1, 4, 1)
    i = torch.arange(8).view(1, 1, 8)
    k_local = 2 * (t % 4) + i // 4 + 8 * (i % 2)
    n_local = 8 * (2 * j + (i // 2) % 2) + t // 4
    return (k_local * TILE_N + n_local).reshape(-1)


@cache
def scale_tile_source() -> torch.Tensor:
    """For the 64 positions of a tile's scales in storage order, the column each holds."""
    p = torch.arange(TILE_N)
    a, nb, e = p // 16, (p % 16) // 2, p % 2
    return 8 * nb + 2 * a + e


@cache
def zero_tile_source() -> torch.Tensor:
    """For the 64 nibbles of a tile's zeros in storage order (word r, nibble i), the column."""
    r = torch.arange(8).view(8, 1)
    block = torch.tensor(ZERO_NIBBLE_BLOCK).view(1, 8)
    return (8 * block + r).reshape(-1)


def _check_int32(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")


def check_shape(k: int, n: int, group_size: int) -> None:
    """Raise ValueError unless the layout can hold a K x N matrix with this group size."""
    if k % TILE_K:
        raise ValueError(f"QUICK layout needs K % {TILE_K} == 0, got K={k}")
    if n % TILE_N:
        raise ValueError(f"QUICK layout needs N % {TILE_N} == 0 (pad first), got N={n}")
    if group_size % TILE_K or k % group_size:
        raise ValueError(
            f"QUICK layout needs a group size that is a multiple of {TILE_K} and divides "
            f"K={k}, got group_size={group_size}"
        )


# ----------------------------------------------------------------------------------------------
# codes <-> interleaved
# ----------------------------------------------------------------------------------------------
def interleave_weight(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[K, N]`` (0..15, natural order) -> interleaved int32 ``[K/16, N/64, 128]``."""
    k, n = codes.shape
    check_shape(k, n, TILE_K)
    tiles = codes.reshape(k // TILE_K, TILE_K, n // TILE_N, TILE_N).permute(0, 2, 1, 3)
    tiles = tiles.reshape(k // TILE_K, n // TILE_N, TILE_K * TILE_N)
    nibbles = tiles[..., weight_tile_source().to(codes.device)]  # storage order
    return pack_nibbles(nibbles.reshape(k // TILE_K, n // TILE_N, WORDS_PER_TILE, PACK))


def deinterleave_weight(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave_weight`: int32 ``[K/16, N/64, 128]`` -> codes ``[K, N]``."""
    _check_int32(packed, "qweight")
    if packed.dim() != 3 or packed.shape[2] != WORDS_PER_TILE:
        raise ValueError(f"interleaved qweight must be [K/16, N/64, 128], got {tuple(packed.shape)}")
    kt, nt, _ = packed.shape
    nibbles = unpack_nibbles(packed).reshape(kt, nt, TILE_K * TILE_N)
    tiles = torch.empty_like(nibbles)
    tiles[..., weight_tile_source().to(packed.device)] = nibbles
    tiles = tiles.reshape(kt, nt, TILE_K, TILE_N).permute(0, 2, 1, 3)
    return tiles.reshape(kt * TILE_K, nt * TILE_N)


def interleave_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales ``[G, N]`` -> the same values with each 64-column tile transposed 8 x 8."""
    g, n = scales.shape
    if n % TILE_N:
        raise ValueError(f"QUICK scales need N % {TILE_N} == 0, got N={n}")
    tiles = scales.reshape(g, n // TILE_N, TILE_N)
    return tiles[..., scale_tile_source().to(scales.device)].reshape(g, n).contiguous()


def deinterleave_scales(scales: torch.Tensor) -> torch.Tensor:
    g, n = scales.shape
    tiles = scales.reshape(g, n // TILE_N, TILE_N)
    out = torch.empty_like(tiles)
    out[..., scale_tile_source().to(scales.device)] = tiles
    return out.reshape(g, n)


def interleave_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """Zero codes ``[G, N]`` (0..15) -> interleaved int32 ``[G, N/8]``."""
    g, n = zeros.shape
    if n % TILE_N:
        raise ValueError(f"QUICK zeros need N % {TILE_N} == 0, got N={n}")
    tiles = zeros.reshape(g, n // TILE_N, TILE_N)[..., zero_tile_source().to(zeros.device)]
    return pack_nibbles(tiles.reshape(g, n // TILE_N * 8, PACK))


def deinterleave_zeros(packed: torch.Tensor) -> torch.Tensor:
    _check_int32(packed, "qzeros")
    g, w = packed.shape
    nibbles = unpack_nibbles(packed).reshape(g, w // 8, TILE_N)
    out = torch.empty_like(nibbles)
    out[..., zero_tile_source().to(packed.device)] = nibbles
    return out.reshape(g, w * PACK)


# ----------------------------------------------------------------------------------------------
# whole conversions
# ----------------------------------------------------------------------------------------------
def pad_columns(t: torch.Tensor, n_to: int, value: float = 0) -> torch.Tensor:
    """Pad the last dimension of ``t`` with ``value`` up to ``n_to`` columns."""
    missing = n_to - t.shape[-1]
    if missing < 0:
        raise ValueError(f"cannot pad {t.shape[-1]} columns down to {n_to}")
    if missing == 0:
        return t
    return torch.nn.functional.pad(t, (0, missing), value=value)


def padded_n(n: int) -> int:
    """N rounded up to a whole number of 64-column tiles."""
    return -(-n // TILE_N) * TILE_N


CONVERT_ROWS = 512  # rows of K converted at once by awq_to_quick (a multiple of TILE_K)


def awq_to_quick(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ tensors -> interleaved ``(qweight [K/16, Np/64, 128], qzeros [G, Np/8],
    scales fp16 [G, Np])``; ``Np`` is N padded to a multiple of 64 (padding has zero scale)."""
    k = qweight.shape[0]
    n = qweight.shape[1] * PACK
    g = qzeros.shape[0]
    if scales.shape != (g, n) or qzeros.shape[1] * PACK != n:
        raise ValueError(
            f"AWQ shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)} (expected qzeros [G, {n // PACK}] and scales [G, {n}])"
        )
    n_pad = padded_n(n)
    check_shape(k, n_pad, k // g)
    # Row blocks of the weight are converted one at a time: the int64 temporaries of a whole
    # 8192 x 57344 layer would need several GB at load time; 512 rows keep them to ~1 GB at most.
    qweight_il = torch.cat(
        [
            interleave_weight(pad_columns(awq_unpack(qweight[r : r + CONVERT_ROWS]), n_pad))
            for r in range(0, k, CONVERT_ROWS)
        ]
    )
    zeros = pad_columns(awq_unpack(qzeros), n_pad)
    s = pad_columns(scales.to(torch.float16), n_pad)
    return qweight_il, interleave_zeros(zeros), interleave_scales(s)


def quick_to_codes(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interleaved tensors -> natural-order ``(codes [K, Np], zeros [G, Np], scales [G, Np])``."""
    return deinterleave_weight(qweight), deinterleave_zeros(qzeros), deinterleave_scales(scales)


def dequantize(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    """``(q - z) * s`` for natural-order codes ``[K, N]``, zeros and scales ``[G, N]``; the
    arithmetic is done in fp32 (bf16 scales would lose the precision of fp16 ones)."""
    k, _ = codes.shape
    group = k // zeros.shape[0]
    z = zeros.repeat_interleave(group, dim=0)
    s = scales.to(torch.float32).repeat_interleave(group, dim=0)
    return ((codes - z).to(torch.float32) * s).to(dtype)


def dequantize_quick(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    """Dequantise straight from the interleaved layout: ``[K, Np]`` in ``dtype``."""
    return dequantize(*quick_to_codes(qweight, qzeros, scales), dtype=dtype)
