"""``vllm-quick demo``: build the demo model, serve it with ``--quantization quick``, ask it once.

This is the project's "does it work on my machine" command. It

1. writes the tiny demo model (AWQ format, see :mod:`vllm_quick.demo_model`) into a folder,
2. starts ``vllm serve <folder> --quantization quick`` on 127.0.0.1 and a free port,
3. waits for ``/health`` (printing progress; a CPU start takes ~20-60 s),
4. sends one OpenAI-style completion request and prints the answer (gibberish: random weights),
5. stops the server (its whole process group), whatever happened.

The server helpers here (:class:`VllmServer`, :func:`serve_command`, :func:`free_port`) are also
what the end-to-end tests use, so the demo and the tests start vLLM the same way. The settings
are the ones in ``serving_configs/cpu_demo.yaml``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Settings for a small CPU machine (2 cores, a few GiB free); mirrored in serving_configs/cpu_demo.yaml.
HOST = "127.0.0.1"
SERVED_MODEL_NAME = "quick-demo"
MAX_MODEL_LEN = 512
KV_CACHE_BYTES = 128 * 2**20  # 128 MiB of KV cache: ~64k tokens of the demo model, plenty
MAX_NUM_SEQS = 8
STARTUP_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 300.0


# ----------------------------------------------------------------------------------------------
# starting and stopping `vllm serve`
# ----------------------------------------------------------------------------------------------
def free_port(host: str = HOST) -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def process_group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)  # signal 0: existence check only
        return True
    except ProcessLookupError:
        return False


def vllm_executable() -> list[str]:
    """The ``vllm`` command of the running interpreter's environment."""
    script = Path(sys.executable).with_name("vllm")
    if script.exists():
        return [str(script)]
    found = shutil.which("vllm")
    if found:
        return [found]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def default_dtype() -> str:
    """float32 on CPU (exact reference path), float16 where a CUDA GPU runs the QUICK kernel."""
    try:
        import torch

        return "float16" if torch.cuda.is_available() else "float32"
    except ImportError:  # pragma: no cover
        return "float32"


def serve_command(
    model: str | Path,
    port: int,
    *,
    quantization: str | None = "quick",
    dtype: str = "float32",
    served_model_name: str = SERVED_MODEL_NAME,
    max_model_len: int = MAX_MODEL_LEN,
    kv_cache_bytes: int = KV_CACHE_BYTES,
    enforce_eager: bool = True,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``vllm serve`` command line for the demo settings (``quantization=None``: none;
    ``enforce_eager=False``: vLLM's default torch.compile + CUDA graphs)."""
    cmd = [*vllm_executable(), "serve", str(model)]
    if quantization:
        cmd += ["--quantization", quantization]
    cmd += ["--dtype", dtype]
    if enforce_eager:
        cmd += ["--enforce-eager"]  # no torch.compile / graph capture: starts in seconds on a CPU
    cmd += [
        "--host", HOST,
        "--port", str(port),
        "--served-model-name", served_model_name,
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(MAX_NUM_SEQS),
        "--kv-cache-memory-bytes", str(kv_cache_bytes),  # fixed KV budget, not a share of RAM/GPU
        "--disable-log-stats",
    ]
    return cmd + list(extra_args)


class VllmServer:
    """A ``vllm serve`` child process in its own process group.

    Use as a context manager; leaving it (normally or by an exception) stops the server and every
    process it started (API server, engine core, workers)::

        with VllmServer(model_dir, log_path=...) as server:
            requests.post(server.url + "/v1/completions", json=...)
    """

    def __init__(
        self,
        model: str | Path,
        *,
        quantization: str | None = "quick",
        dtype: str = "float32",
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        enforce_eager: bool = True,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.cmd = serve_command(model, self.port, quantization=quantization, dtype=dtype,
                                 enforce_eager=enforce_eager, extra_args=extra_args)
        self.log_path = Path(log_path) if log_path else Path(model) / "vllm-serve.log"
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.progress = progress
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.model_name = SERVED_MODEL_NAME

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> VllmServer:  # noqa: PYI034 (typing.Self is 3.11+; we support 3.10)
        try:
            self.start()
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic()
        with open(self.log_path, "wb") as log:  # closed here: the child holds its own descriptor
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,  # own process group: stop() kills the whole tree
            )

    def wait_until_ready(self) -> float:
        """Poll ``/health`` until it answers 200; returns the seconds since start. Raises
        ``RuntimeError`` if the server exits and ``TimeoutError`` after ``startup_timeout``,
        both with the end of the server log."""
        import requests

        assert self.proc is not None, "start() first"
        deadline = self._t0 + self.startup_timeout
        while True:
            elapsed = time.monotonic() - self._t0
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"vllm serve exited with code {code} before it was ready; command:\n  "
                    f"{' '.join(self.cmd)}\nlast lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.startup_seconds = elapsed
                    return elapsed
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"vllm serve was not ready after {self.startup_timeout:.0f} s; last lines of "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            if self.progress:
                self.progress(elapsed)
            time.sleep(1.0)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after ``grace_s``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # The group may outlive its leader (workers): make sure nothing of it survives.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
            pass
        # Killed workers are reaped by init shortly after; wait until the group is really empty.
        deadline = time.monotonic() + 10
        while process_group_exists(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


def complete(server: VllmServer, prompt: str, max_tokens: int = 32, **params) -> dict:
    """One ``/v1/completions`` request (greedy unless ``temperature`` is given); returns the JSON."""
    import requests

    body = {"model": server.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **params}
    r = requests.post(server.url + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    if r.status_code != 200:
        raise RuntimeError(f"/v1/completions answered {r.status_code}: {r.text[:2000]}")
    return r.json()


# ----------------------------------------------------------------------------------------------
# the `vllm-quick demo` command
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", default="demo_model",
                        help="where to write the demo model (default ./demo_model; rewritten each run)")
    parser.add_argument("--format", dest="fmt", choices=("awq", "quick"), default="awq",
                        help="checkpoint format to serve (default awq: interleaved at load time)")
    parser.add_argument("--prompt", default="The QUICK kernel", help="completion prompt")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--dtype", default=None, help="activation dtype (default float32 on CPU, float16 on CUDA)")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S, help="start-up timeout in seconds")


def _progress_printer() -> Callable[[float], None]:
    tty = sys.stderr.isatty()
    last = [-1]

    def show(elapsed: float) -> None:
        if tty:
            print(f"\r  waiting for the server ... {elapsed:4.0f} s", end="", file=sys.stderr, flush=True)
        elif int(elapsed) // 10 > last[0]:
            last[0] = int(elapsed) // 10
            print(f"  waiting for the server ... {elapsed:.0f} s", file=sys.stderr, flush=True)

    return show


def run(args: argparse.Namespace) -> int:
    from vllm_quick.demo_model import make_demo_model

    model_dir = Path(args.model_dir).resolve()
    t0 = time.monotonic()
    make_demo_model(model_dir, fmt=args.fmt, group_size=64)
    print(f"[1/3] wrote the demo model ({args.fmt}) to {model_dir} in {time.monotonic() - t0:.1f} s")

    server = VllmServer(
        model_dir,
        dtype=args.dtype or default_dtype(),
        port=args.port,
        startup_timeout=args.timeout,
        progress=_progress_printer(),
    )
    print(f"[2/3] starting: {' '.join(server.cmd)}\n      log: {server.log_path}")
    try:
        with server:
            if sys.stderr.isatty():
                print(file=sys.stderr)
            print(f"      ready after {server.startup_seconds:.1f} s at {server.url}")
            t1 = time.monotonic()
            answer = complete(server, args.prompt, max_tokens=args.max_tokens)
            text = answer["choices"][0]["text"]
            usage = answer.get("usage", {})
            print(f"[3/3] completion in {time.monotonic() - t1:.2f} s "
                  f"({usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} generated tokens):")
            print(f"      {args.prompt!r} -> {text!r}")
            print("      (the demo model has random weights: gibberish is the expected answer)")
    except (RuntimeError, TimeoutError) as e:
        print(f"\nvllm-quick demo: error: {e}", file=sys.stderr)
        return 1
    finally:
        print("      server stopped")
    return 0
