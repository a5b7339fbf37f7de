"""The interleaved layout: round trips, the documented fragment mapping, and agreement between the
Python description (vllm_quick/layout.py) and the CUDA one (csrc/quick_layout.cuh).

The CUDA header is compiled on the host with g++ (its index functions are plain C++ there) into a
probe that prints every table; the test compares them with the Python tables. The kernel
translation units are compiled with nvcc when it is installed (CI has it), so a kernel that does
not compile fails the test suite even on machines without a GPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _host_probe import run_host_probe

from vllm_quick import layout

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_awq_to_quick_round_trip(group, seed):
    g = torch.Generator().manual_seed(seed)
    k = 16 * int(torch.randint(2, 24, (1,), generator=g)) * (2 if group == 32 else 1)
    k = k if group == -1 else -(-k // group) * group
    n = 8 * int(torch.randint(1, 40, (1,), generator=g))  # any multiple of 8: padded to 64
    gs = k if group == -1 else group
    codes = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=g)
    zeros = torch.randint(0, 16, (k // gs, n), dtype=torch.int32, generator=g)
    scales = torch.rand(k // gs, n, generator=g).half()
    qw, qz, sc = layout.awq_to_quick(layout.awq_pack(codes), layout.awq_pack(zeros), scales)
    n_pad = layout.padded_n(n)
    assert qw.shape == (k // 16, n_pad // 64, 128) and qz.shape == (k // gs, n_pad // 8)
    c2, z2, s2 = layout.quick_to_codes(qw, qz, sc)
    assert torch.equal(c2[:, :n], codes) and torch.equal(z2[:, :n], zeros)
    assert torch.equal(s2[:, :n], scales)
    assert torch.all(s2[:, n:] == 0), "padding columns must have zero scale"
    assert torch.equal(layout.awq_unpack(layout.awq_pack(codes)), codes)


def test_worked_example_from_the_docstring():
    """Lane 5, word 0 of tile (0, 0) holds exactly the elements the layout docstring lists."""
    codes = torch.randint(0, 16, (16, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    word = int(layout.interleave_weight(codes)[0, 0, 5 * 4 + 0])
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    expected = [(2, 1), (10, 1), (2, 9), (10, 9), (3, 1), (11, 1), (3, 9), (11, 9)]
    assert nibbles == [int(codes[k, n]) for k, n in expected]


def test_weight_nibbles_are_mma_b_fragments():
    """Pair m = nibbles (m, m+4) of word j of lane t is (b0, b1) or (b2, b3) of n8 block 2j + m//2:
    rows 2(t%4) + {0,1} (+8 for odd m), column t//4 (PTX mma.m16n8k16 B fragment)."""
    src = layout.weight_tile_source().view(32, 4, 8)
    for t in range(32):
        for j in range(4):
            for m in range(4):
                lo, hi = int(src[t, j, m]), int(src[t, j, m + 4])
                block = 2 * j + m // 2
                k0 = 2 * (t % 4) + 8 * (m % 2)
                assert divmod(lo, 64) == (k0, 8 * block + t // 4)
                assert divmod(hi, 64) == (k0 + 1, 8 * block + t // 4)


def test_scales_follow_the_accumulator_fragment():
    """Lane t's half2 number nb (positions 16(t%4) + 2nb + {0,1}) holds the scales of its two
    accumulator columns 8nb + 2(t%4) + {0,1}."""
    src = layout.scale_tile_source()
    for t in range(4):
        for nb in range(8):
            assert [int(src[16 * t + 2 * nb + e]) for e in range(2)] == [8 * nb + 2 * t + e for e in range(2)]


def test_scaled_tiles_find_their_b_column_scales():
    """The scaled tiles' reading (load_fragment_scales in csrc/quick_fragments.cuh): lane t takes half
    (t//4) % 2 of word nb of the 32 bytes at 16 * ((t//4) // 2) and must get the scale of its B
    fragment column 8nb + t//4."""
    src = layout.scale_tile_source()
    for t in range(32):
        g = t // 4
        for nb in range(8):
            position = 16 * (g // 2) + 2 * nb + g % 2
            assert int(src[position]) == 8 * nb + g


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="K % 16"):
        layout.check_shape(40, 64, 8)
    with pytest.raises(ValueError, match="N % 64"):
        layout.check_shape(64, 72, 64)
    with pytest.raises(ValueError, match="group size"):
        layout.check_shape(128, 64, 48)
    with pytest.raises(ValueError, match="AWQ shapes disagree"):
        layout.awq_to_quick(torch.zeros(64, 8, dtype=torch.int32), torch.zeros(1, 4, dtype=torch.int32),
                            torch.zeros(1, 64, dtype=torch.float16))


PROBE = r"""
#include <cstdio>
#include "quick_layout.cuh"
int main() {
  using namespace quick;
  std::printf("version %d %d %d %d\n", kLayoutVersion, kTileK, kTileN, kWordsPerTile);
  for (int t = 0; t < 32; ++t)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 8; ++i)
        std::printf("w %d\n", weight_nibble_k(t, i) * kTileN + weight_nibble_n(t, j, i));
  for (int p = 0; p < kTileN; ++p) std::printf("s %d\n", scale_column(p));
  for (int i = 0; i < 8; ++i) std::printf("z %d\n", zero_nibble_block(i));
  return 0;
}
"""


@pytest.fixture(scope="module")
def cuda_layout_tables(tmp_path_factory):
    out = run_host_probe(PROBE, tmp_path_factory.mktemp("probe"))
    tables: dict[str, list[int]] = {"w": [], "s": [], "z": []}
    header = None
    for line in out.splitlines():
        key, *vals = line.split()
        if key == "version":
            header = [int(v) for v in vals]
        else:
            tables[key].append(int(vals[0]))
    return header, tables


def test_cuda_header_agrees_with_python(cuda_layout_tables):
    header, tables = cuda_layout_tables
    assert header == [layout.LAYOUT_VERSION, layout.TILE_K, layout.TILE_N, layout.WORDS_PER_TILE]
    assert tables["w"] == layout.weight_tile_source().tolist()
    assert tables["s"] == layout.scale_tile_source().tolist()
    assert tables["z"] == list(layout.ZERO_NIBBLE_BLOCK)


def _find_nvcc() -> str | None:
    """nvcc on PATH, else the usual toolkit location, else None (the compile tests skip)."""
    default = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.exists() else None)


@pytest.mark.parametrize("source", ["quick_gemm.cu", "quick_dequant.cu", "quick_act_scale.cu"])
def test_kernel_compiles_with_nvcc(source, tmp_path):
    """Compile the kernel translation units (no torch headers) for sm_80 and sm_90a (as setup.py
    does: the wgmma tiles need sm_90a); fail on a compile error, on register spills in the GEMM
    kernel, or when ptxas serialises the wgmma pipeline (it says so in a warning)."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    cmd = [nvcc, "-c", str(CSRC / source), "-o", str(tmp_path / "k.o"), "-std=c++20", "-O3",
           "--expt-relaxed-constexpr", "-Xptxas", "-v",
           # torch's CUDAExtension compiles with these (no implicit half <-> float conversions)
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    spills = [line for line in result.stderr.splitlines() if "spill" in line and not line.strip().startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")]
    assert not spills, "register spills:\n" + "\n".join(spills)
    serialised = [line for line in result.stderr.splitlines() if "wgmma" in line and "serialized" in line]
    assert not serialised, "ptxas serialised wgmma:\n" + "\n".join(serialised)


def test_binding_compiles_against_torch_headers(tmp_path):
    """csrc/quick_ops.cpp (the torch binding) compiles as C++20 against this torch's headers.
    A CPU torch wheel lacks one generated CUDA header (c10/cuda/impl/cuda_cmake_macros.h, only
    macros the binding does not use): an empty stand-in takes its place, CUDA's own headers come
    from the CUDA toolkit. Catches binding compile errors in CI, which has no CUDA torch."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    nvcc = _find_nvcc()
    cxx = shutil.which("g++")
    if nvcc is None or cxx is None:
        pytest.skip("needs g++ and the CUDA toolkit")
    cuda_include = next((p for p in (Path(nvcc).resolve().parent.parent / "include",
                                     *sorted(Path("/usr/local").glob("cuda*/include")))
                         if (p / "cuda_runtime_api.h").exists()), None)
    if cuda_include is None:
        pytest.skip("CUDA runtime headers not found")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [cxx, "-fsyntax-only", "-std=c++20", f"-I{tmp_path / 'stub'}",
           *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
           f"-I{cuda_include}", f"-I{CSRC}", "-DTORCH_EXTENSION_NAME=_C", str(CSRC / "quick_ops.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_binding_formats_messages_without_iostreams():
    """The binding builds its error messages from strings and std::to_string only: formatting an
    integer through std::ostream (c10::str, TORCH_CHECK) crashed the process on the H100 image
    (csrc/quick_ops.cpp, at ``append``, says why)."""
    code = re.sub(r"//[^\n]*", "", (CSRC / "quick_ops.cpp").read_text())
    for token in ("c10::str(", "TORCH_CHECK", "TORCH_INTERNAL_ASSERT", "ostream", "stringstream",
                  "std::cout", "std::cerr"):
        assert token not in code, f"csrc/quick_ops.cpp uses {token}"


def _cuda_constant(name: str) -> int:
    m = re.search(rf"constexpr uint32_t {name} = (0x[0-9A-Fa-f]+)u;", (CSRC / "quick_fragments.cuh").read_text())
    assert m, f"{name} not found in csrc/quick_fragments.cuh"
    return int(m.group(1), 16)


def test_sixteen_x_magic_gives_q_minus_z():
    """The lean tiles' arithmetic (csrc/quick_fragments.cuh, "16x magic"), emulated in fp16 with the
    kernel's own constants: 0x6400 | q << 4 is 1024 + 16 q, 0xD400 | z << 4 is -(64 + z), and one
    fused multiply-add by 1/16 gives q - z exactly, for every q and z."""
    import numpy as np

    sixteenth = np.array([_cuda_constant("kSixteenthPair") & 0xFFFF], dtype=np.uint16).view(np.float16)[0]
    neg64 = _cuda_constant("kNegSixtyFourPair") & 0xFFFF
    assert _cuda_constant("kSixteenthPair") >> 16 == _cuda_constant("kSixteenthPair") & 0xFFFF
    assert float(sixteenth) == 1 / 16
    for q in range(16):
        v = np.array([0x6400 | q << 4], dtype=np.uint16).view(np.float16)[0]
        assert float(v) == 1024 + 16 * q
        for z in range(16):
            nz = np.array([neg64 | z << 4], dtype=np.uint16).view(np.float16)[0]
            assert float(nz) == -(64 + z)
            fused = np.float16(float(v) * float(sixteenth) + float(nz))  # one rounding, as HFMA2
            assert float(fused) == q - z


def test_sixteen_x_magic_masks_pick_the_documented_nibbles():
    """Word side: pairs 1 and 3 read with mask 0x00f000f0 from the word and from the word >> 8
    hold the same nibbles (times 16) as the plain path's (w >> 4 m) & 0x000f000f; zero side:
    unpack_neg_zeros16's moves put nibble pair m of the zero word at bits 4-7 / 20-23."""
    gen = torch.Generator().manual_seed(5)
    words = torch.randint(0, 2**32, (2000,), generator=gen, dtype=torch.int64).tolist()
    for w in words:
        for m in range(4):
            plain = (w >> (4 * m)) & 0x000F000F
            src = w if m < 2 else w >> 8
            lean = (src & 0x00F000F0) >> 4 if m % 2 else src & 0x000F000F
            assert lean == plain
            moved = (w << 4) & 0xFFFFFFFF if m == 0 else w >> (4 * m - 4)
            assert (moved & 0x00F000F0) >> 4 == plain


def test_tile_names_match_the_benchmark_list():
    """csrc/quick_gemm.cu's tile names (vllm_quick._C.TILES, by index) are the list the benchmarks
    and GPU tests iterate over, in the same order."""
    from benchmarks.vllm_kernels import KERNEL_TILES

    m = re.search(r"kNames\[kTileCount\] = \{([^}]*)\}", (CSRC / "quick_gemm.cu").read_text())
    assert m
    assert tuple(re.findall(r'"(\w+)"', m.group(1))) == KERNEL_TILES
