"""Run one quick::gemm case a few times, for profilers (ncu, compute-sanitizer).

    python benchmarks/profile_case.py K N M [float16|bfloat16] [group_size] [iters]
"""

import sys

import torch

from vllm_quick import ops
from benchmarks.kernel_check import make_weights  # noqa: E402


def main() -> None:
    k, n, m = (int(a) for a in sys.argv[1:4])
    dtype = getattr(torch, sys.argv[4]) if len(sys.argv) > 4 else torch.float16
    group = int(sys.argv[5]) if len(sys.argv) > 5 else 128
    iters = int(sys.argv[6]) if len(sys.argv) > 6 else 5
    g = k if group == -1 else group
    qw, qz, sc, w_ref = make_weights(k, n, g, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    for _ in range(iters):
        y = ops.gemm(x, qw, qz, sc, None, g, n)
    torch.cuda.synchronize()
    err = ((y.float() - x.float() @ w_ref).norm() / (x.float() @ w_ref).norm()).item()
    print(f"K={k} N={n} M={m} {dtype} g={group}: rel_err={err:.2e}")


if __name__ == "__main__":
    main()
