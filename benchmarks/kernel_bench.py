#!/usr/bin/env python3
"""Side-by-side timings of the QUICK int4 GEMM against cuBLAS and vLLM's int4 kernels, one GPU.

For each case (layer shape K x N, rows M, group size, activation dtype) every backend in
``vllm_kernels.BACKENDS`` runs the same quantised weight (same codes, zeros and scales):

* correctness first: each backend's output is compared with an fp32 reference
  ``x.float() @ dequant(W)`` (TF32 off); a backend whose relative error exceeds ``--max-rel-err``
  computes something else and gets no time (its error is still recorded);
* timing: the weight is copied until the copies exceed 2x the L2 cache (so no call finds its
  weight in L2), a CUDA graph of ``calls`` back-to-back calls cycling over the copies is captured
  and replayed ``reps`` times, and the median replay time / ``calls`` is the time per call; if
  capture fails the same loop is timed eagerly with CUDA events (recorded per backend as
  ``timing``).  Inputs are random (never zeros) and drawn fresh for every case.

Writes ``<out-dir>/kernel_<gpu>.json`` (a list of rows, see README.md) and ``kernel_<gpu>.md``
(header with GPU, versions and the command line, then speedups over cuBLAS), rewriting both after
every shape so that a run stopped early still leaves results.  Progress goes to stdout.

Examples::

    python benchmarks/kernel_bench.py --smoke                 # one small case per backend
    python benchmarks/kernel_bench.py                         # full sweep (about 5-6 min on H100)
    python benchmarks/kernel_bench.py --shapes llama2-70b --m 1,16,128 --dtypes float16
    python benchmarks/kernel_bench.py --merge a/kernel_h100.json b/kernel_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import vllm_kernels as vk  # noqa: E402
from vllm_quick import layout  # noqa: E402

# (name, K, N): the linear layers of the models QUICK targets (N of fused qkv / gate_up).
SHAPES = [
    ("llama2-7b.qkv", 4096, 12288),
    ("llama2-7b.o", 4096, 4096),
    ("llama2-7b.gate_up", 4096, 22016),
    ("llama2-7b.down", 11008, 4096),
    ("llama2-13b.qkv", 5120, 15360),
    ("llama2-13b.down", 13824, 5120),
    ("llama2-70b.qkv", 8192, 10240),
    ("llama2-70b.gate_up", 8192, 57344),
    ("llama2-70b.down", 28672, 8192),
    ("llama3-8b.qkv", 4096, 6144),
    ("llama3-8b.gate_up", 4096, 28672),
    ("llama3-8b.down", 14336, 4096),
]
M_DEFAULT = [1, 16, 32, 64, 128, 256, 512, 1024, 4096]
GROUPS_DEFAULT = [128]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SMOKE_SHAPES = [("smoke.4096x4096", 4096, 4096)]
SMOKE_M = [16, 256]  # a decode-sized and a prefill-sized M (the op switches path by M)
REL_ERR_LIMIT = 2e-2  # a backend above this computes a different function (bf16 rounding is ~3e-3)
DEVICE = "cuda"  # a module global so that the CPU dry-run in development can point it elsewhere


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(t) for t in re.split(r"[,\s]+", text.strip()) if t]


def _str_list(text: str) -> list[str]:
    return [t for t in re.split(r"[,\s]+", text.strip()) if t]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time the QUICK int4 GEMM against cuBLAS and vLLM's awq_gemm, Marlin, Machete "
        "and Humming on one GPU, checking every backend's output against an fp32 reference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    names = ", ".join(n for n, _, _ in SHAPES)
    p.add_argument(
        "--shapes",
        default="all",
        help=f"comma list of shape names or name prefixes (e.g. llama2-70b), or KxN; 'all' = {names}",
    )
    p.add_argument("--m", default=",".join(map(str, M_DEFAULT)), help="rows M (tokens) to time")
    p.add_argument("--group-sizes", default=",".join(map(str, GROUPS_DEFAULT)),
                   help="group sizes; -1 = one group over K (per-channel)")
    p.add_argument("--dtypes", default="float16,bfloat16", help="activation dtypes")
    p.add_argument("--backends", default=",".join(vk.DEFAULT_BACKENDS),
                   help=f"backends to run, from {', '.join(vk.BACKEND_NAMES)} (quick = the op as the "
                   "plugin calls it, which switches to dequantise + cuBLAS at large M; quick_kernel = "
                   "the QUICK kernel at every M; quick_dequant = dequantise + cuBLAS at every M)")
    p.add_argument("--quick-only", action="store_true",
                   help="only ours (the op and the raw kernel) and the cuBLAS baseline (fast iteration)")
    p.add_argument("--smoke", action="store_true",
                   help=f"one small case ({SMOKE_SHAPES[0][1]}x{SMOKE_SHAPES[0][2]}, M={SMOKE_M}, g=128, "
                   "both dtypes) per backend, plus adapter self-checks; writes kernel_<gpu>_smoke.*")
    p.add_argument("--out-dir", default=str(HERE / "results"), help="where the .json/.md go")
    p.add_argument("--tag", default="", help="suffix for the output names: kernel_<gpu>_<tag>.*")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds; cases left when it runs out are skipped and listed (0 = no limit)")
    p.add_argument("--calls-per-graph", type=int, default=20, help="calls captured per CUDA graph (max)")
    p.add_argument("--target-ms", type=float, default=100.0,
                   help="GPU time to spend timing one backend on one case (sets the replay count)")
    p.add_argument("--no-graph", action="store_true", help="time with CUDA events only")
    p.add_argument("--settle-s", type=float, default=0.5,
                   help="seconds of idle GPU before each backend's timings of a case, so that a "
                        "small-M timing does not start right after another backend's large-M runs "
                        "(on the H100 those hit the power cap and lower the SM clock for a while: "
                        "QUICK's small-M tiles then took up to 16%% longer, cuBLAS 1%%; 0 = off)")
    p.add_argument("--l2-mb", type=float, default=0.0,
                   help="L2 size used to size the weight rotation (0 = ask the device)")
    p.add_argument("--max-rel-err", type=float, default=REL_ERR_LIMIT,
                   help="a backend with a larger relative error is reported wrong, not timed")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-rotate-order", dest="rotate_order", action="store_false",
                   help="time the backends in the order given in every case (default: rotate the "
                        "order by one place per case, so no backend is always timed first)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="merge result files from several runs into --out-dir (no GPU needed)")
    p.add_argument("--gpu-tag", default="", help="with --merge: the <gpu> part of the output name")
    args = p.parse_args(argv)
    if args.merge:
        return args
    args.m = _int_list(args.m)
    args.group_sizes = _int_list(args.group_sizes)
    args.dtypes = _str_list(args.dtypes)
    args.backends = _str_list(args.backends)
    if args.quick_only:
        args.backends = ["quick", "quick_kernel", "quick_dequant", "cublas"]
    bad = [b for b in args.backends if b not in vk.BACKENDS]
    if bad:
        p.error(f"unknown backends {bad}; choose from {list(vk.BACKENDS)}")
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown dtypes {bad}; choose from {list(DTYPES)}")
    if any(m <= 0 for m in args.m):
        p.error("--m values must be positive")
    if any(g != -1 and g <= 0 for g in args.group_sizes):
        p.error("--group-sizes must be positive or -1")
    if args.smoke:
        args.shapes_sel = list(SMOKE_SHAPES)
        args.m = list(SMOKE_M)
        args.group_sizes = [128]
        args.tag = args.tag or "smoke"
    else:
        try:
            args.shapes_sel = select_shapes(args.shapes)
        except ValueError as e:
            p.error(str(e))
    return args


def select_shapes(spec: str) -> list[tuple[str, int, int]]:
    if spec.strip() in ("", "all"):
        return list(SHAPES)
    chosen: list[tuple[str, int, int]] = []
    for item in _str_list(spec):
        m = re.fullmatch(r"(\d+)[xX](\d+)", item)
        if m:
            k, n = int(m.group(1)), int(m.group(2))
            chosen.append((f"{k}x{n}", k, n))
            continue
        hits = [s for s in SHAPES if s[0] == item or s[0].startswith(item)]
        if not hits:
            raise ValueError(f"unknown shape {item!r}; names: {[s[0] for s in SHAPES]} or KxN")
        chosen.extend(h for h in hits if h not in chosen)
    for name, k, n in chosen:
        if k % 16 or n % 64:
            raise ValueError(f"shape {name}: needs K % 16 == 0 and N % 64 == 0, got K={k} N={n}")
    return chosen


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------
def gpu_tag(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the first token with letters and digits."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", device_name.lower()) if t and t != "nvidia"]
    for t in tokens:
        if re.search(r"[a-z]", t) and re.search(r"\d", t):
            return t
    return "-".join(tokens) or "gpu"


def environment(args) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "vllm": vk.vllm_version(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = torch.cuda.get_device_name(0)
        env["sms"] = props.multi_processor_count
        env["l2_bytes"] = int(getattr(props, "L2_cache_size", 0) or 0)
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    try:
        env["git"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip() or None
    except Exception:
        env["git"] = None
    return env


def log(t0: float, msg: str) -> None:
    print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def random_weight(k: int, n: int, group_size: int, gen: torch.Generator, device):
    """Random codes, zeros and scales; scales are exactly representable in fp16 *and* bf16, so
    every backend (some take the scales in the activation dtype) sees the very same values."""
    g = vk.effective_group(k, group_size)
    groups = k // g
    codes = torch.randint(0, 16, (k, n), generator=gen, device=device, dtype=torch.int32)
    zeros = torch.randint(0, 16, (groups, n), generator=gen, device=device, dtype=torch.int32)
    s = (torch.rand((groups, n), generator=gen, device=device) + 0.5) * 2.0**-10
    scales = s.to(torch.bfloat16).to(torch.float16)
    return codes, zeros, scales


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def fp32_reference(x: torch.Tensor, w32: torch.Tensor) -> torch.Tensor:
    torch.backends.cuda.matmul.allow_tf32 = False  # vLLM's import may have changed it
    torch.set_float32_matmul_precision("highest")
    return x.float() @ w32


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
@dataclass
class Timing:
    us: float
    method: str  # "graph" or "events"
    calls: int
    reps: int
    note: str = ""


def _events_ms(fn, reps: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def time_backend(run, states: list, x: torch.Tensor, args) -> Timing:
    """Median time per call (us), cycling over ``states`` (the weight copies)."""
    n = len(states)

    def loop(calls):
        for i in range(calls):
            run(states[i % n], x)

    loop(min(n, 3))  # warm-up: lazy init, autotuning, JIT
    torch.cuda.synchronize()
    est_ms = statistics.median(_events_ms(lambda: loop(3), 3)) / 3
    calls = max(n, min(args.calls_per_graph, max(2, round(20.0 / max(est_ms, 1e-3)))))
    reps = int(min(50, max(5, math.ceil(args.target_ms / max(calls * est_ms, 1e-3)))))

    note = ""
    if not args.no_graph:
        graph = None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up on the capture stream's side, as recommended
                loop(min(n, 2))
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loop(calls)
            graph.replay()
            torch.cuda.synchronize()
            times = _events_ms(graph.replay, reps)
            return Timing(statistics.median(times) / calls * 1e3, "graph", calls, reps)
        except Exception as e:  # capture unsupported by this backend: fall back to events
            note = f"graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); events"
            torch.cuda.synchronize()
        finally:
            del graph
    times = _events_ms(lambda: loop(calls), reps)
    return Timing(statistics.median(times) / calls * 1e3, "events", calls, reps, note)


def cuda_alive() -> str | None:
    """None if the CUDA context still works, else the error (a sticky fault ends the run)."""
    try:
        torch.cuda.synchronize()
        (torch.ones(4, device=DEVICE) * 2).sum().item()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------
def new_row(name, k, n, m, g, dtype_name, backends) -> dict:
    keys = list(vk.DEFAULT_BACKENDS) + [b for b in backends if b not in vk.DEFAULT_BACKENDS]
    row = {
        "shape": name, "K": k, "N": n, "M": m, "group_size": g, "dtype": dtype_name,
        "us": {b: None for b in keys},
        "rel_err": None,
        "rel_err_backends": {b: None for b in keys},
        "timing": {},
        "notes": {},
    }
    if "quick" in backends:
        try:  # which path the op takes at this M: its "quick" time is that path's
            row["quick_path"] = vk.quick_op_path(m, DTYPES[dtype_name], weight_elements=k * n)
        except Exception as e:
            row["quick_path"] = f"unknown ({short(e)})"
    return row


def backend_order(backends: list[str], case_index: int, rotate: bool) -> list[str]:
    """The order in which one case times its backends: rotated by one place per case when
    ``rotate``. Timings drift within a case (on the H100 a backend timed early ran up to ~10%
    faster at M = 1 than the same kernel timed late), so a fixed order would favour the backends
    listed first in every row; rotating spreads that bias evenly over the sweep. Each row records
    its order."""
    if not rotate or not backends:
        return list(backends)
    i = case_index % len(backends)
    return list(backends[i:]) + list(backends[:i])


def run_sweep(args) -> int:
    t0 = time.monotonic()
    deadline = t0 + args.time_budget if args.time_budget > 0 else float("inf")
    env = environment(args)
    device = torch.device(DEVICE)
    l2 = int(args.l2_mb * 2**20) if args.l2_mb > 0 else (env.get("l2_bytes") or 50 * 2**20)
    tag = gpu_tag(env["gpu"]) + (f"_{args.tag}" if args.tag else "")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(t0, f"GPU {env['gpu']} ({env['sms']} SMs, L2 {l2 / 2**20:.0f} MiB), torch {env['torch']}, "
            f"CUDA {env['cuda']}, vLLM {env['vllm']}; writing {out_dir}/kernel_{tag}.json/.md")

    rows: dict[tuple, dict] = {}
    skipped: list[str] = []
    selfchecks: list[str] = []
    fatal = None

    if args.smoke and "marlin" in args.backends:
        try:
            codes = torch.randint(0, 16, (1024, 512), device=device, dtype=torch.int32)
            ok = vk.marlin_repack_matches_gptq_route(codes)
            selfchecks.append(f"awq_marlin_repack == gptq_marlin_repack(GPTQ packing): {ok}")
        except Exception as e:
            selfchecks.append(f"marlin repack self-check failed: {short(e)}")
        log(t0, selfchecks[-1])

    case_index = 0
    for name, k, n in args.shapes_sel:
        for g in args.group_sizes:
            ge = vk.effective_group(k, g)
            if k % ge or ge % 16:
                log(t0, f"{name} g={g}: group size must divide K={k} and be a multiple of 16; skipped")
                skipped.append(f"{name} g={g}: invalid group size for K={k}")
                continue
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                case = f"{name} K={k} N={n} g={g} {dname}"
                if fatal or time.monotonic() > deadline:
                    skipped.append(f"{case}: all M, all backends ({'CUDA fault' if fatal else 'time budget'})")
                    continue
                case_index += 1
                gen = torch.Generator(device=device)
                gen.manual_seed(args.seed * 1000003 + case_index)
                try:
                    codes, zeros, scales = random_weight(k, n, g, gen, device)
                    w32 = layout.dequantize(codes, zeros, scales)  # [K, N] fp32, exact
                    xs = {m: torch.randn((m, k), generator=gen, device=device).to(dtype) for m in args.m}
                    refs: dict[int, torch.Tensor] = {}
                except Exception as e:
                    log(t0, f"{case}: could not make data: {short(e)}")
                    skipped.append(f"{case}: data generation failed ({short(e)})")
                    fatal = cuda_alive()
                    continue
                order = backend_order(args.backends, case_index, args.rotate_order)
                for m in args.m:
                    rows[(name, m, g, dname)] = new_row(name, k, n, m, g, dname, args.backends)
                    rows[(name, m, g, dname)]["order"] = order

                for bname in order:
                    if fatal:
                        break
                    backend = vk.BACKENDS[bname]
                    if time.monotonic() > deadline:
                        skipped.append(f"{case}: {bname} (time budget)")
                        for m in args.m:
                            rows[(name, m, g, dname)]["notes"][bname] = "skipped: time budget"
                        continue
                    reason = None
                    try:
                        reason = backend.unsupported(k, n, g, dtype)
                    except Exception as e:
                        reason = f"support check failed: {short(e)}"
                    if reason:
                        for m in args.m:
                            rows[(name, m, g, dname)]["notes"][bname] = f"unsupported: {reason}"
                        log(t0, f"{case} {bname}: unsupported: {reason}")
                        continue
                    states = []
                    try:
                        tp = time.monotonic()
                        states = [backend.prepare(codes, zeros, scales, g, dtype)]
                        per_copy = vk.weight_bytes(states[0])
                        copies = max(2, 2 * l2 // max(per_copy, 1) + 1)
                        free, _ = torch.cuda.mem_get_info()
                        copies = int(max(1, min(copies, 64, (0.5 * free) // max(per_copy, 1))))
                        states += [vk.clone_state(states[0]) for _ in range(copies - 1)]
                        prep_s = time.monotonic() - tp
                    except Exception as e:
                        msg = f"prepare failed: {short(e)}"
                        for m in args.m:
                            rows[(name, m, g, dname)]["notes"][bname] = msg
                        log(t0, f"{case} {bname}: {msg}")
                        states = []
                        fatal = cuda_alive()
                        continue
                    rotation_mb = per_copy * len(states) / 2**20
                    if args.settle_s > 0:
                        torch.cuda.synchronize()
                        time.sleep(args.settle_s)
                    for m in args.m:
                        row = rows[(name, m, g, dname)]
                        if time.monotonic() > deadline:
                            skipped.append(f"{case}: {bname} M={m} (time budget)")
                            row["notes"][bname] = "skipped: time budget"
                            continue
                        x = xs[m]
                        try:
                            if m not in refs:
                                refs[m] = fp32_reference(x, w32)
                            y = backend.run(states[0], x)
                            torch.cuda.synchronize()
                            if tuple(y.shape) != (m, n):
                                raise RuntimeError(f"output shape {tuple(y.shape)}, expected {(m, n)}")
                            err = rel_err(y, refs[m]) if torch.isfinite(y).all() else float("inf")
                            del y
                            row["rel_err_backends"][bname] = err if math.isfinite(err) else None
                            if bname == "quick":
                                row["rel_err"] = row["rel_err_backends"][bname]
                            if not err <= args.max_rel_err:
                                row["notes"][bname] = (
                                    f"WRONG: relative error {err:.3g} > {args.max_rel_err:g} "
                                    "(computes a different function; not timed)"
                                )
                                log(t0, f"{case} M={m} {bname}: {row['notes'][bname]}")
                                continue
                            t = time_backend(backend.run, states, x, args)
                            row["us"][bname] = round(t.us, 3)
                            row["timing"][bname] = t.method
                            if t.note:
                                row["notes"][bname] = t.note
                            log(t0, f"{case} M={m} {bname}: {t.us:9.2f} us ({t.method}, {len(states)} copies "
                                    f"= {rotation_mb:.0f} MiB, {t.calls} calls x {t.reps}) rel_err={err:.2e}"
                                    + (f" prep {prep_s:.1f}s" if m == args.m[0] else ""))
                        except Exception as e:
                            row["notes"][bname] = f"failed: {short(e)}"
                            log(t0, f"{case} M={m} {bname}: failed: {short(e)}")
                            fatal = cuda_alive()
                            if fatal:
                                log(t0, f"CUDA context is broken ({fatal}); stopping. Rerun without "
                                        f"--backends {bname} to measure the others.")
                                break
                    del states
                    torch.cuda.empty_cache()
                del codes, zeros, scales, w32, xs, refs
                torch.cuda.empty_cache()
            write_outputs(list(rows.values()), env, skipped, selfchecks, out_dir, tag)

    out_rows = list(rows.values())
    write_outputs(out_rows, env, skipped, selfchecks, out_dir, tag)
    print(render_markdown(out_rows, env, skipped, selfchecks, header=False), flush=True)
    log(t0, f"done: {len(out_rows)} rows, {len(skipped)} skipped entries -> {out_dir}/kernel_{tag}.json")
    if skipped:
        todo = sorted({s.split(" ", 1)[0] for s in skipped if "time budget" in s})
        if todo:
            print("To finish the skipped cases, run again with --shapes " + ",".join(todo)
                  + " --tag part2 and merge with --merge.", flush=True)
    if fatal:
        return 3
    return 0


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def write_outputs(rows, env, skipped, selfchecks, out_dir: Path, tag: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"kernel_{tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out_dir / f"kernel_{tag}.md").write_text(render_markdown(rows, env, skipped, selfchecks))


def _fmt_speed(base, t):
    if base is None or t is None:
        return "—"
    return f"{base / t:.2f}x"


def render_markdown(rows, env, skipped=(), selfchecks=(), header=True) -> str:
    lines: list[str] = []
    if header:
        lines.append(f"# int4 GEMM kernels on {env.get('gpu', '?')}")
        lines.append("")
        for key in ("date", "gpu", "capability", "sms", "memory_gib", "torch", "cuda", "vllm", "python", "git"):
            if env.get(key) is not None:
                lines.append(f"- {key}: {env[key]}")
        if env.get("l2_bytes"):
            lines.append(f"- L2: {env['l2_bytes'] / 2**20:.0f} MiB (weights rotated over > 2x this)")
        if env.get("merged_from"):
            lines.append(f"- merged from: {', '.join(env['merged_from'])}")
        if env.get("command"):
            lines.append(f"- command: `{env['command']}`")
        lines.append("- time: median per call of CUDA-graph replays (or CUDA events where noted), "
                     "weights cycling over copies larger than 2x L2, random inputs")
        lines.append("- speedup = cuBLAS µs / backend µs (>1: faster than cuBLAS fp16/bf16 on the "
                     "dequantised weight); last column = best of (Marlin, Machete) µs / quick µs "
                     "(>1: quick is faster); 'quick path' = what torch.ops.quick.gemm runs at that M "
                     "(a kernel tile such as x16 or s64, or dequant = dequantise + cuBLAS)")
        lines.append("")
        lines.append("Calls:")
        for b, call in vk.CALLS.items():
            lines.append(f"- **{b}**: {call}")
        lines.append("")
    cols = ["quick", "awq_gemm", "marlin", "machete", "humming"]
    # the op's paths when timed separately: the raw kernel, each kernel tile, dequant + cuBLAS
    extras = [b for b in vk.BACKEND_NAMES if b.startswith("quick_") and any(b in r["us"] for r in rows)]
    cols[1:1] = extras
    lines.append("| shape | K×N | g | dtype | M | quick path | cuBLAS µs | quick µs | " + " | ".join(cols)
                 + " | quick vs best(marlin, machete) |")
    lines.append("|" + "---|" * (9 + len(cols)))
    for r in sorted(rows, key=_row_key):
        us = r["us"]
        best = [t for t in (us.get("marlin"), us.get("machete")) if t is not None]
        vs = _fmt_speed(min(best), us.get("quick")) if best else "—"
        cub = us.get("cublas")
        lines.append(
            f"| {r['shape']} | {r['K']}×{r['N']} | {r['group_size']} | {r['dtype']} | {r['M']} | "
            f"{r.get('quick_path', '—')} | {cub if cub is not None else '—'} | "
            f"{us.get('quick') if us.get('quick') is not None else '—'} | "
            + " | ".join(_fmt_speed(cub, us.get(c)) for c in cols) + f" | {vs} |"
        )
    # accuracy summary
    lines.append("")
    lines.append("Worst relative error vs the fp32 reference, per backend and dtype:")
    lines.append("")
    worst: dict[tuple, float] = {}
    for r in rows:
        for b, e in r.get("rel_err_backends", {}).items():
            if e is not None:
                key = (b, r["dtype"])
                worst[key] = max(worst.get(key, 0.0), e)
    for (b, d), e in sorted(worst.items()):
        lines.append(f"- {b} {d}: {e:.2e}")
    notes: dict[str, set] = {}
    for r in rows:
        for b, text in r.get("notes", {}).items():
            notes.setdefault(f"{b}: {text}", set()).add(f"{r['shape']}/{r['dtype']}/g{r['group_size']}/M{r['M']}")
    if notes:
        lines.append("")
        lines.append("Notes (why a number is missing, or how it was taken):")
        lines.append("")
        for text, where in sorted(notes.items()):
            lines.append(f"- {text} ({len(where)} cases, e.g. {sorted(where)[0]})")
    if selfchecks:
        lines.append("")
        lines.append("Self-checks: " + "; ".join(selfchecks))
    if skipped:
        lines.append("")
        lines.append(f"Skipped ({len(skipped)}):")
        lines.append("")
        lines.extend(f"- {s}" for s in skipped[:50])
        if len(skipped) > 50:
            lines.append(f"- ... and {len(skipped) - 50} more")
    return "\n".join(lines) + "\n"


def _row_key(r):
    order = {name: i for i, (name, _, _) in enumerate(SHAPES)}
    return (order.get(r["shape"], len(order)), r["shape"], r["group_size"], r["dtype"], r["M"])


def merge(args) -> int:
    rows: dict[tuple, dict] = {}
    sources = []
    tag = args.gpu_tag
    for f in args.merge:
        path = Path(f)
        try:
            data = json.loads(path.read_text())
        except Exception as e:
            print(f"cannot read {path}: {short(e)}", file=sys.stderr)
            return 2
        if not isinstance(data, list):
            print(f"{path}: expected a list of rows", file=sys.stderr)
            return 2
        sources.append(str(path))
        if not tag:
            m = re.match(r"kernel_([a-z0-9-]+)", path.stem)
            tag = m.group(1) if m else "gpu"
        for r in data:
            rows[(r["shape"], r["M"], r["group_size"], r["dtype"])] = r  # later files win
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = {"gpu": f"{tag} (merged)", "merged_from": sources, "date": now}
    out_dir = Path(args.out_dir)
    write_outputs(list(rows.values()), env, [], [], out_dir, tag + (f"_{args.tag}" if args.tag else ""))
    print(f"merged {len(rows)} rows from {len(sources)} files into {out_dir}/kernel_{tag}.json/.md")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    if not torch.cuda.is_available():
        print("kernel_bench: no CUDA device; nothing to time (use --help for options)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
