#!/usr/bin/env python3
"""Small, checked QUICK GEMM cases to run under compute-sanitizer, and a profiling mode for ncu.

Check mode (default): runs each case through ``torch.ops.quick.gemm`` on the GPU and compares
with an fp32 reference; prints one line per case and exits 1 if any case is wrong, 2 if the
kernel is missing. Inputs are made on the host and copied over, so under the sanitizer almost
every instrumented kernel is ours. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every
tensor is its own allocation and an out-of-bounds access is not hidden inside a cached block::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \\
        python benchmarks/memcheck_cases.py
    compute-sanitizer --tool racecheck python benchmarks/memcheck_cases.py --preset race

Profile mode: prepares every (backend, case) first, then runs ``--iters`` calls of each between
``cudaProfilerStart``/``Stop`` inside an NVTX range named ``<backend>/<case>``, so that
``ncu --profile-from-start off`` sees only the GEMM kernels::

    ncu --profile-from-start off --nvtx -o report python benchmarks/memcheck_cases.py --profile \\
        --backends quick,awq_gemm,marlin --case 4096x12288:g128:M16:float16

A case is ``KxN:g<group>:M<m>:<dtype>[:bias]`` (group -1 = per-channel).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

# Kernel constraints (vllm_quick/ops.py): K % 64 == 0, group % 32 == 0, size_n even.
PRESETS = {
    "memcheck": [
        "256x64:g128:M1:float16",  # a single 64-column tile: the smallest launch
        "512x200:g128:M7:bfloat16",  # padded N (200 -> 256): last tile partly written
        "1024x320:g64:M33:float16",  # M not a multiple of the M tile
        "512x192:g-1:M128:bfloat16",  # per-channel
        "2048x512:g32:M300:float16",  # group 32 (two groups per k stage), M > 256 (ws192, two row blocks)
        "4096x4096:g128:M1:bfloat16",  # x16 (bf16, small layer), split-K path
        "4096x4096:g128:M16:float16",  # ws16 (mma.sync behind the ws producer), K ranges or stream-K
        "2048x1024:g128:M256:bfloat16",  # large-M tile
        "1024x512:g128:M256:float16",  # fp16 large M: the op's dequant path, and the kernel itself
        "512x264:g128:M5:float16:bias",  # ws8, bias, padded N
        "1024x512:g128:M100:float16",  # fp16 mid M: the s64 tile (scaled fragments)
        "2048x320:g32:M40:float16",  # s32 tile, group 32, padded N, split-K
        "2048x4160:g128:M1180:float16",  # ws256: 165 tiles, the last wave's 33 shared out along K
        "4096x8192:g128:M40:float16",  # ws64b2 (two blocks per SM), split K
        "2048x4096:g64:M50:float16:bias",  # ws64 on a small layer, bias
        "2048x4160:g128:M300:bfloat16",  # bf16 through ws192: the per-row fp16 copy of x (quick_act_scale.cu)
        "4096x8192:g128:M5:bfloat16",  # bf16 through ws8 (the same copy), stream-K
        "4096x8192:g128:M24:bfloat16:bias",  # bf16 through ws32b2, bias
        "5120x15360:g128:M100:float16",  # a large layer: ws128w4 (four consumer warpgroups)
        "5120x15360:g32:M72:bfloat16:bias",  # ws128w4, bf16, group 32, bias
        "4096x28672:g128:M16:float16",  # ws16w on a large layer, its 224 tiles split 2 ways (80% fill)
        "5120x15360:g128:M575:float16:bias",  # row split: 512 rows ws256 + 63 rows ws64w, into one y
        "4096x14336:g128:M575:float16:bias",  # ws192: three row blocks of 192 (the last one row short), bias
        "4096x6144:g32:M160:bfloat16",  # ws192, bf16, group 32, one partial row block, stream-K tail
    ],
    # Run under VLLM_QUICK_WS_STREAMK=always (device_run.sh memcheck): the ws tiles' partial wave
    # as one full wave of stream-K blocks, blocks ending one tile and starting the next.
    "streamk": [
        "2048x4160:g128:M1180:float16",  # ws256: 33 tiles on 132 blocks, 4-5 pieces a tile
        "2048x4160:g32:M300:bfloat16",  # ws256, bf16, group 32, odd column tile count
        "4096x4096:g128:M128:float16",  # ws128: 32 tiles of 64 stages
        "4096x8192:g128:M40:float16",  # ws64b2: 64 tiles on 264 blocks
        "2048x4096:g64:M50:float16:bias",  # ws64, bias through the reduction
        "5120x15360:g128:M100:float16",  # ws128w4: 60 tiles of 256 columns on 132 blocks
    ],
    "race": [
        "256x128:g128:M16:float16",
        "1024x256:g64:M128:bfloat16",
        "2048x128:g128:M1:float16",  # split-K reduction
        "1024x256:g64:M100:float16",  # s64 tile
    ],
}


@dataclass
class Case:
    k: int
    n: int
    group_size: int
    m: int
    dtype_name: str
    bias: bool

    @property
    def label(self) -> str:
        return f"{self.k}x{self.n}:g{self.group_size}:M{self.m}:{self.dtype_name}" + (":bias" if self.bias else "")


def parse_case(text: str) -> Case:
    m = re.fullmatch(r"(\d+)x(\d+):g(-?\d+):M(\d+):(float16|bfloat16)(:bias)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad case {text!r}: expected KxN:g<group>:M<m>:<float16|bfloat16>[:bias]")
    return Case(int(m[1]), int(m[2]), int(m[3]), int(m[4]), m[5], bool(m[6]))


def host_weight(case: Case, seed: int):
    """Natural-order codes/zeros/scales on the host (cheap for these sizes)."""
    g = case.k if case.group_size == -1 else case.group_size
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (case.k, case.n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (case.k // g, case.n), generator=gen, dtype=torch.int32)
    scales = ((torch.rand(case.k // g, case.n, generator=gen) + 0.5) * 2.0**-10).half()
    return codes, zeros, scales, gen


def op_path(m: int, dtype: torch.dtype) -> str:
    """The path torch.ops.quick.gemm takes for M rows ("kernel" or "dequant", vllm_quick/dispatch.py)."""
    try:
        from vllm_quick import dispatch
    except ImportError:
        return "kernel"
    return dispatch.choose_path(m, dtype, torch.device("cuda", torch.cuda.current_device()))


def check_mode(cases: list[Case]) -> int:
    from vllm_quick import layout, ops

    if ops.kernel_extension() is None:
        print("memcheck_cases: vllm_quick._C is not built; nothing to check", flush=True)
        return 2
    failures = 0
    for i, case in enumerate(cases):
        g = case.k if case.group_size == -1 else case.group_size
        dtype = DTYPES[case.dtype_name]
        try:
            codes, zeros, scales, gen = host_weight(case, seed=100 + i)
            qw, qz, s = layout.awq_to_quick(layout.awq_pack(codes), layout.awq_pack(zeros), scales)
            w32 = layout.dequantize(codes, zeros, scales)
            x = torch.randn(case.m, case.k, generator=gen).to(dtype)
            bias = (0.1 * torch.randn(case.n, generator=gen)).to(dtype) if case.bias else None
            ref = x.float() @ w32 + (bias.float() if bias is not None else 0.0)
            reason = ops.kernel_unsupported_reason(x, g) if hasattr(ops, "kernel_unsupported_reason") else None
            if reason:
                print(f"FAIL {case.label}: the kernel does not take this case ({reason})", flush=True)
                failures += 1
                continue
            args = (x.cuda(), qw.cuda(), qz.cuda(), s.cuda(), None if bias is None else bias.cuda(), g, case.n)
            calls = [("op", lambda args=args: torch.ops.quick.gemm(*args))]
            if op_path(case.m, dtype) == "dequant":  # the op would not run the QUICK kernel: run it too
                calls.append(("kernel", lambda args=args: ops.kernel_gemm(*args)))
            for what, call in calls:
                y = call().cpu()
                torch.cuda.synchronize()
                finite = bool(torch.isfinite(y).all())
                rel = float((y.float() - ref).norm() / ref.norm()) if finite else float("inf")
                floor = float((ref.to(dtype).float() - ref).norm() / ref.norm())
                limit = max(2e-3, 1.25 * floor)
                ok = finite and tuple(y.shape) == (case.m, case.n) and rel <= limit
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {case.label} [{what}]: rel_err={rel:.2e} (limit {limit:.1e})"
                      + ("" if finite else " NaN/inf in output"), flush=True)
        except Exception as e:
            failures += 1
            print(f"FAIL {case.label}: {type(e).__name__}: {e}", flush=True)
            try:
                torch.cuda.synchronize()
            except Exception as sticky:
                print(f"CUDA context broken ({sticky}); stopping", flush=True)
                break
    print(f"memcheck_cases: {len(cases)} cases, {failures} failed checks", flush=True)
    return 1 if failures else 0


def profile_mode(cases: list[Case], backends: list[str], iters: int) -> int:
    import vllm_kernels as vk

    unknown = [b for b in backends if b not in vk.BACKENDS]
    if unknown:
        print(f"memcheck_cases --profile: unknown backends {unknown}; choose from {list(vk.BACKENDS)}", flush=True)
        return 2
    prepared = []
    for bname in backends:
        backend = vk.BACKENDS[bname]
        for i, case in enumerate(cases):
            dtype = DTYPES[case.dtype_name]
            try:
                reason = backend.unsupported(case.k, case.n, case.group_size, dtype)
                if reason:
                    print(f"skip {bname} {case.label}: {reason}", flush=True)
                    continue
                codes, zeros, scales, gen = host_weight(case, seed=200 + i)
                state = backend.prepare(codes.cuda(), zeros.cuda(), scales.cuda(), case.group_size, dtype)
                x = torch.randn(case.m, case.k, generator=gen).to(dtype).cuda()
                for _ in range(2):  # warm-up outside the profiled range (JIT, autotuning, lazy init)
                    backend.run(state, x)
                torch.cuda.synchronize()
                prepared.append((f"{bname}/{case.label}", backend, state, x))
            except Exception as e:
                print(f"skip {bname} {case.label}: {type(e).__name__}: {e}", flush=True)
    if not prepared:
        print("memcheck_cases --profile: nothing to profile", flush=True)
        return 1
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, backend, state, x in prepared:
        torch.cuda.nvtx.range_push(name)
        for _ in range(iters):
            backend.run(state, x)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled: " + ", ".join(p[0] for p in prepared), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", type=parse_case, action="append", default=[], help="a case (repeatable)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="memcheck", help="case list when no --case")
    p.add_argument("--profile", action="store_true", help="profile mode (for ncu) instead of checking")
    p.add_argument("--backends", default="quick", help="profile mode: comma list of vllm_kernels backends")
    p.add_argument("--iters", type=int, default=1, help="profile mode: calls per case inside the range")
    args = p.parse_args(argv)
    cases = args.case or [parse_case(c) for c in PRESETS[args.preset]]
    if not torch.cuda.is_available():
        print("memcheck_cases: no CUDA device", flush=True)
        return 2
    if args.profile:
        return profile_mode(cases, [b for b in args.backends.split(",") if b], args.iters)
    return check_mode(cases)


if __name__ == "__main__":
    sys.exit(main())
