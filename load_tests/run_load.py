"""Headless concurrency sweep with locust against one or more vLLM servers on this machine.

    # servers that are already running (names are labels for the report)
    python -m load_tests.run_load --url quick=http://127.0.0.1:8000 --url fp16=http://127.0.0.1:8001

    # or start each one from its `vllm serve --config` file, one after another
    python -m load_tests.run_load --models-dir /tmp/models \\
        --serve serving_configs/llama3_8b_quick.yaml --serve serving_configs/llama3_8b_fp16.yaml

    # combine the results of earlier runs (no server needed)
    python -m load_tests.run_load --merge a/serving_h100.json b/serving_h100.json --out-dir benchmarks/results

For every server and every concurrency C (default 1, 16, 64, 256) one step runs
``locust --headless -u C -r C`` with ``load_tests/locustfile.py`` in a child process, which stops
by itself once ``--requests-per-user`` x C requests (default 4 x C) have finished, or at the
step's time limit. Streamed requests with exact prompt and output lengths (default 512 in,
128 out); see ``locustfile.py`` and ``workload.py``. Each step draws its random prompts from its
own seed (``step_seed``: ``--seed`` and the step's name), so no step replays an earlier step's
prompts into vLLM's prefix cache, and every server gets the same prompts in the same step.

Outputs in ``--out-dir`` (stem ``serving_<device>`` unless ``--stem``): ``<stem>.json`` (result
rows), ``<stem>.meta.json``, ``<stem>.md`` (device, date, versions, command, tables),
``<stem>.png`` (output tok/s and p50/p99 TPOT against concurrency, a line per server), and
``<stem>_steps/``: each step's locust stats and failures CSVs (``_stats.csv``, ``_failures.csv``:
requests, TTFT and TPOT rows), its per-request JSON lines and locust log, and each
started server's log. The side-by-side table is also printed. Results are rewritten after every
step, so a run cut short keeps what it measured.

Only loopback targets: every URL must be 127.0.0.0/8, [::1] or localhost, and servers started
from a config file are bound to 127.0.0.1 whatever the file says.

Servers from a config file (``--serve``): ``vllm serve <model> --config <file> --host 127.0.0.1
--port <free port>``, through :class:`vllm_quick.serve_demo.VllmServer` (own process group,
stopped with everything it started). Comment lines in the file configure the run (vLLM ignores
comments):

* ``# bench-name: quick``: the server's name in the results (default: the file name);
* ``# bench-model: llama3-8b-awq``: the model folder under ``--models-dir`` (``--model`` overrides);
* ``# bench-env: KEY=VALUE``: environment variables for that server alone. ``{repo}`` expands to
  this repository; ``PYTHONPATH`` is prepended to the current one.

Exit status: 0 when every request of every step succeeded, 1 when some failed, 2 when the run
could not be done (bad arguments, a server that does not start, a locust step that broke).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from load_tests import report, workload

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
DEFAULT_CONCURRENCY = "1,16,64,256"


# ----------------------------------------------------------------------------------------------
# servers
# ----------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A server to measure: already running (``url``) or started from a config file."""

    name: str
    url: str | None = None
    config: Path | None = None
    model: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    served_model_name: str | None = None
    info: dict = field(default_factory=dict)  # what the report says about it


def parse_bench_comments(config: Path) -> dict:
    """The ``# bench-name/-model/-env:`` lines of a serving config (see the module docstring)."""
    out: dict = {"env": {}}
    for line in config.read_text().splitlines():
        m = re.match(r"\s*#\s*bench-(name|model|env):\s*(.+?)\s*$", line)
        if not m:
            continue
        key, value = m.groups()
        if key == "env":
            k, sep, v = value.partition("=")
            if not sep:
                raise ValueError(f"{config}: '# bench-env: {value}' is not KEY=VALUE")
            out["env"][k.strip()] = v.strip()
        else:
            out[key] = value
    return out


def target_from_config(config: str, models_dir: str | None, model: str | None) -> Target:
    import yaml

    path = Path(config).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no serving config {config}")
    settings = yaml.safe_load(path.read_text()) or {}
    host = str(settings.get("host", "127.0.0.1"))
    workload.require_loopback(f"http://{host}")  # a config meant for another interface is refused
    bench = parse_bench_comments(path)
    if model:
        model_path = Path(model)
    elif bench.get("model") and models_dir:
        model_path = Path(models_dir) / bench["model"]
    else:
        raise ValueError(f"{config}: no model folder: pass --model, or --models-dir with a '# bench-model:' line")
    if not model_path.is_dir():
        raise FileNotFoundError(f"model folder {model_path} (for {config}) does not exist")
    env = {k: v.replace("{repo}", str(REPO)) for k, v in bench["env"].items()}
    return Target(name=bench.get("name") or path.stem, config=path, model=model_path.resolve(), env=env,
                  served_model_name=settings.get("served-model-name"))


def target_from_url(spec: str) -> Target:
    name, sep, url = spec.partition("=")
    if not sep:
        name, url = "server", spec
    return Target(name=name, url=workload.require_loopback(url))


def server_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in extra.items():
        if k == "PYTHONPATH" and env.get("PYTHONPATH"):
            env[k] = v + os.pathsep + env["PYTHONPATH"]
        else:
            env[k] = v
    return env


@dataclass
class Running:
    """A server being measured: its base URL and, if this run started it, the process."""

    url: str
    server: object | None = None  # vllm_quick.serve_demo.VllmServer
    log_path: Path | None = None


def server_for(target: Target, log_dir: Path, startup_timeout: float, tensor_parallel_size: int = 1):
    """The (not yet started) :class:`~vllm_quick.serve_demo.VllmServer` of a config-file target."""
    from vllm_quick.serve_demo import VllmServer, free_port, vllm_executable

    port = free_port()
    server = VllmServer(target.model, port=port, log_path=log_dir / f"{target.name}_server.log",
                        startup_timeout=startup_timeout, env=server_env(target.env))
    # The config file holds the settings; the command line only pins where it listens (and, for
    # a tensor-parallel run, on how many GPUs).
    server.cmd = [*vllm_executable(), "serve", str(target.model), "--config", str(target.config),
                  "--host", "127.0.0.1", "--port", str(port)]
    if tensor_parallel_size != 1:
        server.cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if target.served_model_name:
        server.model_name = target.served_model_name
    return server


@contextmanager
def running(target: Target, log_dir: Path, startup_timeout: float, tensor_parallel_size: int = 1):
    """Yield a :class:`Running` for the target; start (and afterwards stop) its server if it
    comes from a config file (on ``tensor_parallel_size`` GPUs)."""
    if target.url:
        yield Running(target.url)
        return
    server = server_for(target, log_dir, startup_timeout, tensor_parallel_size)
    target.info.update(command=_display(server.cmd), env=target.env,
                       config=_rel(target.config), model=str(target.model))
    print(f"[run_load] starting {target.name}: {' '.join(server.cmd)}\n           log: {server.log_path}", flush=True)
    t0 = time.monotonic()
    with server:
        target.info["startup_s"] = round(time.monotonic() - t0, 1)
        print(f"[run_load] {target.name} ready after {target.info['startup_s']:.0f} s at {server.url}", flush=True)
        yield Running(server.url, server, server.log_path)
    print(f"[run_load] {target.name} stopped", flush=True)


def _display(cmd: list[str]) -> str:
    """A ``vllm ...`` command line as a person would type it (without the interpreter path)."""
    from vllm_quick.serve_demo import vllm_executable

    return "vllm " + " ".join(shlex.quote(c) for c in cmd[len(vllm_executable()):])


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def server_version(url: str) -> str | None:
    import requests

    try:
        return requests.get(url + "/version", timeout=10).json().get("version")
    except Exception:  # noqa: BLE001 - informational only
        return None


# ----------------------------------------------------------------------------------------------
# one step: a locust process
# ----------------------------------------------------------------------------------------------
def step_seed(base: int, step: str) -> int:
    """The prompt seed of one step (``"warmup"``, ``"c64"``, ``"soak2000_c256"``, ...) of a server.

    Every step draws its prompts from its own seed. With one seed for all of them (before session
    20) a step's first prompts were the earlier steps' prompts, which vLLM's prefix cache served
    without their prefill: the H100 servers' logs showed prefix-cache hit rates of 25-51% in the
    concurrency-256 step, by an amount that depended on what the cache had kept, i.e. on the
    KV-cache size, which differs between an fp16 and an int4 server. The same step name gives the
    same prompts on every server, so servers stay comparable."""
    return (base + zlib.crc32(step.encode())) % 2**31


def run_step(url: str, concurrency: int, n_requests: int, args, prefix: Path, step: str) -> tuple[list, dict]:
    """Run ``n_requests`` requests from ``concurrency`` users, prompts drawn from the step's own
    seed (``step_seed``); returns the request records and facts about the step (time limit hit,
    locust exit code, the seed)."""
    seed = step_seed(args.seed, step)
    records_path = prefix.with_name(prefix.name + "_requests.jsonl")
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(concurrency), "-r", str(args.spawn_rate or concurrency),
        "--run-time", f"{int(args.step_timeout)}s", "--stop-timeout", "5",
        "--host", url, "--stats-csv", str(prefix), "--records-out", str(records_path),
        "--request-budget", str(n_requests), "--prompt-tokens", str(args.prompt_tokens),
        "--output-tokens", str(args.output_tokens), "--endpoint", args.endpoint,
        "--token-ids", args.token_ids, "--temperature", str(args.temperature), "--seed", str(seed),
        "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0",
    ]
    if args.model_name:
        cmd += ["--model", args.model_name]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    records_path.unlink(missing_ok=True)
    log_path = prefix.with_name(prefix.name + "_locust.log")
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                  cwd=REPO, timeout=args.step_timeout + 120)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.monotonic() - t0
    records = []
    if records_path.exists():
        records = [workload.RequestRecord.from_json(line) for line in records_path.read_text().splitlines() if line]
    facts = {"locust_exit": code, "wall_s": round(wall, 1), "finished": len(records), "planned": n_requests,
             "seed": seed}
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"locust step (concurrency {concurrency}) exited with {code}; "
                           f"last lines of {log_path}:\n" + "\n".join(tail))
    return records, facts


def step_row(name: str, concurrency: int, n_requests: int, records: list) -> dict:
    row = workload.summarize(name, concurrency, records)
    # Requests that never finished (cut off at the time limit) count as failed.
    row["failed"] += n_requests - row["requests"]
    row["requests"] = n_requests
    return row


# ----------------------------------------------------------------------------------------------
# cross-check with vLLM's own benchmark client
# ----------------------------------------------------------------------------------------------
def bench_serve(url: str, target: Target, concurrency: int, num_prompts: int, args, out_dir: Path) -> dict:
    """``vllm bench serve`` (random dataset, same lengths, ignore_eos) at one concurrency."""
    from vllm_quick.serve_demo import vllm_executable

    tokenizer = args.crosscheck_tokenizer or (str(target.model) if target.model else None)
    if not tokenizer:
        return {"error": "no tokenizer for vllm bench serve (pass --crosscheck-tokenizer)"}
    result_name = f"{target.name}_c{concurrency}_vllm_bench.json"
    cmd = [*vllm_executable(), "bench", "serve", "--backend", "vllm", "--base-url", url,
           "--endpoint", "/v1/completions", "--model", target.served_model_name or args.model_name or "",
           "--tokenizer", tokenizer, "--dataset-name", "random",
           "--random-input-len", str(args.prompt_tokens), "--random-output-len", str(args.output_tokens),
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
           "--seed", str(step_seed(args.seed, f"crosscheck_c{concurrency}")), "--temperature", str(args.temperature),
           "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", result_name, "--disable-tqdm"]
    if not cmd[cmd.index("--model") + 1]:
        cmd[cmd.index("--model") + 1:cmd.index("--model") + 2] = [_first_model(url)]
    log_path = out_dir / f"{target.name}_c{concurrency}_vllm_bench.log"
    print(f"[run_load] cross-check: {' '.join(cmd)}", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=args.step_timeout + 300)
    entry = {"command": _display(cmd), "num_prompts": num_prompts}
    result = out_dir / result_name
    if proc.returncode != 0 or not result.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-8:]
        entry["error"] = f"vllm bench serve exited with {proc.returncode}: " + " / ".join(tail)[-600:]
        return entry
    data = json.loads(result.read_text())
    entry["bench"] = {
        "output_tok_s": data.get("output_throughput"),
        "completed": data.get("completed"),
        "failed": data.get("failed", num_prompts - (data.get("completed") or 0)),
        "ttft_ms_p50": data.get("median_ttft_ms"),
        "ttft_ms_p99": data.get("p99_ttft_ms"),
        "tpot_ms_p50": data.get("median_tpot_ms"),
        "tpot_ms_p99": data.get("p99_tpot_ms"),
    }
    return entry


def _first_model(url: str) -> str:
    import requests

    return requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


# ----------------------------------------------------------------------------------------------
# where and with what it ran
# ----------------------------------------------------------------------------------------------
def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        if out.returncode == 0 and names:
            return names[0] + (f" (x{len(names)})" if len(names) > 1 else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores"


def device_tag(name: str) -> str:
    """``serving_<tag>``: the GPU family ("h100", "a100", ...) or "cpu"."""
    if name.startswith("CPU"):
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:20]


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("vllm", "torch", "locust"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            out["vllm-quick"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


# ----------------------------------------------------------------------------------------------
def _terminate(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load_tests.run_load",
                                description="Headless locust concurrency sweep against vLLM servers on this machine.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (load_tests/run_load.py) for the outputs.")
    src = p.add_argument_group("servers (loopback only; measured one after another, in the order given)")
    src.add_argument("--url", action="append", default=[], metavar="[NAME=]URL",
                     help="a running server, e.g. quick=http://127.0.0.1:8000")
    src.add_argument("--serve", action="append", default=[], metavar="CONFIG.yaml",
                     help="start `vllm serve <model> --config CONFIG.yaml`, measure, stop")
    src.add_argument("--models-dir", help="folder holding the '# bench-model:' folders of the configs")
    src.add_argument("--model", help="model folder for every --serve config (overrides '# bench-model:')")
    src.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                     help="start every --serve server on N GPUs (vllm serve --tensor-parallel-size N)")
    src.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a server to get ready")
    src.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier result files instead of measuring")

    w = p.add_argument_group("workload")
    w.add_argument("--concurrency", default=DEFAULT_CONCURRENCY, help=f"comma list (default {DEFAULT_CONCURRENCY})")
    w.add_argument("--requests-per-user", type=int, default=4, help="requests per step = this x concurrency (4)")
    w.add_argument("--requests", type=int, default=0, help="fixed requests per step (overrides --requests-per-user)")
    w.add_argument("--prompt-tokens", type=int, default=512)
    w.add_argument("--output-tokens", type=int, default=128)
    w.add_argument("--endpoint", choices=("completions", "chat", "mixed"), default="completions")
    w.add_argument("--token-ids", default="auto", help="LOW:HIGH range of prompt token ids, or auto (see locustfile)")
    w.add_argument("--model-name", default="", help="served model name (default: what /v1/models lists first)")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--seed", type=int, default=0,
                   help="base of the prompt seeds: each step draws its prompts from its own seed derived from it")
    w.add_argument("--spawn-rate", type=float, default=0, help="users started per second (default: all in 1 s)")
    w.add_argument("--warmup-requests", type=int, default=8,
                   help="requests at concurrency min(8, n) after a server is ready, not reported (0: none)")
    w.add_argument("--step-timeout", type=float, default=600.0, help="time limit of one step in seconds")

    c = p.add_argument_group("cross-check")
    c.add_argument("--crosscheck", action="append", default=[], metavar="NAME:CONCURRENCY",
                   help="after NAME's sweep, run `vllm bench serve` at that concurrency with the same shapes "
                        "and requests-per-step rule, and report both")
    c.add_argument("--crosscheck-tokenizer", help="tokenizer folder for vllm bench serve (default: the --serve model)")
    c.add_argument("--soak", action="append", default=[], metavar="NAME:REQUESTS:CONCURRENCY",
                   help="after NAME's sweep, one more step of REQUESTS requests at CONCURRENCY (e.g. quick:2000:256), "
                        "reported apart from the sweep (issue 5: nothing lost under load)")

    o = p.add_argument_group("output")
    o.add_argument("--out-dir", default="benchmarks/results/serving", help="where to write (created)")
    o.add_argument("--stem", default="", help="file name stem (default serving_<device>, e.g. serving_h100)")
    o.add_argument("--title", default="", help="report title (default: the stem)")
    o.add_argument("--command-label", default="",
                   help="the command to name in the report (default: this run_load command line); "
                        "benchmarks/serving_bench.sh passes its own")
    args = p.parse_args(argv)
    if not args.merge and not (args.url or args.serve):
        p.error("give at least one --url or --serve (or --merge)")
    return args


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    command = args.command_label or "python -m load_tests.run_load " + " ".join(shlex.quote(a) for a in raw_argv)
    out_dir = Path(args.out_dir)
    # `timeout` and the device tool stop a run with SIGTERM: turn it into SystemExit so that the
    # server this run started (its own process group) and the locust child are stopped on the way out.
    signal.signal(signal.SIGTERM, _terminate)

    if args.merge:
        rows, meta = report.merge(args.merge)
        stem = args.stem or Path(args.merge[0]).stem
        meta.update(stem=stem, title=args.title or meta.get("title") or stem)
        meta["command"] = command
        written = report.write_all(rows, meta, out_dir, stem)
        print(report.side_by_side(rows, meta))
        print("[run_load] wrote " + ", ".join(str(p) for p in written.values()))
        return 0

    try:
        concurrencies = [int(x) for x in args.concurrency.split(",") if x.strip()]
        if not concurrencies or min(concurrencies) < 1:
            raise ValueError("--concurrency needs positive integers")
        if args.tensor_parallel_size < 1:
            raise ValueError("--tensor-parallel-size needs a positive integer")
        if args.tensor_parallel_size != 1 and args.url:
            raise ValueError("--tensor-parallel-size applies to --serve servers; a --url server runs as it was started")
        if args.token_ids != "auto":
            workload.parse_id_range(args.token_ids)
        targets = [target_from_url(u) for u in args.url]
        targets += [target_from_config(c, args.models_dir, args.model) for c in args.serve]
        crosschecks: dict[str, list[int]] = {}
        for spec in args.crosscheck:
            name, _, conc = spec.rpartition(":")
            crosschecks.setdefault(name, []).append(int(conc))
        soaks: dict[str, list[tuple[int, int]]] = {}
        for spec in args.soak:
            name, n, conc = spec.rsplit(":", 2)
            soaks.setdefault(name, []).append((int(n), int(conc)))
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ValueError(f"server names must differ: {names}")
        unknown = (set(crosschecks) | set(soaks)) - set(names)
        if unknown:
            raise ValueError(f"--crosscheck/--soak name unknown servers: {sorted(unknown)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"run_load: error: {e}", file=sys.stderr)
        return 2

    device = device_name()
    stem = args.stem or f"serving_{device_tag(device)}"
    steps_dir = out_dir / f"{stem}_steps"
    steps_dir.mkdir(parents=True, exist_ok=True)
    rule = f"{args.requests}" if args.requests else f"{args.requests_per_user} x concurrency"
    meta = {
        "stem": stem, "title": args.title or stem, "device": device,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(), "command": command,
        "settings": {
            "endpoint": {"completions": "/v1/completions", "chat": "/v1/chat/completions",
                         "mixed": "/v1/completions + /v1/chat/completions"}[args.endpoint],
            "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
            "prompt_source": ("random token ids" if args.endpoint == "completions" else "random words")
            + ("" if args.token_ids == "auto" else f" in [{args.token_ids.replace(':', ', ')})"),
            "temperature": args.temperature, "requests_rule": rule, "concurrency": concurrencies,
            "warmup_requests": args.warmup_requests, "tensor_parallel_size": args.tensor_parallel_size,
        },
        "server_order": [t.name for t in targets], "servers": {}, "steps": [], "crosscheck": [], "soak": [],
        "notes": [],
    }
    rows: list[dict] = []
    status = 0

    def save() -> None:
        report.write_all(rows, meta, out_dir, stem)

    for target in targets:
        try:
            with running(target, steps_dir, args.startup_timeout, args.tensor_parallel_size) as live:
                url = live.url
                target.info.setdefault("url", url)
                target.info["vllm_version"] = server_version(url)
                meta["servers"][target.name] = target.info
                if args.warmup_requests:
                    n = args.warmup_requests
                    records, facts = run_step(url, min(8, n), n, args, steps_dir / f"{target.name}_warmup", "warmup")
                    bad = sum(not r.ok for r in records) + n - len(records)
                    print(f"[run_load] {target.name}: warm-up {n} requests, {bad} failed", flush=True)
                for conc in concurrencies:
                    n = args.requests or args.requests_per_user * conc
                    prefix = steps_dir / f"{target.name}_c{conc}"
                    records, facts = run_step(url, conc, n, args, prefix, f"c{conc}")
                    row = step_row(target.name, conc, n, records)
                    rows.append(row)
                    meta["steps"].append({"server": target.name, "concurrency": conc, **facts,
                                          **workload.step_details(records)})
                    if facts["finished"] < n:
                        meta["notes"].append(f"{target.name} c={conc}: step time limit ({args.step_timeout:.0f} s) "
                                             f"reached, {facts['finished']} of {n} requests finished")
                    if row["failed"]:
                        status = max(status, 1)
                    print(f"[run_load] {target.name} c={conc}: {row['requests']} requests, {row['failed']} failed, "
                          f"{row['output_tok_s']:.1f} output tok/s, TTFT p50 {row['ttft_ms_p50']} ms, "
                          f"TPOT p50 {row['tpot_ms_p50']} ms ({facts['wall_s']} s)", flush=True)
                    save()
                for conc in crosschecks.get(target.name, []):
                    n = args.requests or args.requests_per_user * conc
                    entry = {"server": target.name, "concurrency": conc,
                             **bench_serve(url, target, conc, n, args, steps_dir)}
                    entry["ours"] = next((r for r in rows if r["server"] == target.name and r["concurrency"] == conc),
                                         None)
                    meta["crosscheck"].append(entry)
                    print(f"[run_load] cross-check {target.name} c={conc}: "
                          f"{entry.get('bench') or entry.get('error')}", flush=True)
                    save()
                for n, conc in soaks.get(target.name, []):
                    records, facts = run_step(url, conc, n, args, steps_dir / f"{target.name}_soak{n}_c{conc}",
                                              f"soak{n}_c{conc}")
                    row = step_row(target.name, conc, n, records)
                    meta["soak"].append({**row, **facts, **workload.step_details(records)})
                    if row["failed"]:
                        status = max(status, 1)
                    print(f"[run_load] soak {target.name}: {n} requests at concurrency {conc}: {row['failed']} failed, "
                          f"{row['output_tok_s']:.1f} output tok/s ({facts['wall_s']} s)", flush=True)
                    save()
        except (RuntimeError, TimeoutError, OSError) as e:
            msg = f"{target.name}: {type(e).__name__}: {e}"
            print(f"run_load: error: {msg}", file=sys.stderr, flush=True)
            meta["notes"].append(msg.splitlines()[0][:500])
            meta["servers"].setdefault(target.name, target.info)
            status = 2
            save()
            continue

    save()
    print()
    print(report.side_by_side(rows, meta))
    written = report.paths(out_dir, stem)
    print(f"[run_load] wrote {written['json']}, {written['md']}, {written['png']}, steps in {steps_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
