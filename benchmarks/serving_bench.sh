#!/usr/bin/env bash
# The serving comparison of issue 5 on one GPU (written for an H100 with the vLLM 0.26 bundle of
# ../shared/devbundle in /tmp/site): a Llama-3-8B-shaped model with random weights, served by each
# of quick, awq (Machete), awq_marlin, awq_legacy (vLLM's old AutoAWQ GEMM path) and fp16 with
# identical settings (serving_configs/llama3_8b_<server>.yaml), one server after another, each
# measured with the locust load test at concurrency 16 / 64 / 256, 4 x concurrency requests of
# 512 random prompt tokens and exactly 128 output tokens; plus, on the quick server, one
# `vllm bench serve` cross-check at concurrency 64 and a soak step of 2,000 requests at
# concurrency 256 (issue 5: nothing lost under load).
#
#   bash benchmarks/serving_bench.sh [SERVER ...]    # default: quick awq awq_marlin awq_legacy fp16
#
# One server takes about 3-4 minutes (start with torch.compile + CUDA graphs ~1.5 min, the three
# steps 1-2 min, awq_legacy the slowest; quick 1.5 min more for its cross-check and soak): all
# five do not fit one 10-minute device command, so name one or two per call (README.md, "Serving
# benchmark on the GPU", gives the exact calls). Before
# each server the script checks the time left (SERVING_BENCH_DEADLINE_S, default 520 s from its
# start) and skips servers that would not finish, saying how to run them later.
#
# What it does, in order:
#   1. environment: PYTHONPATH gets the repository, /tmp/loadsite and /tmp/site;
#      VLLM_USE_FLASHINFER_SAMPLER=0 (FlashInfer is not in the bundle);
#   2. locust: if it does not import, installs the wheels carried in .whl/load (written here by
#      benchmarks/load_wheels.sh) into /tmp/loadsite;
#   3. the `quick` plugin: if no `vllm.general_plugins` entry point `quick` is installed (an
#      in-place build installs none), a metadata-only one is written to $WORK/plugin (no pip);
#   4. the QUICK kernel, if quick is among the servers and vllm_quick._C does not import:
#      `bash benchmarks/device_run.sh build` (a no-op when built already);
#   5. the model folders: python -m benchmarks.serving_models $WORK/models;
#   6. per server: python -m load_tests.run_load --serve serving_configs/llama3_8b_<server>.yaml
#      (which starts `vllm serve`, warms up, sweeps, stops the server), results in $WORK/parts;
#   7. merges the servers of this call into $OUT/<stem>.{json,meta.json,md,png} and tars the
#      per-step files (locust CSVs, per-request records, server logs, vllm bench output) into
#      $OUT/<stem>_logs.tar.gz; the console goes to $OUT/serving_bench.log. Six files at most.
#
# <stem> is serving_<gpu> (serving_h100) when all five servers ran in this call, else
# serving_<gpu>_<servers>; combine the calls afterwards (any machine, no GPU):
#   python -m load_tests.run_load --merge A.json B.json C.json --out-dir benchmarks/results --stem serving_h100
#
# Tensor parallelism (issue 6): TENSOR_PARALLEL_SIZE=2 starts every server on two GPUs
# (`--tensor-parallel-size 2`) and adds _tp2 to the stem, e.g. on nvidia-h100-x2:
#   TENSOR_PARALLEL_SIZE=2 CONCURRENCY=64,256 CROSSCHECK= SOAK= bash benchmarks/serving_bench.sh quick awq_marlin
# NVLink multicast stays off for every server (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
# NVSHMEM_DISABLE_NVLS=1, and VLLM_ALLREDUCE_USE_SYMM_MEM=0: vLLM's symmetric-memory all-reduce
# would use multicast on Hopper): these GPUs share their NVLink fabric with other machines.
#
# Environment: OUT (default benchmarks/results/serving_run), PYTHON (python3), CONCURRENCY
# (16,64,256), REQUESTS_PER_USER (4), CROSSCHECK (quick:64; empty: none), SOAK (quick:2000:256;
# empty: none), STEP_TIMEOUT (240 s per
# step), STARTUP_TIMEOUT (420 s per server), SERVING_BENCH_DEADLINE_S (520), SERVING_BENCH_WORK
# (/tmp/serving_bench), SERVING_BENCH_DRY_RUN=1 (print the run_load commands, run nothing).
# Marlin: llama3_8b_awq_marlin.yaml sets VLLM_DISABLED_KERNELS=CutlassW4A8LinearKernel,
# MacheteLinearKernel,AllSparkLinearKernel for that server (vLLM 0.26 picks Machete otherwise).
# Every server runs with VLLM_DISABLE_COMPILE_CACHE=1 (awq and awq_marlin share vLLM's cache key).

set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
ALL_SERVERS=(quick awq awq_marlin awq_legacy fp16)
SERVERS=("$@")
[ ${#SERVERS[@]} -eq 0 ] && SERVERS=("${ALL_SERVERS[@]}")
for s in "${SERVERS[@]}"; do
  [ -f "serving_configs/llama3_8b_$s.yaml" ] || { echo "serving_bench: unknown server '$s' (known: ${ALL_SERVERS[*]})" >&2; exit 2; }
done

OUT="${OUT:-$REPO/benchmarks/results/serving_run}"
PY="${PYTHON:-python3}"
WORK="${SERVING_BENCH_WORK:-/tmp/serving_bench}"
DEADLINE_S="${SERVING_BENCH_DEADLINE_S:-520}"
CONCURRENCY="${CONCURRENCY:-16,64,256}"
TP="${TENSOR_PARALLEL_SIZE:-1}"
REQUESTS_PER_USER="${REQUESTS_PER_USER:-4}"
CROSSCHECK="${CROSSCHECK-quick:64}"
SOAK="${SOAK-quick:2000:256}"
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-420}"
DRY_RUN="${SERVING_BENCH_DRY_RUN:-0}"
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
remaining() { echo $((DEADLINE_S - $(elapsed))); }
# Seconds one server needs (start + warm-up + 3 steps + stop), from the bundle's measurements
# (server start ~1.5 min; awq_legacy is 2-6x slower per token), plus the cross-check and soak.
estimate() {
  local t
  case "$1" in awq_legacy) t=270 ;; *) t=210 ;; esac
  if [ -n "$CROSSCHECK" ] && [ "${CROSSCHECK%%:*}" = "$1" ]; then t=$((t + 40)); fi
  if [ -n "$SOAK" ] && [ "${SOAK%%:*}" = "$1" ]; then t=$((t + 70)); fi
  echo "$t"
}

run_load_cmd() {  # the run_load command line for one server
  local s=$1 cmd
  cmd=("$PY" -m load_tests.run_load --serve "serving_configs/llama3_8b_$s.yaml" --models-dir "$WORK/models"
       --concurrency "$CONCURRENCY" --requests-per-user "$REQUESTS_PER_USER" --prompt-tokens 512
       --output-tokens 128 --token-ids 0:128000 --step-timeout "$STEP_TIMEOUT" --startup-timeout "$STARTUP_TIMEOUT"
       --tensor-parallel-size "$TP" --out-dir "$WORK/parts" --stem "${STEM}__$s" --command-label "$LABEL")
  if [ -n "$CROSSCHECK" ] && [ "${CROSSCHECK%%:*}" = "$s" ]; then cmd+=(--crosscheck "$CROSSCHECK"); fi
  if [ -n "$SOAK" ] && [ "${SOAK%%:*}" = "$s" ]; then cmd+=(--soak "$SOAK"); fi
  printf '%q ' "${cmd[@]}"
}

LABEL="bash benchmarks/serving_bench.sh ${SERVERS[*]}"
[ "$TP" != 1 ] && LABEL="TENSOR_PARALLEL_SIZE=$TP $LABEL"

if [ "$DRY_RUN" = 1 ]; then
  STEM="serving_gpu"
  for s in "${SERVERS[@]}"; do echo "$(run_load_cmd "$s")"; done
  exit 0
fi

mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/serving_bench.log") 2>&1
echo "=== serving_bench: servers ${SERVERS[*]} (tensor parallel $TP); concurrency $CONCURRENCY, $REQUESTS_PER_USER x concurrency requests; deadline ${DEADLINE_S}s"

# 1. environment -----------------------------------------------------------------------------
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/site ] && [[ ":$PYTHONPATH:" != *":/tmp/site:"* ]] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
export VLLM_USE_FLASHINFER_SAMPLER="${VLLM_USE_FLASHINFER_SAMPLER:-0}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0

# 2. locust ----------------------------------------------------------------------------------
if [ -d /tmp/loadsite ]; then export PYTHONPATH="$REPO:/tmp/loadsite:${PYTHONPATH#"$REPO:"}"; fi
if ! "$PY" -c "import locust" 2>/dev/null; then
  if ls .whl/load/*.whl >/dev/null 2>&1; then
    echo "[$(elapsed)s] installing locust from .whl/load into /tmp/loadsite"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/loadsite .whl/load/*.whl \
      || { echo "serving_bench: installing the locust wheels failed" >&2; exit 2; }
    export PYTHONPATH="$REPO:/tmp/loadsite:${PYTHONPATH#"$REPO:"}"
  fi
  "$PY" -c "import locust" || { echo "serving_bench: locust does not import; run 'bash benchmarks/load_wheels.sh' where pip works and carry .whl/load" >&2; exit 2; }
fi
"$PY" -c "import vllm, locust, torch; print('[env] vllm', vllm.__version__, '| locust', locust.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())" \
  || { echo "serving_bench: vLLM does not import (install the bundle: ../shared/devbundle/README.md)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null

# 3. the quick plugin's entry point ------------------------------------------------------------
if ! "$PY" -c "from importlib.metadata import entry_points as e; import sys; sys.exit(0 if any(p.name == 'quick' for p in e(group='vllm.general_plugins')) else 1)"; then
  dist="$WORK/plugin/vllm_quick-0.1.0+inplace.dist-info"
  mkdir -p "$dist"
  printf 'Metadata-Version: 2.1\nName: vllm-quick\nVersion: 0.1.0+inplace\n' > "$dist/METADATA"
  printf '[vllm.general_plugins]\nquick = vllm_quick:register\n' > "$dist/entry_points.txt"
  export PYTHONPATH="$WORK/plugin:$PYTHONPATH"
  echo "[$(elapsed)s] no installed 'quick' plugin entry point: using $dist"
fi

# 4. the QUICK kernel --------------------------------------------------------------------------
if [[ " ${SERVERS[*]} " == *" quick "* ]] && ! "$PY" -c "import torch, vllm_quick._C" 2>/dev/null; then
  echo "[$(elapsed)s] building vllm_quick._C (benchmarks/device_run.sh build)"
  OUT="$WORK/device" bash benchmarks/device_run.sh build >/dev/null 2>&1
  "$PY" -c "import torch, vllm_quick._C" || { echo "serving_bench: vllm_quick._C does not build (see $WORK/device/device_run.log)" >&2; exit 2; }
fi

# 5. model folders -----------------------------------------------------------------------------
"$PY" -m benchmarks.serving_models "$WORK/models" || exit 2

TAG=$("$PY" -c "from load_tests.run_load import device_name, device_tag; print(device_tag(device_name()))")
if [ "${SERVERS[*]}" = "${ALL_SERVERS[*]}" ]; then STEM="serving_$TAG"; else STEM="serving_${TAG}_$(IFS=-; echo "${SERVERS[*]}")"; fi
[ "$TP" != 1 ] && STEM="${STEM}_tp$TP"
rm -rf "$WORK/parts" && mkdir -p "$WORK/parts"

# 6. one server after another ------------------------------------------------------------------
declare -a DONE=() FAILED=() SKIPPED=()
for s in "${SERVERS[@]}"; do
  left=$(remaining)
  if [ "$left" -lt "$(estimate "$s")" ]; then
    echo "[$(elapsed)s] skipping $s: ${left}s left, it needs about $(estimate "$s")s"
    SKIPPED+=("$s"); continue
  fi
  echo "[$(elapsed)s] === $s"
  # run_load stops its server on SIGTERM; the hard limit keeps time for step 7.
  eval "timeout --signal=TERM --kill-after=60 $((left - 30)) $(run_load_cmd "$s")"
  rc=$?
  echo "[$(elapsed)s] $s: run_load exit $rc"
  if [ -f "$WORK/parts/${STEM}__$s.json" ]; then DONE+=("$s"); fi
  [ "$rc" -ne 0 ] && FAILED+=("$s(exit $rc)")
done

# 7. results -----------------------------------------------------------------------------------
parts=()
for s in "${DONE[@]}"; do parts+=("$WORK/parts/${STEM}__$s.json"); done
if [ ${#parts[@]} -gt 0 ]; then
  "$PY" -m load_tests.run_load --merge "${parts[@]}" --out-dir "$OUT" --stem "$STEM" --command-label "$LABEL"
fi
tar -C "$WORK" -czf "$OUT/${STEM}_logs.tar.gz" parts 2>/dev/null
ls -la "$OUT"
echo "=== serving_bench done after $(elapsed)s: measured ${DONE[*]:-none}; failed ${FAILED[*]:-none}; skipped ${SKIPPED[*]:-none}"
if [ ${#SKIPPED[@]} -gt 0 ]; then echo "To measure the skipped servers: bash benchmarks/serving_bench.sh ${SKIPPED[*]}"; fi
[ ${#FAILED[@]} -eq 0 ] && [ ${#SKIPPED[@]} -eq 0 ]
