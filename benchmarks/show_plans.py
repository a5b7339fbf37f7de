#!/usr/bin/env python3
"""Print how the QUICK kernel cuts up each layer shape at each M on this GPU (``vllm_quick._C.plan``):
tile, blocks, K splits, and whether the splits reduce in a thread-block cluster (sm_90), with
the clusters the GPU holds at once. For benchmark notes; needs the built extension and a GPU.

    python benchmarks/show_plans.py --tiles s16m,s32m,w64x --m 1,16,32,64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import kernel_bench, vllm_kernels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", default="s16m,s32m,x16,w64x", help="comma-separated tile names")
    parser.add_argument("--m", default="1,16,32,64", help="comma-separated M values")
    parser.add_argument("--bf16", action="store_true", help="plan for bf16 activations")
    args = parser.parse_args()

    from vllm_quick import ops

    ext = ops.kernel_extension()
    if ext is None:
        sys.exit("vllm_quick._C is not built (or there is no GPU)")
    # whole tiles: the ws tiles' blocks before their stream-K blocks (quick_stream_k.cuh), which
    # share out sk tiles (splits: the most pieces of one); the mma.sync and w tiles split every
    # tile, so whole tiles is 0 for them
    print("| shape | K x N | tile | M | blocks | whole tiles | sk tiles | sk blocks | splits | cluster | max clusters |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, k, n in kernel_bench.SHAPES:
        for tile in args.tiles.split(","):
            for m in (int(v) for v in args.m.split(",")):
                p = ext.plan(m, k, n, 128, args.bf16, vllm_kernels.KERNEL_TILES.index(tile))
                print(f"| {name} | {k}x{n} | {tile} | {m} | {p['blocks']} | {p['dp_blocks']} | {p['sk_tiles']} | "
                      f"{p['sk_blocks']} | {p['splits']} | {'yes' if p['cluster_reduce'] else 'no'} | {p['max_active_clusters']} |")


if __name__ == "__main__":
    main()
