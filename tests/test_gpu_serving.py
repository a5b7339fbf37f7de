"""GPU serving checks (issue 5): the QUICK method under vLLM's default compilation and CUDA
graphs gives the same greedy tokens as eager mode, and the kernel gives the same greedy tokens as
the reference path. Runs on a CUDA machine with the compiled extension; skipped elsewhere.

Three servers of the demo model (fp16), one after another:

* ``graphs``: vLLM's defaults (torch.compile + CUDA-graph capture): ``quick::gemm`` must choose
  its path inside the op at run time, or the decode steps would replay whatever was traced;
* ``eager``: ``--enforce-eager``;
* ``reference``: ``--enforce-eager`` with ``VLLM_QUICK_FORCE_REFERENCE=1`` (dequantise in fp32 +
  matmul instead of the kernel).

Prompts are sent together, so decode steps run with M = 4 and prefill with M = all prompt tokens.
"""

from __future__ import annotations

import pytest
import torch

from _demo_prompts import MAX_TOKENS, PROMPTS

from vllm_quick import ops
from vllm_quick.serve_demo import VllmServer, complete

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]

STARTUP_TIMEOUT_S = 600.0  # torch.compile + graph capture of a fresh server


@pytest.fixture(scope="module")
def gpu_demo_model(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if ops.kernel_extension() is None:
        pytest.fail("CUDA is available but vllm_quick._C is not built: build it (pip install -e .)")
    from vllm_quick.demo_model import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("gpu-demo") / "demo-awq")


def greedy_token_ids(model_dir, log_path, *, enforce_eager: bool, env: dict | None = None) -> list[list[int]]:
    server = VllmServer(model_dir, dtype="float16", log_path=log_path, enforce_eager=enforce_eager,
                        env={"VLLM_DISABLE_COMPILE_CACHE": "1", **(env or {})},
                        startup_timeout=STARTUP_TIMEOUT_S)
    with server:
        out = complete(server, PROMPTS, max_tokens=MAX_TOKENS, logprobs=1, return_tokens_as_token_ids=True)
    return [[int(t.split(":", 1)[1]) for t in c["logprobs"]["tokens"]] for c in sorted(out["choices"], key=lambda c: c["index"])]


@pytest.fixture(scope="module")
def runs(gpu_demo_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gpu-serve-logs")
    return {
        "graphs": greedy_token_ids(gpu_demo_model, logs / "graphs.log", enforce_eager=False),
        "eager": greedy_token_ids(gpu_demo_model, logs / "eager.log", enforce_eager=True),
        "reference": greedy_token_ids(gpu_demo_model, logs / "reference.log", enforce_eager=True,
                                      env={ops.FORCE_REFERENCE_ENV: "1"}),
    }


def test_cuda_graphs_and_compile_equal_eager(runs):
    assert all(len(ids) == MAX_TOKENS for ids in runs["eager"])
    assert runs["graphs"] == runs["eager"]


def test_kernel_equals_reference_path(runs):
    assert runs["eager"] == runs["reference"]
