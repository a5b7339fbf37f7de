"""Malformed requests get a 4xx, and the server keeps serving (issue 5, "under load, nothing lost").

Against the CPU demo server (``demo_server`` in conftest.py: ``vllm serve --config
serving_configs/cpu_demo.yaml``, max-model-len 512, quantization quick), shared with
test_load_tests.py. Every bad request must be answered with a client error (4xx) carrying an
OpenAI-style error body, never a 5xx, a hang or a dead engine; afterwards, and while good
streamed requests run at the same time, good requests still complete with exactly the asked
number of tokens.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytestmark = pytest.mark.e2e

MODEL = "quick-demo"
CONTEXT = 512  # max-model-len of cpu_demo.yaml
TIMEOUT = 120


def post(server, path: str, body: dict | None = None, raw: bytes | None = None) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(server.url + path, data=data, headers=headers, timeout=TIMEOUT)


def assert_client_error(r: requests.Response, *, expect: str | None = None) -> None:
    assert 400 <= r.status_code < 500, f"expected a 4xx, got {r.status_code}: {r.text[:500]}"
    body = r.json()
    message = json.dumps(body)
    assert "error" in body or "detail" in body, message[:500]
    if expect:
        assert expect in message, message[:500]


def good_streamed_completion(server, max_tokens: int = 6) -> int:
    """One streamed completion with a pinned length; returns the completion tokens reported."""
    body = {"model": MODEL, "prompt": "The QUICK kernel", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0}
    usage, done = None, False
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.text[:500]
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                payload = line[6:]
                if payload == b"[DONE]":
                    done = True
                    break
                usage = json.loads(payload).get("usage") or usage
    assert done and usage, "stream incomplete"
    return usage["completion_tokens"]


BAD_JSON = [
    ("/v1/completions", b'{"model": "quick-demo", "prompt": "hi", max_tokens: 3'),
    ("/v1/chat/completions", b'{"model": "quick-demo", "messages": [{"role": "user", "content": "hi"}'),
    ("/v1/completions", b"[1, 2"),
    ("/v1/completions", b"not json at all"),
]


@pytest.mark.parametrize("path, raw", BAD_JSON, ids=["completions-unquoted-key", "chat-truncated", "array",
                                                     "text"])
def test_bad_json_is_a_client_error(demo_server, path, raw):
    assert_client_error(post(demo_server, path, raw=raw))


@pytest.mark.parametrize("stream", [False, True])
def test_negative_max_tokens_completions(demo_server, stream):
    r = post(demo_server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1, "stream": stream})
    assert_client_error(r, expect="max_tokens")


def test_negative_max_tokens_chat(demo_server):
    r = post(demo_server, "/v1/chat/completions",
             {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5})
    assert_client_error(r, expect="max_tokens")


def test_prompt_longer_than_context_token_ids(demo_server):
    r = post(demo_server, "/v1/completions",
             {"model": MODEL, "prompt": list(range(10, 10 + CONTEXT + 88)), "max_tokens": 4})
    assert_client_error(r, expect="maximum context length")


def test_prompt_longer_than_context_text(demo_server):
    r = post(demo_server, "/v1/completions", {"model": MODEL, "prompt": "kernel " * 3000, "max_tokens": 4})
    assert_client_error(r, expect="context length")


def test_chat_longer_than_context(demo_server):
    r = post(demo_server, "/v1/chat/completions",
             {"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 4})
    assert_client_error(r, expect="context length")


@pytest.mark.parametrize("body, expect", [
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"model": MODEL, "max_tokens": 4}, "prompt"),
    ({"model": "no-such-model", "prompt": "hi", "max_tokens": 4}, "no-such-model"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": -1}, "temperature"),
], ids=["max_tokens-string", "no-prompt", "unknown-model", "negative-temperature"])
def test_other_invalid_requests(demo_server, body, expect):
    assert_client_error(post(demo_server, "/v1/completions", body), expect=expect)


def test_server_keeps_serving_during_and_after_bad_requests(demo_server):
    """Good streamed requests interleaved with bad ones, in parallel: every good one completes
    with its pinned length, every bad one gets a 4xx; then the server is still healthy."""
    bad_calls = [
        lambda: post(demo_server, "/v1/completions", raw=BAD_JSON[0][1]),
        lambda: post(demo_server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}),
        lambda: post(demo_server, "/v1/completions", {"model": MODEL, "prompt": list(range(10, 700)),
                                                     "max_tokens": 4}),
        lambda: post(demo_server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
                     "content": "word " * 3000}], "max_tokens": 4}),
    ] * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        good = [pool.submit(good_streamed_completion, demo_server, 6) for _ in range(6)]
        bad = [pool.submit(call) for call in bad_calls]
        assert [f.result() for f in good] == [6] * 6
        for f in bad:
            assert_client_error(f.result())
    assert requests.get(demo_server.url + "/health", timeout=TIMEOUT).status_code == 200
    assert good_streamed_completion(demo_server, 5) == 5
    assert demo_server.server.proc.poll() is None, "the server process exited"
    log = demo_server.log_path.read_text(errors="replace")
    assert "EngineDeadError" not in log and "Traceback" not in log, log[-3000:]
