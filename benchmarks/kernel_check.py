"""Quick developer check of the compiled kernel on a GPU: correctness over shapes, M, group sizes
and dtypes, then a few timings against cuBLAS. Prints one line per case; exits 1 on a failure.

    python benchmarks/kernel_check.py [--quick] [--time]

The full side-by-side benchmark (vLLM's kernels too) is benchmarks/kernel_bench.py.
"""

from __future__ import annotations

import argparse
import sys

import torch

from vllm_quick import layout, ops

SHAPES = {  # name: (K, N)
    "l2-7b.qkv": (4096, 12288), "l2-7b.o": (4096, 4096), "l2-7b.gate_up": (4096, 22016),
    "l2-7b.down": (11008, 4096), "l2-13b.qkv": (5120, 15360), "l2-13b.down": (13824, 5120),
    "l2-70b.qkv": (8192, 10240), "l2-70b.gate_up": (8192, 57344), "l2-70b.down": (28672, 8192),
    "l3-8b.qkv": (4096, 6144), "l3-8b.gate_up": (4096, 28672), "l3-8b.down": (14336, 4096),
}
M_VALUES = (1, 2, 7, 16, 33, 64, 128, 255, 256, 1024, 4096)


def make_weights(k, n, group, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // group, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.001).half()
    qw, qz, sc = layout.awq_to_quick(layout.awq_pack(codes), layout.awq_pack(zeros), scales)
    w_ref = layout.dequantize(codes, zeros, scales).to(device)  # fp32 [K, N]
    return qw.to(device), qz.to(device), sc.to(device), w_ref


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def check(shapes, m_values, groups, dtypes, tol=2e-3) -> int:
    failures = 0
    for name, (k, n) in shapes.items():
        for group in groups:
            g = k if group == -1 else group
            qw, qz, sc, w_ref = make_weights(k, n, g, "cuda")
            for dtype in dtypes:
                for m in m_values:
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    ref = x.float() @ w_ref
                    y = ops.gemm(x, qw, qz, sc, None, g, n)
                    torch.cuda.synchronize()
                    err = rel_err(y, ref)
                    bad = not (err <= tol) or not torch.isfinite(y).all()
                    failures += bad
                    print(f"{'FAIL' if bad else 'ok  '} {name:15s} K={k:5d} N={n:5d} g={group:4d} "
                          f"{str(dtype)[6:]:8s} M={m:5d} rel_err={err:.2e}", flush=True)
            del qw, qz, sc, w_ref
            torch.cuda.empty_cache()
    return failures


def time_us(fn, iters=50):
    """Median-ish per-call time: a CUDA graph of `iters` calls, replayed 5 times."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(i)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return sorted(times)[len(times) // 2]


def timing(shapes, m_values, copies=8):
    print(f"{'shape':15s} {'M':>5s} {'quick us':>9s} {'cublas us':>9s} {'speedup':>7s}  plan")
    for name, (k, n) in shapes.items():
        ws = [make_weights(k, n, 128, "cuda", seed=i) for i in range(copies)]
        quick = [(qw, qz, sc) for qw, qz, sc, _ in ws]
        dense = [w.half() for *_, w in ws]
        del ws
        for m in m_values:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            tq = time_us(lambda i=0: ops.gemm(x, *quick[i % copies], None, 128, n))
            tc = time_us(lambda i=0: x @ dense[i % copies])
            plan = ops.kernel_extension().describe_plan(m, k, n, 128, False, 0)
            print(f"{name:15s} {m:5d} {tq:9.1f} {tc:9.1f} {tc / tq:7.2f}x  {list(plan)}", flush=True)

        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes and M only")
    ap.add_argument("--time", action="store_true", help="also time against cuBLAS")
    args = ap.parse_args()
    assert ops.kernel_extension() is not None, "vllm_quick._C is not built"
    print(torch.cuda.get_device_name(), torch.__version__)
    shapes = {k: SHAPES[k] for k in ("l2-7b.o", "l2-7b.down", "l3-8b.qkv")} if args.quick else SHAPES
    m_values = (1, 7, 16, 33, 64, 255, 1024) if args.quick else M_VALUES
    failures = check(shapes, m_values, (128,), (torch.float16, torch.bfloat16))
    failures += check({"l2-7b.o": (4096, 4096), "odd": (256, 200)}, (1, 16, 33, 100),
                      (32, 64, -1), (torch.float16, torch.bfloat16))
    if args.time:
        timing({k: SHAPES[k] for k in ("l2-7b.qkv", "l2-7b.o", "l2-7b.down", "l3-8b.gate_up")},
               (1, 16, 32, 64, 128, 256, 1024, 4096))
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
