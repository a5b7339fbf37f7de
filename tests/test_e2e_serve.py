"""End to end: a real ``vllm serve --quantization quick`` on the CPU, compared with the same model
dequantised to a plain fp32 checkpoint and served without quantisation.

One server runs at a time. Each server is started once (module-scoped fixture), answers every
request the tests need, and is stopped - its whole process group - before the next one starts,
whatever happens. The requests:

* a batch of greedy completions with ``logprobs`` and ``return_tokens_as_token_ids``, so the
  generated token ids can be compared one for one between the two servers;
* a streamed completion (server-sent events), which must reproduce the non-streamed text;
* a streamed chat completion through the demo model's chat template.

Both servers compute in fp32 with the same dequantised weights, so their greedy tokens must be
identical. (Their logits are not bit-identical: vLLM's unquantised CPU linears run oneDNN on a
pre-packed weight, the QUICK reference op runs ``torch.nn.functional.linear``; the test reports
the largest log-probability difference and bounds it.)
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from _demo_prompts import MAX_TOKENS, PROMPTS

from vllm_quick.serve_demo import VllmServer, complete, port_is_open, process_group_exists

pytestmark = pytest.mark.e2e

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
LOGPROB_TOLERANCE = 1e-3


def stream_events(server: VllmServer, path: str, body: dict) -> list[dict]:
    """POST with ``stream: true``; returns the decoded ``data:`` events (``[DONE]`` must end it)."""
    events, done = [], False
    with requests.post(server.url + path, json={**body, "stream": True}, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text[:2000]
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                break
            events.append(json.loads(payload))
    assert done, "stream ended without [DONE]"
    return events


def exercise(server: VllmServer) -> dict:
    """Every request the tests look at, against one running server."""
    out: dict = {"startup_s": server.startup_seconds, "port": server.port}
    t0 = time.monotonic()
    out["batch"] = complete(server, PROMPTS, max_tokens=MAX_TOKENS, logprobs=1, return_tokens_as_token_ids=True)
    out["single"] = complete(server, PROMPTS[0], max_tokens=MAX_TOKENS)
    out["stream"] = stream_events(
        server, "/v1/completions",
        {"model": server.model_name, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0},
    )
    out["chat_stream"] = stream_events(
        server, "/v1/chat/completions",
        {"model": server.model_name, "messages": CHAT, "max_tokens": 16, "temperature": 0.0},
    )
    out["requests_s"] = time.monotonic() - t0
    out["log"] = server.log_path.read_text(errors="replace")
    return out


def run_server(model_dir, log_path, quantization) -> dict:
    """Start a server, run :func:`exercise`, stop it (also on errors), check it is gone."""
    server = VllmServer(model_dir, quantization=quantization, dtype="float32", log_path=log_path)
    with server:
        pgid = server.proc.pid  # the server leads its own process group (start_new_session)
        results = exercise(server)
    results.update(port_open_after_stop=port_is_open(server.port), group_alive_after_stop=process_group_exists(pgid))
    print(f"\n[e2e] {quantization or 'unquantised'} server: ready in {results['startup_s']:.1f} s, "
          f"requests {results['requests_s']:.1f} s")
    return results


@pytest.fixture(scope="module")
def quick_run(demo_model_dir, tmp_path_factory):
    return run_server(demo_model_dir, tmp_path_factory.mktemp("logs") / "quick.log", "quick")


@pytest.fixture(scope="module")
def plain_run(demo_model_dir, tmp_path_factory, quick_run):  # after quick_run: one server at a time
    from vllm_quick.dequantize import dequantize_checkpoint

    plain = dequantize_checkpoint(demo_model_dir, tmp_path_factory.mktemp("plain") / "demo-fp32", "float32",
                                  progress=False)
    return run_server(plain, tmp_path_factory.mktemp("logs") / "plain.log", None)


def token_ids(choice) -> list[int]:
    tokens = choice["logprobs"]["tokens"]
    assert all(t.startswith("token_id:") for t in tokens), tokens[:3]
    return [int(t.split(":", 1)[1]) for t in tokens]


# ----------------------------------------------------------------------------------------------
def test_quick_server_used_the_quick_method(quick_run):
    assert "quantization=quick" in quick_run["log"]


def test_quick_completion(quick_run):
    choices = sorted(quick_run["batch"]["choices"], key=lambda c: c["index"])
    assert len(choices) == len(PROMPTS)
    for c in choices:
        assert c["finish_reason"] in ("length", "stop")
        assert len(token_ids(c)) >= 1
    assert quick_run["batch"]["usage"]["completion_tokens"] == sum(len(token_ids(c)) for c in choices)
    # a prompt alone gives the same greedy text as inside the batch
    assert quick_run["single"]["choices"][0]["text"] == choices[0]["text"]


def test_quick_streamed_completion(quick_run):
    events = quick_run["stream"]
    assert len(events) > 1, "expected several chunks"
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == quick_run["single"]["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop") or any(
        c.get("finish_reason") for e in events for c in e["choices"]
    )


def test_quick_streamed_chat(quick_run):
    events = quick_run["chat_stream"]
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert deltas[0].get("role") == "assistant"
    content = "".join(d.get("content") or "" for d in deltas)
    assert content, "empty chat answer"
    assert any(c.get("finish_reason") in ("length", "stop") for e in events for c in e["choices"])


def test_greedy_tokens_identical_to_dequantized_model(quick_run, plain_run):
    quick = sorted(quick_run["batch"]["choices"], key=lambda c: c["index"])
    plain = sorted(plain_run["batch"]["choices"], key=lambda c: c["index"])
    worst = 0.0
    for prompt, q, p in zip(PROMPTS, quick, plain):
        assert token_ids(q) == token_ids(p), f"greedy tokens differ for {prompt!r}"
        assert q["text"] == p["text"]
        diffs = [abs(a - b) for a, b in zip(q["logprobs"]["token_logprobs"], p["logprobs"]["token_logprobs"])]
        worst = max(worst, *diffs)
    print(f"\n[e2e] largest |logprob(quick) - logprob(unquantised)| over {len(PROMPTS)} prompts: {worst:.2e}")
    assert worst < LOGPROB_TOLERANCE
    assert quick_run["batch"]["usage"] == plain_run["batch"]["usage"]


def test_streamed_chat_identical_to_dequantized_model(quick_run, plain_run):
    def content(run):
        return "".join(c["delta"].get("content") or "" for e in run["chat_stream"] for c in e["choices"])

    assert content(quick_run) == content(plain_run)


def test_servers_are_gone_after_stop(quick_run, plain_run):
    for run in (quick_run, plain_run):
        assert not run["port_open_after_stop"], f"port {run['port']} still open"
        assert not run["group_alive_after_stop"], "a process of the server's group survived"


def test_cpu_demo_yaml_matches_the_demo_settings():
    """serving_configs/cpu_demo.yaml is the `vllm serve --config` form of serve_command()."""
    from pathlib import Path

    import yaml

    from vllm_quick.serve_demo import serve_command

    path = Path(__file__).resolve().parents[1] / "serving_configs" / "cpu_demo.yaml"
    from_yaml = yaml.safe_load(path.read_text())
    args = serve_command("demo_model", from_yaml["port"], quantization="quick", dtype="float32")
    args = args[args.index("serve") + 2:]  # drop "vllm serve demo_model"
    from_code: dict = {}
    for arg in args:
        if arg.startswith("--"):
            key = arg[2:]
            from_code[key] = True  # a flag, unless a value follows
        else:
            from_code[key] = arg
    assert {k: str(v) if not isinstance(v, bool) else v for k, v in from_yaml.items()} == from_code


def test_server_refuses_unsupported_checkpoint_at_start(demo_model_dir, tmp_path):
    """An AWQ "gemv" checkpoint: vllm serve --quantization quick stops at start-up, saying why."""
    import shutil

    bad = tmp_path / "gemv-model"
    shutil.copytree(demo_model_dir, bad, ignore=shutil.ignore_patterns("*.log"))
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (bad / "config.json").write_text(json.dumps(config))
    server = VllmServer(bad, quantization="quick", dtype="float32", log_path=tmp_path / "gemv.log",
                        startup_timeout=300)
    with pytest.raises(RuntimeError, match=r"exited with code"):
        with server:
            pass
    assert "AWQ version='gemv' is not supported; only gemm" in (tmp_path / "gemv.log").read_text()
    assert not port_is_open(server.port)
