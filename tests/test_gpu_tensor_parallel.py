"""Tensor parallelism on two GPUs (issue 6): the demo model served with
``--tensor-parallel-size 2 --quantization quick`` gives the same greedy tokens as one GPU.

Two servers of the demo model (fp16, vLLM's defaults: torch.compile + CUDA graphs), one after
another: TP = 1 and TP = 2. At TP = 2 every quantised layer is sharded by vLLM's own loaders
(qkv / gate_up column-parallel, o_proj / down_proj row-parallel at group boundaries) and each
rank interleaves its own shard; the demo's sizes give every rank whole 64-column tiles and whole
groups (hidden 256, 4 query / 2 KV heads of 64, MLP 512, group 64). The CPU side of the same
sharding is tests/test_tensor_parallel.py.

NVLink multicast stays off (the GPU machines share their NVLink fabric; a multicast object can
take it down): NCCL, torch symmetric memory and NVSHMEM are told so, and vLLM's symmetric-memory
all-reduce, which would use multicast on Hopper, is disabled. vLLM then all-reduces with its
custom CUDA all-reduce or NCCL.

Skipped without two CUDA GPUs.
"""

from __future__ import annotations

import pytest
import torch

from _demo_prompts import MAX_TOKENS, PROMPTS

from vllm_quick import ops
from vllm_quick.serve_demo import VllmServer, complete

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]

STARTUP_TIMEOUT_S = 600.0  # torch.compile + graph capture, per rank
TOP_LOGPROBS = 2  # kept so that a failure shows how close the two candidates were

# Keep NVLink multicast off everywhere a server process might reach it (see the docstring).
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
}


@pytest.fixture(scope="module")
def gpu_demo_model(tmp_path_factory):
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    if ops.kernel_extension() is None:
        pytest.fail("CUDA is available but vllm_quick._C is not built: build it (pip install -e .)")
    from vllm_quick.demo_model import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("gpu-tp-demo") / "demo-awq")


def greedy_run(model_dir, log_path, tensor_parallel_size: int) -> dict:
    """Greedy tokens (and their top logprobs) of the demo prompts from one server."""
    server = VllmServer(model_dir, dtype="float16", log_path=log_path, enforce_eager=False,
                        extra_args=["--tensor-parallel-size", str(tensor_parallel_size)],
                        env={"VLLM_DISABLE_COMPILE_CACHE": "1", **NO_MULTICAST_ENV},
                        startup_timeout=STARTUP_TIMEOUT_S)
    with server:
        out = complete(server, PROMPTS, max_tokens=MAX_TOKENS, logprobs=TOP_LOGPROBS,
                       return_tokens_as_token_ids=True)
    choices = sorted(out["choices"], key=lambda c: c["index"])
    return {
        "ids": [[int(t.split(":", 1)[1]) for t in c["logprobs"]["tokens"]] for c in choices],
        "top": [c["logprobs"]["top_logprobs"] for c in choices],
        "log": log_path.read_text(errors="replace"),
    }


@pytest.fixture(scope="module")
def runs(gpu_demo_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gpu-tp-logs")
    return {tp: greedy_run(gpu_demo_model, logs / f"tp{tp}.log", tp) for tp in (1, 2)}


def first_difference(a: dict, b: dict) -> str:
    """Where two runs' greedy tokens part, with both runs' top logprobs there."""
    for p, (x, y) in enumerate(zip(a["ids"], b["ids"])):
        for i, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return (f"prompt {p} ({PROMPTS[p]!r}) token {i}: TP=1 {s} vs TP=2 {t}; "
                        f"top logprobs TP=1 {a['top'][p][i]}, TP=2 {b['top'][p][i]}")
    return "token lists differ in length"


def quick_lines(log: str) -> list[str]:
    """The dispatch lines the quick method logs once per model in each process that builds it."""
    return [line for line in log.splitlines() if "quick: " in line and "float16" in line]


def test_servers_ran_quick_at_both_sizes(runs):
    for tp, run in runs.items():
        assert quick_lines(run["log"]), f"TP={tp}: the quick method's dispatch line is not in the server log"
        assert all(len(ids) == MAX_TOKENS for ids in run["ids"]), f"TP={tp}: short outputs"
    # At TP = 2 vLLM builds the model in one worker process per rank: two dispatch lines.
    assert len(quick_lines(runs[2]["log"])) >= 2, quick_lines(runs[2]["log"])


def test_tensor_parallel_2_equals_1(runs):
    assert runs[2]["ids"] == runs[1]["ids"], first_difference(runs[1], runs[2])

