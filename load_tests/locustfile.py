"""Locust users for vLLM's OpenAI-compatible API: streamed ``/v1/completions`` and
``/v1/chat/completions`` with a pinned output length, TTFT and TPOT as custom events.

Each user is a closed loop: it sends one streamed request, reads the stream to its end, and sends
the next (no wait), so ``-u C`` users keep C requests in flight, like ``vllm bench serve
--max-concurrency C``. Every request asks for exactly ``--output-tokens`` tokens (``max_tokens``
+ ``ignore_eos``) and for usage in the last event (``stream_options.include_usage``); a stream
that is cut short, has no usage or the wrong length counts as a failure.

What locust records per request (see ``workload.py`` for the definitions):

* ``POST /v1/completions`` (or chat): response time = the whole stream, not just the headers;
* ``TTFT <path>``: time to first token; ``TPOT <path>``: time per output token (custom events,
  ``request_type`` "TTFT" / "TPOT", so they appear as their own rows in locust's stats and CSVs).

``--stats-csv PREFIX`` writes locust's stats and failures tables once the test is over (complete,
unlike ``--csv``, which locust rewrites once a second and does not update at the very end).

Exact per-request values (locust rounds its histogram) go to ``--records-out`` as JSON lines;
``run_load.py`` turns them into the result rows. Targets must be loopback (127.0.0.0/8, ::1,
localhost): anything else is refused before a request is sent.

Stand-alone (the runner does the same per concurrency step)::

    locust -f load_tests/locustfile.py --headless -u 16 -r 16 --run-time 300s \\
        --host http://127.0.0.1:8000 --prompt-tokens 512 --output-tokens 128 \\
        --request-budget 64 --stats-csv results/c16 --records-out results/c16_requests.jsonl
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import gevent
from locust import HttpUser, constant, events, task

try:
    from load_tests import workload
except ImportError:  # `locust -f load_tests/locustfile.py` from elsewhere: import by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from load_tests import workload

DEFAULT_HOST = "http://127.0.0.1:8000"


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("vLLM OpenAI workload (load_tests/locustfile.py)")
    group.add_argument("--model", default="", help="served model name (default: the first of /v1/models)")
    group.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens")
    group.add_argument("--output-tokens", type=int, default=128, help="output length in tokens (pinned)")
    group.add_argument("--endpoint", choices=("completions", "chat", "mixed"), default="completions",
                       help="completions: token-id prompts of exact length; chat: word prompts through "
                            "the chat template (about --prompt-tokens long); mixed: each request picks one")
    group.add_argument("--token-ids", default="auto",
                       help="ordinary token ids to draw prompts from: LOW:HIGH, or auto (ids of plain "
                            "English words, from the server's /tokenize)")
    group.add_argument("--request-budget", type=int, default=0,
                       help="stop after this many requests have finished (0: run until --run-time)")
    group.add_argument("--records-out", default="", help="write one JSON line per request here at the end")
    group.add_argument("--stats-csv", default="", metavar="PREFIX",
                       help="write PREFIX_stats.csv and PREFIX_failures.csv (locust's columns) once the test "
                            "is over (locust's own --csv is rewritten only every second, so it can miss the end)")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--seed", type=int, default=0, help="seed of the prompt generator")
    group.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")


class _State:
    """Per-process test state: the prompt pool, the request budget, the records."""

    def __init__(self) -> None:
        self.reset(None)

    def reset(self, options) -> None:
        self.options = options
        self.pool: workload.TokenPool | None = None
        self.model = ""
        self.records: list[workload.RequestRecord] = []
        self.issued = 0
        self.finished = 0
        self.budget = int(getattr(options, "request_budget", 0) or 0)
        self.rng = random.Random(getattr(options, "seed", 0))
        self.quitting = False

    def take(self) -> bool:
        if self.budget and self.issued >= self.budget:
            return False
        self.issued += 1
        return True

    def finish(self, record: workload.RequestRecord) -> bool:
        """Record one finished request; True when it was the budget's last."""
        self.records.append(record)
        self.finished += 1
        return bool(self.budget) and self.finished >= self.budget


STATE = _State()


def _options(environment):
    opts = environment.parsed_options
    if opts is None:  # used as a library without locust's parser: the parser's defaults
        import argparse

        opts = argparse.Namespace(model="", prompt_tokens=512, output_tokens=128, endpoint="completions",
                                  token_ids="auto", request_budget=0, records_out="", temperature=0.0,
                                  seed=0, request_timeout=600.0)
    return opts


@events.init.add_listener
def _check_target(environment, **_kw) -> None:
    # `--host` is known once locust has parsed its options: refuse a non-loopback target at once.
    if environment.host:
        workload.require_loopback(environment.host)


@events.test_start.add_listener
def _prepare(environment, **_kw) -> None:
    """Find the model name and build the prompt pool, once per test (one HTTP session)."""
    import requests

    opts = _options(environment)
    STATE.reset(opts)
    try:
        base = workload.require_loopback(environment.host or DEFAULT_HOST)
        with requests.Session() as s:
            def post(path: str, body: dict) -> dict:
                r = s.post(base + path, json=body, timeout=60)
                if r.status_code != 200:
                    raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
                return r.json()

            model = opts.model
            if not model:
                r = s.get(base + "/v1/models", timeout=60)
                r.raise_for_status()
                model = r.json()["data"][0]["id"]
            STATE.pool = workload.build_token_pool(post, model, opts.token_ids, opts.endpoint)
            STATE.model = model
    except Exception as e:  # noqa: BLE001 - report any set-up failure and stop the test
        environment.process_exit_code = 2
        print(f"locustfile: cannot prepare the workload: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if environment.runner is not None:
            gevent.spawn(environment.runner.quit)


@events.test_stop.add_listener
def _write_records(environment, **_kw) -> None:
    path = getattr(STATE.options, "records_out", "")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.writelines(rec.to_json() + "\n" for rec in STATE.records)


@events.quitting.add_listener
def _write_final_stats(environment, **_kw) -> None:
    import csv

    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    prefix = getattr(environment.parsed_options, "stats_csv", "")
    if not prefix:
        return
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        writer.requests_csv(csv.writer(f))
    with open(f"{prefix}_failures.csv", "w", newline="") as f:
        writer.failures_csv(csv.writer(f))


class OpenAIStreamUser(HttpUser):
    """One closed-loop client of ``/v1/completions`` or ``/v1/chat/completions`` (``--endpoint``)."""

    host = DEFAULT_HOST
    wait_time = constant(0)

    def on_start(self) -> None:
        workload.require_loopback(self.host)  # also when used through locust's library API

    @task
    def streamed_request(self) -> None:
        opts = STATE.options or _options(self.environment)
        if STATE.pool is None or not STATE.take():
            # Budget spent (or no workload): idle until the last request ends and the runner quits.
            # (Stopping the user here instead makes locust complain when it stops the others.)
            gevent.sleep(0.2)
            return
        endpoint = opts.endpoint
        if endpoint == "mixed":
            endpoint = STATE.rng.choice(("completions", "chat"))
        body = workload.request_body(endpoint, STATE.model, STATE.pool, opts.prompt_tokens,
                                     opts.output_tokens, STATE.rng, opts.temperature)
        record = self._send(workload.ENDPOINTS[endpoint], endpoint, body, opts)
        if STATE.finish(record) and not STATE.quitting:
            STATE.quitting = True
            gevent.spawn(self.environment.runner.quit)  # not from this greenlet: quit() kills users

    def _send(self, path: str, endpoint: str, body: dict, opts) -> workload.RequestRecord:
        record = workload.RequestRecord(endpoint=endpoint, start=time.time())
        reader = workload.StreamReader(record, opts.output_tokens)
        sent = time.perf_counter()
        nbytes = 0
        with self.client.post(path, json=body, stream=True, catch_response=True,
                              timeout=(10, opts.request_timeout)) as resp:
            record.status = resp.status_code
            try:
                if resp.error is not None and not resp.status_code:  # no HTTP answer at all
                    record.error = f"{type(resp.error).__name__}: {resp.error}"[:300]
                elif resp.status_code != 200:
                    record.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                else:
                    for line in resp.iter_lines(chunk_size=None):
                        nbytes += len(line) + 1
                        reader.feed(line, time.perf_counter(), sent)
                    reader.finish()
            except Exception as e:  # noqa: BLE001 - a broken stream is a failed request, not a crash
                record.error = f"{type(e).__name__}: {e}"[:300]
                record.ok = False
            if record.latency_s is None:
                record.latency_s = time.perf_counter() - sent
            # Locust timed only the headers; report the whole stream instead.
            resp.request_meta["response_time"] = record.latency_s * 1000
            resp.request_meta["response_length"] = nbytes
            if record.ok:
                resp.success()
            else:
                resp.failure(record.error)
        if record.ok:
            fire = self.environment.events.request.fire
            fire(request_type="TTFT", name=path, response_time=record.ttft_s * 1000, response_length=0,
                 exception=None, context={})
            if record.tpot_s is not None:
                fire(request_type="TPOT", name=path, response_time=record.tpot_s * 1000, response_length=0,
                     exception=None, context={})
        return record
