"""benchmarks/devbundle_resplit.sh cuts the vLLM bundle (../shared/devbundle's make.sh output:
p00/, p01/, each with one part, the bundle's install.sh and a manifest) into smaller parts. On a
fake bundle: the new parts put back together are the same archive, the new manifest lists their
checksums, every folder gets install.sh, and a bundle whose parts do not match their manifest is
refused."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "devbundle_resplit.sh"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_bundle(root: Path, archive: bytes, cut: int) -> None:
    parts = [archive[:cut], archive[cut:]]
    manifest = [f"archive_sha256={sha(archive)}", f"archive_bytes={len(archive)}", "parts=2"]
    manifest += [f"part{i:02d}={sha(p)}" for i, p in enumerate(parts)]
    for i, p in enumerate(parts):
        d = root / f"p{i:02d}"
        d.mkdir(parents=True)
        (d / f"part{i:02d}").write_bytes(p)
        (d / "manifest").write_text("\n".join(manifest) + "\n")
        (d / "install.sh").write_text("#!/usr/bin/env bash\necho install\n")


def test_resplit_keeps_the_archive(tmp_path):
    archive = os.urandom(2500)
    fake_bundle(tmp_path, archive, 1700)
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "1000"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    folders = sorted(p for p in tmp_path.glob("q*") if p.is_dir())
    assert [f.name for f in folders] == ["q00", "q01", "q02"]
    pieces = [(f / f"part{f.name[1:]}").read_bytes() for f in folders]
    assert [len(p) for p in pieces] == [1000, 1000, 500]
    assert b"".join(pieces) == archive
    manifest = dict(line.split("=", 1) for line in (folders[0] / "manifest").read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert manifest["archive_sha256"] == sha(archive) and manifest["parts"] == "3"
    assert [manifest[f"part{i:02d}"] for i in range(3)] == [sha(p) for p in pieces]
    for f in folders:
        assert (f / "manifest").read_text() == (folders[0] / "manifest").read_text()
        assert (f / "install.sh").read_text() == (tmp_path / "p00" / "install.sh").read_text()


def test_resplit_refuses_a_damaged_bundle(tmp_path):
    fake_bundle(tmp_path, os.urandom(2000), 900)
    part = tmp_path / "p01" / "part01"
    damaged = bytearray(part.read_bytes())
    damaged[-1] ^= 0xFF  # one bit pattern changed, whatever the byte was
    part.write_bytes(bytes(damaged))
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "does not match" in r.stderr
    assert not list(tmp_path.glob("q*"))
