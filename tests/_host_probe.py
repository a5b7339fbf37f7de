"""Compile a small C++ program against csrc/ headers with the host compiler and return what it
prints: how the CPU tests compare CUDA-side constants and helpers (tests/test_layout.py,
tests/test_act_scale.py) with their Python counterparts without a GPU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def run_host_probe(source: str, workdir: Path) -> str:
    """Build ``source`` (C++17, csrc/ on the include path) in ``workdir``, run it, return stdout;
    skips the calling test where there is no host C++ compiler."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the probe")
    (workdir / "probe.cpp").write_text(source)
    subprocess.run([cxx, "-std=c++17", f"-I{CSRC}", str(workdir / "probe.cpp"), "-o", str(workdir / "probe")],
                   check=True)
    return subprocess.run([str(workdir / "probe")], check=True, capture_output=True, text=True).stdout
