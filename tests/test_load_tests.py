"""load_tests/: the locustfile, the headless sweep and its report.

* Unit tests (no server): loopback-only targets, the SSE reader's success/failure rules, the
  metrics, the report and ``--merge``.
* Against the CPU demo server (``demo_server`` in conftest.py, shared with
  test_malformed_requests.py): a short sweep (concurrency 1 and 4, few requests, 8 output tokens)
  with the ``vllm bench serve`` cross-check, a chat run, and the outputs checked for sane values.
* Refusals: the runner and the locustfile refuse non-loopback targets before sending anything.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from load_tests import report, workload
from load_tests import run_load as runner
from load_tests.workload import RequestRecord, StreamReader, TargetNotAllowed, require_loopback

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_load(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "load_tests.run_load", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "127.0.0.1:8000", "http://localhost:9",
                                 "http://127.3.4.5:8000/", "https://[::1]:8443", "HTTP://LOCALHOST:1"])
def test_loopback_targets_allowed(url):
    base = require_loopback(url)
    assert base.startswith(("http://", "https://")) and not base.endswith("/")


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000", "http://192.168.1.10:8000", "http://172.16.0.1",
                                 "http://8.8.8.8", "http://0.0.0.0:8000", "http://example.com",
                                 "http://127.0.0.1.nip.io:8000", "http://[::ffff:10.0.0.1]:80",
                                 "ftp://127.0.0.1/", "", None])
def test_other_targets_refused(url):
    with pytest.raises(TargetNotAllowed):
        require_loopback(url)


def test_runner_refuses_non_loopback_url(tmp_path):
    r = run_load("--url", "x=http://10.1.2.3:8000", "--out-dir", str(tmp_path), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refusing to send load to 'http://10.1.2.3:8000'" in r.stderr
    assert not list(tmp_path.iterdir()), "nothing may be written (or sent) for a refused target"


def test_runner_refuses_config_bound_elsewhere(tmp_path):
    bad = tmp_path / "public.yaml"
    bad.write_text((REPO / "serving_configs" / "cpu_demo.yaml").read_text().replace("host: 127.0.0.1",
                                                                                     "host: 0.0.0.0"))
    r = run_load("--serve", str(bad), "--model", str(tmp_path), "--out-dir", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2 and "only loopback targets" in r.stderr, r.stderr


def test_runner_reports_a_server_that_does_not_answer(tmp_path):
    from vllm_quick.serve_demo import free_port

    r = run_load("--url", f"down=http://127.0.0.1:{free_port()}", "--concurrency", "1", "--requests", "1",
                 "--warmup-requests", "0", "--out-dir", str(tmp_path), "--stem", "down", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot prepare the workload" in r.stderr and "ConnectionError" in r.stderr
    meta = json.loads((tmp_path / "down.meta.json").read_text())
    assert meta["notes"] and json.loads((tmp_path / "down.json").read_text()) == []


@pytest.mark.parametrize("tp", [1, 2])
def test_config_server_command_carries_tensor_parallel_size(tmp_path, tp):
    from load_tests.run_load import server_for, target_from_config

    target = target_from_config(str(REPO / "serving_configs" / "llama3_8b_quick.yaml"), None, str(tmp_path))
    cmd = server_for(target, tmp_path, 60.0, tensor_parallel_size=tp).cmd
    assert cmd[cmd.index("--config") + 1].endswith("llama3_8b_quick.yaml")
    if tp == 1:
        assert "--tensor-parallel-size" not in cmd
    else:
        assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"


@pytest.mark.parametrize("args, error", [
    (["--serve", "serving_configs/cpu_demo.yaml", "--tensor-parallel-size", "0"], "positive integer"),
    (["--url", "x=http://127.0.0.1:9", "--tensor-parallel-size", "2"], "applies to --serve servers"),
])
def test_runner_refuses_bad_tensor_parallel_size(tmp_path, args, error):
    r = run_load(*args, "--model", str(tmp_path), "--out-dir", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2 and error in r.stderr, r.stderr


def test_locustfile_refuses_non_loopback_host(tmp_path):
    r = subprocess.run([sys.executable, "-m", "locust", "-f", str(REPO / "load_tests" / "locustfile.py"),
                        "--headless", "-u", "1", "-r", "1", "--run-time", "5s", "--host", "http://192.168.7.7:8000"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "refusing to send load to 'http://192.168.7.7:8000'" in r.stderr + r.stdout


# ----------------------------------------------------------------------------------------------
# stream reader, metrics, report (no server)
# ----------------------------------------------------------------------------------------------
def sse(*events: dict | str) -> list[bytes]:
    lines = []
    for e in events:
        lines.append(b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e, separators=(",", ":")).encode()))
        lines.append(b"")
    return lines


def read(lines: list[bytes], expected: int = 3) -> RequestRecord:
    rec = RequestRecord(endpoint="completions", start=1000.0)
    reader = StreamReader(rec, expected)
    for i, line in enumerate(lines):
        reader.feed(line, now=10.0 + 0.1 * i, sent=10.0)
    return reader.finish()


TOKEN = {"choices": [{"index": 0, "text": "a", "finish_reason": None}]}
USAGE3 = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def test_stream_reader_complete_stream():
    rec = read(sse(TOKEN, TOKEN, TOKEN, USAGE3, "[DONE]"))
    assert rec.ok and rec.error is None
    assert rec.ttft_s == pytest.approx(0.0)  # first line at now=10.0
    assert rec.latency_s == pytest.approx(0.6)  # the usage event (line 6) arrived at 10.6
    assert (rec.prompt_tokens, rec.output_tokens, rec.events) == (7, 3, 4)
    assert rec.tpot_s == pytest.approx(0.3)  # (0.6 - 0.0) / (3 - 1)


@pytest.mark.parametrize("lines, error", [
    (sse(TOKEN, TOKEN, TOKEN, USAGE3), "without [DONE]"),
    (sse(TOKEN, TOKEN, TOKEN, "[DONE]"), "no usage"),
    (sse(TOKEN, {"choices": [], "usage": {"completion_tokens": 1, "prompt_tokens": 7}}, "[DONE]"), "output length 1"),
    (sse(USAGE3, "[DONE]"), "no token"),
    (sse({"error": {"message": "boom", "code": 500}}, "[DONE]"), "error event"),
])
def test_stream_reader_failures(lines, error):
    rec = read(lines)
    assert not rec.ok and error in rec.error
    assert rec.tpot_s is None


class FakeTokenizer:
    """``post(path, body)`` of a server whose tokenizer knows ``known`` (word -> id) and maps other
    words to id 0; records the requests."""

    def __init__(self, known: dict[str, int]):
        self.known, self.calls = known, []

    def __call__(self, path, body):
        self.calls.append((path, body))
        assert path == "/tokenize"
        if "messages" in body:  # a template of 5 tokens around the one-word message
            return {"tokens": [1, 2, 3] + [self.known.get(body["messages"][0]["content"], 0)] + [4, 5]}
        return {"tokens": [self.known.get(w, 0) for w in body["prompt"].split()]}


def test_token_pool_from_the_server_tokenizer():
    fake = FakeTokenizer({w: 100 + i for i, w in enumerate(workload.SEED_WORDS)})
    pool = workload.build_token_pool(fake, "m", "auto", "completions")
    assert len(pool.ids) == len(set(workload.SEED_WORDS)) and [c[0] for c in fake.calls] == ["/tokenize"]
    import random

    prompt = pool.completion_prompt(512, random.Random(0))
    assert len(prompt) == 512 and set(prompt) <= set(pool.ids)
    assert prompt != pool.completion_prompt(512, random.Random(1))  # no shared prompts to cache


def test_token_pool_explicit_range_needs_no_request():
    fake = FakeTokenizer({})
    pool = workload.build_token_pool(fake, "m", "0:128000", "completions")
    assert fake.calls == [] and pool.ids == list(range(128000))


def test_token_pool_refuses_a_tokenizer_that_knows_no_seed_word():
    with pytest.raises(ValueError, match="--token-ids LOW:HIGH"):
        workload.build_token_pool(FakeTokenizer({}), "m", "auto", "completions")


def test_token_pool_chat_calibration():
    import random

    pool = workload.build_token_pool(FakeTokenizer({}), "m", "0:1000", "chat")
    assert (pool.tokens_per_word, pool.chat_overhead_tokens) == (1.0, 5)
    assert len(pool.chat_prompt(40, random.Random(0)).split()) == 35


def test_percentile_and_summary():
    assert workload.percentile([], 50) is None
    assert workload.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert workload.percentile(list(range(101)), 99) == pytest.approx(99.0)
    recs = [RequestRecord("completions", start=100.0 + i, ok=True, ttft_s=0.1 * (i + 1), latency_s=1.0 + 0.1 * i,
                          prompt_tokens=8, output_tokens=11) for i in range(4)]
    recs.append(RequestRecord("completions", start=100.5, ok=False, latency_s=0.2, error="HTTP 500: x"))
    row = workload.summarize("s", 4, recs)
    assert tuple(row) == workload.ROW_KEYS
    assert (row["requests"], row["failed"]) == (5, 1)
    # 4 x 11 tokens over [100.0, 103 + 1.3]
    assert row["output_tok_s"] == pytest.approx(44 / 4.3, rel=1e-3)
    assert row["ttft_ms_p50"] == pytest.approx(250.0)
    assert row["tpot_ms_p50"] == pytest.approx(1000 * (1.15 - 0.25) / 10, rel=1e-3)
    details = workload.step_details(recs)
    assert details["errors"] == {"HTTP 500: x": 1} and details["output_tokens"] == 44


def test_unfinished_requests_count_as_failed():
    from load_tests.run_load import step_row

    recs = [RequestRecord("completions", start=1.0, ok=True, ttft_s=0.1, latency_s=1.0, output_tokens=4)]
    row = step_row("s", 2, 8, recs)
    assert (row["requests"], row["failed"]) == (8, 7)


def fake_rows(server: str, scale: float) -> list[dict]:
    return [workload.summarize(server, c, [
        RequestRecord("completions", start=0.0, ok=True, ttft_s=0.05, latency_s=1.0 / scale, output_tokens=16)
        for _ in range(c)]) for c in (1, 16, 64)]


def test_report_and_merge(tmp_path):
    meta = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-25 12:00 UTC", "versions": {"vllm": "0.26.0"},
            "command": "python -m load_tests.run_load ...", "server_order": ["quick", "awq"],
            "settings": {"prompt_tokens": 512, "output_tokens": 16}}
    a = report.write_all(fake_rows("quick", 2.0), {**meta, "server_order": ["quick"]}, tmp_path / "a", "serving_h100")
    b = report.write_all(fake_rows("awq", 1.0), {**meta, "server_order": ["awq"]}, tmp_path / "b", "serving_h100")
    assert a["png"].read_bytes()[:8] == PNG_MAGIC
    r = run_load("--merge", str(a["json"]), str(b["json"]), "--out-dir", str(tmp_path / "m"), timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "m" / "serving_h100.json").read_text())
    assert [(x["server"], x["concurrency"]) for x in rows] == [("quick", 1), ("quick", 16), ("quick", 64),
                                                               ("awq", 1), ("awq", 16), ("awq", 64)]
    md = (tmp_path / "m" / "serving_h100.md").read_text()
    assert "| concurrency | quick | awq |" in md
    assert "| quick / awq |" in md and "| 16 | 2.00x |" in md
    assert "- device: NVIDIA H100 80GB HBM3" in md and "merged from" in md
    assert (tmp_path / "m" / "serving_h100.png").read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------------------------
# against the CPU demo server
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(demo_server, demo_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    r = run_load("--url", f"demo={demo_server.url}", "--concurrency", "1,4", "--requests-per-user", "2",
                 "--prompt-tokens", "48", "--output-tokens", "8", "--warmup-requests", "2",
                 "--crosscheck", "demo:4", "--crosscheck-tokenizer", str(demo_model_dir), "--soak", "demo:6:3",
                 "--out-dir", str(out), "--stem", "serving_test")
    print(r.stdout[-3000:], r.stderr[-3000:])
    return r, out


@pytest.mark.e2e
def test_sweep_exit_code_and_table(sweep):
    r, _ = sweep
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| concurrency | demo |" in r.stdout


@pytest.mark.e2e
def test_sweep_rows_are_sane(sweep):
    _, out = sweep
    rows = json.loads((out / "serving_test.json").read_text())
    assert [(x["server"], x["concurrency"]) for x in rows] == [("demo", 1), ("demo", 4)]
    for row in rows:
        assert tuple(row) == workload.ROW_KEYS
        assert row["requests"] == 2 * row["concurrency"] and row["failed"] == 0
        assert row["output_tok_s"] > 0
        assert 0 < row["ttft_ms_p50"] <= row["ttft_ms_p99"] < 60_000
        assert 0 < row["tpot_ms_p50"] <= row["tpot_ms_p99"] < 60_000


def test_each_step_draws_its_own_prompts():
    """Steps of one server get distinct prompt seeds (a later step must not replay an earlier step's
    prompts into vLLM's prefix cache), the same step gets the same seed on every server, and the
    base seed moves them all."""
    steps = ["warmup", "c1", "c16", "c64", "c256", "soak2000_c256", "crosscheck_c64"]
    seeds = [runner.step_seed(0, s) for s in steps]
    assert len(set(seeds)) == len(steps) and all(0 <= x < 2**31 for x in seeds)
    assert seeds == [runner.step_seed(0, s) for s in steps]
    assert all(runner.step_seed(1, s) != x for s, x in zip(steps, seeds))


def test_run_step_passes_the_step_seed_to_locust(tmp_path, monkeypatch):
    """run_step hands locust the step's own seed and records it among the step's facts."""
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    args = runner.parse_args(["--url", "demo=http://127.0.0.1:1", "--seed", "7"])
    records, facts = runner.run_step("http://127.0.0.1:1", 4, 8, args, tmp_path / "demo_c4", "c4")
    cmd = seen["cmd"]
    assert cmd[cmd.index("--seed") + 1] == str(runner.step_seed(7, "c4")) == str(facts["seed"])
    assert records == [] and facts["finished"] == 0 and facts["planned"] == 8


@pytest.mark.e2e
def test_sweep_step_files(sweep):
    _, out = sweep
    steps = out / "serving_test_steps"
    meta = json.loads((out / "serving_test.meta.json").read_text())
    seeds = [step["seed"] for step in meta["steps"]]
    assert len(seeds) == 2 and len(set(seeds)) == 2, meta["steps"]  # c1 and c4 draw different prompts
    for conc in (1, 4):
        records = [RequestRecord.from_json(x) for x in (steps / f"demo_c{conc}_requests.jsonl").read_text().split("\n") if x]
        assert len(records) == 2 * conc and all(r.ok for r in records)
        assert {r.prompt_tokens for r in records} == {48} and {r.output_tokens for r in records} == {8}
        with open(steps / f"demo_c{conc}_stats.csv") as f:
            stats = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
        for kind in ("POST", "TTFT", "TPOT"):
            row = stats[(kind, "/v1/completions")]
            assert int(row["Request Count"]) == 2 * conc and int(row["Failure Count"]) == 0
        # locust's POST time is the whole stream, so it is at least the TTFT
        assert float(stats[("POST", "/v1/completions")]["Average Response Time"]) >= float(
            stats[("TTFT", "/v1/completions")]["Average Response Time"])


@pytest.mark.e2e
def test_sweep_report_files(sweep):
    _, out = sweep
    png = (out / "serving_test.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    md = (out / "serving_test.md").read_text()
    for line in ("- device: ", "- date: ", "- versions: python ", "- command: `python -m load_tests.run_load --url demo="):
        assert line in md
    assert "vllm " in md.split("- versions:")[1].split("\n")[0]
    assert "| demo | 4 | 8 | 0 |" in md
    meta = json.loads((out / "serving_test.meta.json").read_text())
    assert meta["servers"]["demo"]["vllm_version"]
    assert [s["finished"] for s in meta["steps"]] == [2, 8]


@pytest.mark.e2e
def test_crosscheck_with_vllm_bench_serve(sweep):
    _, out = sweep
    meta = json.loads((out / "serving_test.meta.json").read_text())
    [check] = meta["crosscheck"]
    assert "error" not in check, check.get("error")
    assert check["bench"]["completed"] == 8 and check["bench"]["output_tok_s"] > 0
    assert check["ours"]["concurrency"] == 4
    assert "vllm bench serve" in (out / "serving_test.md").read_text().replace("`vllm bench serve`", "vllm bench serve")


@pytest.mark.e2e
def test_soak_step(sweep):
    _, out = sweep
    [soak] = json.loads((out / "serving_test.meta.json").read_text())["soak"]
    assert (soak["server"], soak["concurrency"], soak["requests"], soak["failed"]) == ("demo", 3, 6, 0)
    assert soak["finished"] == 6 and soak["output_tokens"] == 6 * 8
    rows = json.loads((out / "serving_test.json").read_text())
    assert len(rows) == 2, "the soak step is reported apart from the sweep rows"
    assert "## Soak" in (out / "serving_test.md").read_text()


@pytest.mark.e2e
def test_chat_endpoint(demo_server, tmp_path):
    r = run_load("--url", f"demo={demo_server.url}", "--endpoint", "chat", "--concurrency", "2",
                 "--requests", "3", "--prompt-tokens", "40", "--output-tokens", "6", "--warmup-requests", "0",
                 "--out-dir", str(tmp_path), "--stem", "chat")
    assert r.returncode == 0, r.stdout + r.stderr
    [row] = json.loads((tmp_path / "chat.json").read_text())
    assert (row["requests"], row["failed"]) == (3, 0) and row["tpot_ms_p50"] > 0
    records = [RequestRecord.from_json(x) for x in (tmp_path / "chat_steps" / "demo_c2_requests.jsonl")
               .read_text().split("\n") if x]
    assert {r.endpoint for r in records} == {"chat"}
    # random words through the chat template: about the asked length (the demo's byte-level BPE
    # gives 1-6 tokens a word; 2,000 random prompts of this size measured 26-59 tokens)
    assert all(20 <= r.prompt_tokens <= 70 for r in records), [r.prompt_tokens for r in records]


@pytest.mark.e2e
def test_server_still_up_after_load(demo_server):
    assert demo_server.server.proc.poll() is None


@pytest.mark.parametrize("tp", [1, 2])
def test_report_header_names_tensor_parallel_runs(tp):
    meta = {"device": "GPU", "settings": {"prompt_tokens": 512, "tensor_parallel_size": tp}}
    header = "\n".join(report.header_lines(meta))
    assert ("--tensor-parallel-size 2" in header) == (tp == 2)
