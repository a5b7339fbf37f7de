#!/usr/bin/env bash
# The GPU-side run: build the extension, GPU tests, compute-sanitizer, ncu, kernel benchmark.
#
#   bash benchmarks/device_run.sh [STEP ...]
#
# Steps (run in the order given; default: env build tests memcheck ncu bench):
#   env       GPU, driver, torch/vLLM versions, which tools are there
#   build     build vllm_quick._C in place (skipped when setup.py + csrc/ are unchanged and it imports)
#   tests     pytest -m gpu tests/test_gpu_kernel.py (+ tests/test_ops_reference.py)
#   memcheck  compute-sanitizer memcheck over benchmarks/memcheck_cases.py, racecheck on 3 cases
#   ncu       Nsight Compute of the QUICK kernel, the op (which may take its dequant path at M=128),
#             awq_gemm, marlin and machete at 4096x12288 g128 fp16, M=16 and M=128
#   bench     benchmarks/kernel_bench.py, full sweep, with the time that is left
#   ncustall  Nsight Compute stall reasons (WarpStateStats, SchedulerStats) of tiles x16 / s64 / s128
#             at 4096x12288 fp16, M = 1, 16, 64, 256 (ncu_stall.ncu-rep, ncu_stall.txt; NCU_STALL_BACKENDS,
#             NCU_STALL_M and NCU_STALL_SECTIONS (extra --section arguments) override)
#   ncusource per-SASS-instruction stall samples (SourceCounters) of NCU_SOURCE_RUNS (backend@M or
#             backend@M@KxN, fp16 g128, 4096x12288 unless named: quick_ws256@1024 quick_s16m@1
#             quick_s16m@16): ncu_source.txt + gzipped source-page CSVs
#   tiles     sweep of every kernel tile, dequant, the op, cuBLAS, awq_gemm, Marlin, Machete on the 12
#             shapes, M = 1..512 (kernel_<gpu>_tiles.json/.md; TILE_BACKENDS, TILE_M, TILE_DTYPES
#             (float16) and TILE_TARGET_MS override), then benchmarks/dispatch_table.py:
#             the suggested plan goes to dispatch_plan.txt in $OUT and /tmp/quick_dispatch_plan.txt
#             (export VLLM_QUICK_DISPATCH_PLAN=$(cat /tmp/quick_dispatch_plan.txt) to serve with it)
#   smoke     benchmarks/kernel_bench.py --smoke (one small case per backend)
#   gpuserve  tests/test_gpu_serving.py: demo-model servers, graphs == eager == reference (needs vLLM)
#   gputp     tests/test_gpu_tensor_parallel.py: demo model at TP = 2 == TP = 1 (needs vLLM, 2 GPUs)
#
# Every step is guarded: a failing step is reported and the next one runs. The whole run keeps to
# DEVICE_RUN_DEADLINE_S seconds (default 540); a step that would start with too little time left
# is skipped, and the bench gets what remains (it stops itself and lists what it skipped).
# Output goes to $OUT (default benchmarks/results/device): device_run.log (everything, sanitizer
# output included), gpu_tests.log, ncu_report.ncu-rep, ncu_raw.csv, kernel_<gpu>.json/.md (and
# kernel_<gpu>_smoke.json/.md): at most 8 files, what the device tool hands back.
# Environment: PYTHON (python3), BENCH_ARGS (extra kernel_bench.py arguments), NCU_BACKENDS
# (quick_kernel,quick,awq_gemm,marlin,machete), QUICK_CUDA_ARCH_LIST (90), MAX_JOBS (16), PYTEST_ARGS.

set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT="${OUT:-$REPO/benchmarks/results/device}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEADLINE_S="${DEVICE_RUN_DEADLINE_S:-540}"
START=$(date +%s)
exec > >(tee -a "$OUT/device_run.log") 2>&1

export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -d /tmp/site ] && [[ ":$PYTHONPATH:" != *":/tmp/site:"* ]]; then
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
export VLLM_USE_FLASHINFER_SAMPLER="${VLLM_USE_FLASHINFER_SAMPLER:-0}"
export QUICK_CUDA_ARCH_LIST="${QUICK_CUDA_ARCH_LIST:-90}"
export MAX_JOBS="${MAX_JOBS:-16}"
export REPO OUT PY START DEADLINE_S

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env build tests memcheck ncu bench)
declare -a SUMMARY=()
FAILED=0

elapsed() { echo $(($(date +%s) - START)); }
remaining() { echo $((DEADLINE_S - $(elapsed))); }
banner() { echo; echo "=== [$(elapsed)s] $* ==="; }

# find_tool NAME: PATH, then the usual CUDA / Nsight install folders
find_tool() {
  local name=$1 cand
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  for cand in /usr/local/cuda/bin/"$name" /usr/local/cuda-*/bin/"$name" \
              /usr/local/cuda/compute-sanitizer/"$name" /usr/local/cuda-*/compute-sanitizer/"$name" \
              /opt/nvidia/nsight-compute/*/"$name" /usr/local/NVIDIA-Nsight-Compute*/"$name"; do
    if [ -x "$cand" ]; then echo "$cand"; return 0; fi
  done
  return 1
}
export -f find_tool elapsed remaining

# ---------------------------------------------------------------------------------------------
step_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv 2>&1 || echo "nvidia-smi failed"
  "$PY" - <<'EOF'
import importlib.util, sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "sm_%d%d" % torch.cuda.get_device_capability(0),
          p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB",
          "L2", getattr(p, "L2_cache_size", 0) // 2**20, "MiB")
try:
    import vllm
    print("vllm", vllm.__version__, vllm.__file__)
except Exception as e:
    print("vllm: does not import:", type(e).__name__, e)
for mod in ("humming", "pytest", "vllm_quick._C"):
    try:
        found = importlib.util.find_spec(mod) is not None
    except Exception as e:
        found = f"error {e}"
    print(f"module {mod}: {found}")
EOF
  for t in nvcc ncu compute-sanitizer; do echo "$t: $(find_tool $t || echo 'not found')"; done
  "$(find_tool nvcc || echo nvcc)" --version 2>/dev/null | tail -n 2
  return 0
}

step_build() {
  local hash stamp=build/.quick_build_hash
  hash=$(cat setup.py pyproject.toml csrc/* 2>/dev/null | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ] && "$PY" -c "import torch, vllm_quick._C" 2>/dev/null; then
    echo "build: vllm_quick._C is up to date (sources hash $hash)"
    return 0
  fi
  echo "build: QUICK_CUDA_ARCH_LIST=$QUICK_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  if ! "$PY" setup.py build_ext --inplace; then
    echo "build: setup.py build_ext --inplace failed; trying pip install --no-build-isolation --no-deps -e ."
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
  fi
  # Register the package (and its vllm.general_plugins entry point) so that `vllm serve` child
  # processes find the quick method; the extension built above is reused (QUICK_SKIP_CUDA=1).
  QUICK_SKIP_CUDA=1 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . \
    || echo "build: editable install failed: vllm serve will not find the quick plugin"
  if "$PY" -c "import torch, vllm_quick._C as c; print('built', c.__file__)"; then
    # Session 3 found ~300 libstdc++ stream/locale symbols defined inside _C.so on the device
    # image (its g++ seems to link libstdc++ statically): iostream formatting in the extension
    # then crashes (csrc/quick_ops.cpp, append). Say so whenever a build has them.
    local so copies
    so=$(ls vllm_quick/_C*.so 2>/dev/null | head -n 1)
    if [ -n "$so" ] && command -v nm >/dev/null; then
      copies=$(nm -C --defined-only "$so" 2>/dev/null | grep -c "std::locale::" || true)
      echo "build: $copies std::locale symbols defined inside $so (more than 0: libstdc++ is linked into the extension; iostreams there would crash)"
    fi
    mkdir -p build && echo "$hash" >"$stamp"
    return 0
  fi
  echo "build: finished but vllm_quick._C does not import"
  return 1
}

step_tests() {
  set -o pipefail
  local rc1 rc2 extra=""
  if ! "$PY" -c "import torch, vllm_quick._C" 2>/dev/null; then
    echo "tests: vllm_quick._C does not import; the GPU tests will fail (stopping after 3)"
    extra="--maxfail=3"
  fi
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of arguments
  "$PY" -m pytest -m gpu -q -s -p no:cacheprovider $extra ${PYTEST_ARGS:-} tests/test_gpu_kernel.py 2>&1 \
    | tee "$OUT/gpu_tests.log"
  rc1=$?
  echo "--- tests/test_ops_reference.py" | tee -a "$OUT/gpu_tests.log"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_reference.py 2>&1 | tail -n 5 | tee -a "$OUT/gpu_tests.log"
  rc2=$?
  [ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
}

step_memcheck() {
  # (Output only in device_run.log: $OUT may hand back at most 8 files.)
  local cs rc1 rc2
  cs=$(find_tool compute-sanitizer) || { echo "memcheck: compute-sanitizer not found"; return 1; }
  echo "--- memcheck ($cs)"
  # No caching allocator: each tensor is its own allocation, so out-of-bounds accesses are seen.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --error-exitcode 99 --print-limit 20 \
    "$PY" benchmarks/memcheck_cases.py
  rc1=$?
  echo "--- memcheck, stream-K forced (VLLM_QUICK_WS_STREAMK=always)"
  VLLM_QUICK_WS_STREAMK=always PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --error-exitcode 99 \
    --print-limit 20 "$PY" benchmarks/memcheck_cases.py --preset streamk || rc1=$?
  echo "--- racecheck"
  "$cs" --tool racecheck --error-exitcode 99 --print-limit 20 \
    "$PY" benchmarks/memcheck_cases.py --preset race
  rc2=$?
  echo "memcheck exit $rc1, racecheck exit $rc2 (0 = clean and correct, 99 = sanitizer errors, 1 = wrong results)"
  [ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
}

NCU_METRICS="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,\
l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,\
l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,\
smsp__sass_inst_executed_op_shared_ld.sum,smsp__sass_inst_executed_op_shared_st.sum,\
sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,\
launch__grid_size,launch__block_size,launch__registers_per_thread"
NCU_MIN_METRICS="gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"
export NCU_METRICS NCU_MIN_METRICS

step_ncu() {
  local ncu rep="$OUT/ncu_report" cases
  ncu=$(find_tool ncu) || { echo "ncu: not found"; return 1; }
  cases=(--case 4096x12288:g128:M16:float16 --case 4096x12288:g128:M128:float16)
  rm -f "$rep.ncu-rep"
  # Only kernels between cudaProfilerStart/Stop (the GEMM calls) are profiled; NVTX ranges
  # <backend>/<case> label them.
  if ! "$ncu" --profile-from-start off --nvtx --clock-control none --target-processes all \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis_Tables \
      --metrics "$NCU_METRICS" -f -o "$rep" \
      "$PY" benchmarks/memcheck_cases.py --profile --backends "${NCU_BACKENDS:-quick_kernel,quick,awq_gemm,marlin,machete}" \
      "${cases[@]}"; then
    echo "ncu: full profile failed; retrying with the minimal metric set, quick only"
    "$ncu" --profile-from-start off --nvtx --clock-control none --target-processes all \
      --metrics "$NCU_MIN_METRICS" -f -o "$rep" \
      "$PY" benchmarks/memcheck_cases.py --profile --backends quick_kernel "${cases[@]}" || return 1
  fi
  [ -f "$rep.ncu-rep" ] || { echo "ncu: no report written"; return 1; }
  "$ncu" --import "$rep.ncu-rep" --csv --page raw >"$OUT/ncu_raw.csv" || echo "ncu: csv export failed"
  "$PY" - "$OUT/ncu_raw.csv" <<'EOF' || true
# Compact table of the metrics that matter, one line per profiled kernel.
import csv, os, sys
path = sys.argv[1]
if not os.path.exists(path) or os.path.getsize(path) == 0:
    sys.exit("no csv")
rows = list(csv.reader(open(path)))
head = rows[0]
want = os.environ["NCU_METRICS"].split(",")
idx = {h: i for i, h in enumerate(head)}
label_cols = [h for h in head if h in ("ID", "Kernel Name", "Block Size", "Grid Size")
              or "nvtx" in h.lower() or "push/pop" in h.lower()]
data = [r for r in rows[2:] if len(r) == len(head)]  # row 1 holds units
short = {m: m.replace("l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_", "bank_conf_")
          .replace("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_", "wavefronts_")
          .replace("smsp__sass_inst_executed_op_shared_", "shared_inst_")
          .replace(".avg.pct_of_peak_sustained_elapsed", "_%").replace(".avg.pct_of_peak_sustained_active", "_%")
          .replace(".sum", "") for m in want}
print("ncu summary (%d kernels); units in %s" % (len(data), path))
for r in data:
    labels = " | ".join(f"{h}={r[idx[h]][:60]}" for h in label_cols)
    vals = "  ".join(f"{short[m]}={r[idx[m]]}" for m in want if m in idx)
    print(f"- {labels}\n    {vals}")
EOF
  "$ncu" --import "$rep.ncu-rep" --page details --print-units base 2>&1 | head -n 400
  return 0
}

step_bench() {
  local budget=$(( $(remaining) - 20 ))
  [ $budget -lt 30 ] && budget=30
  "$PY" benchmarks/kernel_bench.py --out-dir "$OUT" --time-budget "$budget" ${BENCH_ARGS:-}
}

step_ncustall() {
  local ncu rep="$OUT/ncu_stall" c cases=()
  ncu=$(find_tool ncu) || { echo "ncu: not found"; return 1; }
  for c in ${NCU_STALL_M:-1 16 64 256}; do cases+=(--case "4096x12288:g128:M$c:float16"); done
  # shellcheck disable=SC2086  # NCU_STALL_SECTIONS is a list of arguments
  "$ncu" --profile-from-start off --nvtx --clock-control none --target-processes all \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
    --section LaunchStats ${NCU_STALL_SECTIONS:-} -f -o "$rep" \
    "$PY" benchmarks/memcheck_cases.py --profile --backends "${NCU_STALL_BACKENDS:-quick_x16,quick_s64,quick_s128}" \
    "${cases[@]}" || return 1
  "$ncu" --import "$rep.ncu-rep" --page details --print-units base >"$OUT/ncu_stall.txt" 2>&1
  grep -E "quick_gemm_kernel|quick_gemm_ws_kernel|nvjet|xmma|sm90_|Marlin|marlin|machete|NVTX|Duration|Pipe|Shared|Memory Throughput|Issued Ipc|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Registers Per|Achieved Occupancy|Stall|stall" \
    "$OUT/ncu_stall.txt" | head -n 250
}

# Per-instruction stall sampling (SourceCounters): one ncu report per "backend@M[@KxN]" in
# NCU_SOURCE_RUNS (fp16 g128, 4096x12288 unless named), its SASS source page as CSV (gzipped)
# and the summary of benchmarks/ncu_source_summary.py.
step_ncusource() {
  local ncu run be m shape rep
  ncu=$(find_tool ncu) || { echo "ncu: not found"; return 1; }
  for run in ${NCU_SOURCE_RUNS:-quick_ws256@1024 quick_s16m@1 quick_s16m@16}; do
    IFS=@ read -r be m shape <<<"$run"
    shape=${shape:-4096x12288}
    rep="/tmp/ncusrc_${be}_M${m}_$shape"
    "$ncu" --profile-from-start off --clock-control none --launch-count 1 --section SourceCounters \
      --section WarpStateStats --import-source no -f -o "$rep" \
      "$PY" benchmarks/memcheck_cases.py --profile --iters 1 --backends "$be" \
      --case "$shape:g128:M$m:float16" >/dev/null 2>&1 || { echo "ncu failed for $run"; continue; }
    "$ncu" --import "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.csv" 2>&1
    echo "### $run"
    "$PY" benchmarks/ncu_source_summary.py "$rep.csv" --top "${NCU_SOURCE_TOP:-30}" | tee -a "$OUT/ncu_source.txt"
    gzip -c "$rep.csv" >"$OUT/ncusrc_${be}_M${m}_$shape.csv.gz"
  done
}

TILE_BACKENDS="${TILE_BACKENDS:-quick_x16,quick_x32,quick_x64,quick_s16,quick_s32,quick_s64,quick_s128,quick_s16m,quick_s32m,quick_s64m,quick_w64,quick_w128,quick_w128n,quick_w64x,quick_dequant,quick_dequant_fp16,quick,cublas,awq_gemm,marlin,machete}"
export TILE_BACKENDS

step_tiles() {
  local budget=$(( $(remaining) - 30 )) tag json
  [ $budget -lt 30 ] && budget=30
  "$PY" benchmarks/kernel_bench.py --out-dir "$OUT" --tag tiles --time-budget "$budget" --dtypes "${TILE_DTYPES:-float16}" \
    --m "${TILE_M:-1,16,32,64,128,256,512}" --backends "${TILE_BACKENDS}" --target-ms "${TILE_TARGET_MS:-40}" \
    ${BENCH_ARGS:-} || return 1
  json=$(ls "$OUT"/kernel_*_tiles.json | head -n 1)
  "$PY" benchmarks/dispatch_table.py "$json" || return 1
  "$PY" benchmarks/dispatch_table.py --spec "$json" | tee "$OUT/dispatch_plan.txt" >/tmp/quick_dispatch_plan.txt
}

step_smoke() {
  "$PY" benchmarks/kernel_bench.py --smoke --out-dir "$OUT" ${BENCH_ARGS:-}
}

step_gpuserve() {
  # vLLM servers of the demo model: compile + CUDA graphs == eager == reference path.
  set -o pipefail
  "$PY" -m pytest -q -s -p no:cacheprovider tests/test_gpu_serving.py 2>&1 | tail -n 30
}
step_gputp() {
  # Two demo-model servers, TP = 1 and TP = 2 (nvidia-h100-x2). The test itself starts its
  # servers with NVLink multicast off (NO_MULTICAST_ENV there); pytest runs no collective.
  set -o pipefail
  "$PY" -m pytest -q -s -p no:cacheprovider tests/test_gpu_tensor_parallel.py 2>&1 | tail -n 30
}
export -f step_env step_build step_tests step_memcheck step_ncu step_ncustall step_ncusource step_bench step_tiles step_smoke step_gpuserve step_gputp

# run_step NAME CAP_SECONDS: runs step_NAME under a timeout of min(CAP, time left - 10 s)
run_step() {
  local name=$1 cap=$2 left t rc t0
  left=$(( $(remaining) - 10 ))
  t=$(( cap < left ? cap : left ))
  if [ $t -lt 20 ]; then
    banner "$name: SKIPPED (only $left s left of DEVICE_RUN_DEADLINE_S=$DEADLINE_S)"
    SUMMARY+=("$name: skipped (time)")
    FAILED=1
    return
  fi
  banner "$name (limit ${t}s)"
  t0=$(date +%s)
  timeout --kill-after=15 "$t" bash -c "step_$name"
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  case $rc in
    0) SUMMARY+=("$name: ok (${took}s)") ;;
    124|137) SUMMARY+=("$name: TIMED OUT after ${took}s (limit ${t}s)"); FAILED=1 ;;
    *) SUMMARY+=("$name: FAILED rc=$rc (${took}s)"); FAILED=1 ;;
  esac
}

banner "device_run: steps ${STEPS[*]}; OUT=$OUT; deadline ${DEADLINE_S}s; PYTHONPATH=$PYTHONPATH"
for step in "${STEPS[@]}"; do
  case $step in
    env) run_step env 60 ;;
    build) run_step build 360 ;;
    tests) run_step tests 300 ;;
    memcheck) run_step memcheck 200 ;;
    ncu) run_step ncu 200 ;;
    bench) run_step bench 100000 ;;
    ncustall) run_step ncustall 100 ;;
    ncusource) run_step ncusource 300 ;;
    tiles) run_step tiles 100000 ;;
    smoke) run_step smoke 180 ;;
    gpuserve) run_step gpuserve 420 ;;
    gputp) run_step gputp 420 ;;
    *) banner "unknown step '$step' (env build tests memcheck ncu ncustall bench tiles smoke gpuserve gputp)"; SUMMARY+=("$step: unknown"); FAILED=1 ;;
  esac
done

banner "summary"
for line in "${SUMMARY[@]}"; do
  echo "  $line"
done
ls -la "$OUT"
sleep 0.5  # let tee flush the log
exit $FAILED
