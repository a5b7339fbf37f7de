"""The power of two that moves bf16 activations into fp16 for the ws tiles
(csrc/quick_act_scale.cuh), checked on the host for every bf16 value: the CUDA header is
compiled with g++ (its shift helpers are host code too) and each result is compared with what
the rule promises and with the Python scaling of the cuBLAS paths (ops.fp16_product_for_bf16)."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from _host_probe import run_host_probe

from vllm_quick import ops

PROBE = r"""
#include <cstdio>
#include "quick_act_scale.cuh"
int main() {
  for (unsigned b = 0; b < 0x8000u; ++b) std::printf("%u %d\n", b, quick::fp16_shift_of_bf16(b));
  for (int e = -quick::kMaxFp16Shift; e <= quick::kMaxFp16Shift; ++e) std::printf("p %d %u\n", e, quick::pow2_bits(e));
  return 0;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = run_host_probe(PROBE, tmp_path_factory.mktemp("act_scale"))
    shifts, pow2 = {}, {}
    for line in out.splitlines():
        parts = line.split()
        if parts[0] == "p":
            pow2[int(parts[1])] = int(parts[2])
        else:
            shifts[int(parts[0])] = int(parts[1])
    return shifts, pow2


def bf16_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def test_shift_puts_every_max_in_range(probe):
    """max|x| * 2^e lands in [2^14, 2^15) for every finite bf16 maximum down to 2^-98 (below that
    the shift stops at 2^113 and the product stays below 2^15); 0, inf and NaN give 0."""
    shifts, _ = probe
    assert len(shifts) == 0x8000
    for bits, e in shifts.items():
        m = bf16_value(bits)
        if bits == 0 or not math.isfinite(m):
            assert e == 0, (hex(bits), e)
            continue
        scaled = math.ldexp(m, e)
        assert abs(e) <= 113, (hex(bits), e)
        if e < 113:
            assert 2.0**14 <= scaled < 2.0**15, (hex(bits), m, e, scaled)
        else:
            assert scaled < 2.0**15, (hex(bits), m, e, scaled)


def test_shift_agrees_with_the_python_scaling(probe):
    """ops.fp16_product_for_bf16 (the cuBLAS paths) picks FP16_TOP_EXPONENT - frexp exponent of
    its bound; with the bound equal to max|x| the header must pick the same power of two."""
    shifts, _ = probe
    for bits in range(0x0080, 0x7f80, 7):  # normal bf16 values, a sample across every exponent
        m = bf16_value(bits)
        expected = ops.FP16_TOP_EXPONENT - math.frexp(m)[1]
        assert shifts[bits] == min(expected, 113), (hex(bits), shifts[bits], expected)


def test_pow2_bits_are_exact_powers_of_two(probe):
    _, pow2 = probe
    for e, bits in pow2.items():
        assert struct.unpack("<f", struct.pack("<I", bits))[0] == 2.0**e, e


def test_scaled_activations_are_exact_in_fp16(probe):
    """Every bf16 x with |x| <= max|x| becomes x * 2^e in fp16 without rounding while x * 2^e is
    an fp16 normal number: one random batch per decade of max|x|, compared in fp64."""
    shifts, _ = probe
    gen = torch.Generator().manual_seed(0)
    for exponent in range(-90, 100, 9):
        x = (torch.randn(4096, generator=gen, dtype=torch.float64) * 2.0**exponent).to(torch.bfloat16)
        bits = int(x.abs().max().view(torch.int16).item()) & 0x7fff
        e = shifts[bits]
        scaled = x.double() * 2.0**e
        x16 = scaled.to(torch.float16)
        normal = scaled.abs() >= 2.0**-14
        assert torch.equal(x16.double()[normal], scaled[normal]), exponent
        assert bool(torch.isfinite(x16).all()), exponent
