"""What the locustfile and the runner share: target checks, prompts, per-request records, metrics.

Nothing here imports locust or gevent (locust monkey-patches the standard library when it is
imported), so the runner and the tests can use it freely.

Definitions (the same as ``vllm bench serve``):

* **TTFT** (time to first token): from sending the request to the first streamed event that
  carries a choice (for chat, the role delta that vLLM sends with the first token).
* **TPOT** (time per output token) of one request: ``(latency - TTFT) / (output_tokens - 1)``,
  where latency runs to the last event of the stream and ``output_tokens`` is the
  ``usage.completion_tokens`` of the stream's final event (``stream_options.include_usage``).
* **output tok/s** of a step: the output tokens of its successful requests divided by the time
  from its first request's start to its last request's end.

Percentiles are computed from the raw per-request values (linear interpolation, as numpy's
default), not from locust's rounded histogram.
"""

from __future__ import annotations

import ipaddress
import json
import math
import random
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
LOOPBACK_NAMES = ("localhost",)


# ----------------------------------------------------------------------------------------------
# targets: loopback only
# ----------------------------------------------------------------------------------------------
class TargetNotAllowed(ValueError):
    """A load test was pointed at something other than this machine's loopback interface."""


def require_loopback(url: str | None) -> str:
    """Return ``url`` (without a trailing slash) if it is ``http(s)://`` on a loopback address:
    127.0.0.0/8, ``::1`` or ``localhost``. Anything else raises :class:`TargetNotAllowed`: these
    load tests may only ever send traffic to a server on this machine. Host names other than
    ``localhost`` are refused without being resolved."""
    if not url:
        raise TargetNotAllowed("no target URL given: pass one like http://127.0.0.1:8000")
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme not in ("http", "https"):
        raise TargetNotAllowed(f"refusing target {url!r}: only http:// or https:// URLs are supported")
    host = parts.hostname or ""
    allowed = host.lower() in LOOPBACK_NAMES
    if not allowed:
        try:
            allowed = ipaddress.ip_address(host).is_loopback
        except ValueError:
            allowed = False
    if not allowed:
        raise TargetNotAllowed(
            f"refusing to send load to {url!r}: only loopback targets are allowed "
            f"(127.0.0.0/8, [::1] or localhost), got host {host!r}"
        )
    return f"{parts.scheme}://{parts.netloc}".rstrip("/")


# ----------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------
# Plain words for chat prompts and for finding a tokenizer's ordinary token ids (see TokenPool).
SEED_WORDS = (
    "the of and to in is was for on that with as by at from his her are be this an which or "
    "have had one not but all were they their there been has more when will would who so no "
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy process music market sense nation plan college interest "
    "death experience effect use class control care field development role effort rate heart "
    "drug show leader light voice wife police mind price report decision son view relationship "
    "town road arm difference value building action model season society tax director position "
    "player record paper space ground form event official matter center couple site project "
    "activity star table need court oil situation cost industry figure street image phone data "
    "picture practice piece land product doctor wall patient worker news test movie north love "
    "support technology step baby computer type attention film tree source organization hair "
    "window evidence population site kernel matrix tensor register warp thread memory cache "
    "quantize interleave weight scale zero group layer token batch stream server request"
).split()


def seed_text() -> str:
    return " ".join(SEED_WORDS)


@dataclass
class TokenPool:
    """Where prompts come from.

    * ``ids``: ordinary token ids of the served tokenizer. A completions prompt of n tokens is n
      ids drawn from it at random, sent as a token-id prompt, so its length is exact and no two
      prompts share a prefix (nothing for vLLM's prefix cache to reuse). Found by tokenizing
      :data:`SEED_WORDS` on the server (``/tokenize``), or given as a range (``--token-ids``).
    * ``words`` and ``tokens_per_word``: chat prompts are random words; their count is chosen
      so the chat prompt (template included) is about n tokens (usage reports the exact count).
    """

    ids: list[int]
    words: list[str] = field(default_factory=lambda: list(SEED_WORDS))
    tokens_per_word: float = 1.0
    chat_overhead_tokens: int = 0

    def completion_prompt(self, n_tokens: int, rng: random.Random) -> list[int]:
        return [self.ids[rng.randrange(len(self.ids))] for _ in range(n_tokens)]

    def chat_prompt(self, n_tokens: int, rng: random.Random) -> str:
        n_words = max(1, round((n_tokens - self.chat_overhead_tokens) / self.tokens_per_word))
        return " ".join(self.words[rng.randrange(len(self.words))] for _ in range(n_words))


def parse_id_range(spec: str) -> list[int]:
    """``"LOW:HIGH"`` -> ``list(range(LOW, HIGH))`` (for ``--token-ids``)."""
    try:
        low, high = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--token-ids must look like LOW:HIGH (e.g. 0:128000), got {spec!r}") from None
    if not 0 <= low < high:
        raise ValueError(f"--token-ids {spec!r}: need 0 <= LOW < HIGH")
    return list(range(low, high))


MIN_DISTINCT_IDS = 32


def build_token_pool(post, model: str, token_ids: str = "auto", endpoint: str = "completions") -> TokenPool:
    """The :class:`TokenPool` for one server. ``post(path, body) -> dict`` sends one JSON request
    to it (the locustfile passes its HTTP session, tests a fake). Only what the workload needs is
    asked for:

    * completion prompts: with ``token_ids="auto"`` the ordinary ids come from ``/tokenize`` of
      the seed words; a tokenizer that maps them to fewer than :data:`MIN_DISTINCT_IDS` distinct
      ids (a word-level one with other words) needs an explicit ``LOW:HIGH`` range, which needs
      no request at all;
    * chat prompts (``endpoint`` "chat" or "mixed"): tokens per seed word, and the chat
      template's own tokens (``/tokenize`` of a one-word conversation).
    """
    pool = TokenPool(ids=[])
    seed_ids: list[int] | None = None

    def tokenize_seed() -> list[int]:
        return post("/tokenize", {"model": model, "prompt": seed_text(), "add_special_tokens": False})["tokens"]

    if token_ids == "auto":
        seed_ids = tokenize_seed()
        pool.ids = sorted(set(seed_ids))
        if len(pool.ids) < MIN_DISTINCT_IDS:
            raise ValueError(
                f"the server's tokenizer turned {len(SEED_WORDS)} seed words into only {len(pool.ids)} "
                f"distinct token ids; pass --token-ids LOW:HIGH (a range of its ordinary ids)"
            )
    else:
        pool.ids = parse_id_range(token_ids)
    if endpoint in ("chat", "mixed"):
        seed_ids = seed_ids if seed_ids is not None else tokenize_seed()
        pool.tokens_per_word = max(len(seed_ids), 1) / len(SEED_WORDS)
        chat = post("/tokenize", {"model": model, "messages": [{"role": "user", "content": SEED_WORDS[0]}],
                                  "add_generation_prompt": True})
        pool.chat_overhead_tokens = max(0, len(chat["tokens"]) - round(pool.tokens_per_word))
    return pool


def request_body(endpoint: str, model: str, pool: TokenPool, prompt_tokens: int, output_tokens: int,
                 rng: random.Random, temperature: float = 0.0) -> dict:
    """One streamed request with its output length pinned (``ignore_eos`` + ``max_tokens``)."""
    body = {
        "model": model,
        "max_tokens": output_tokens,
        "ignore_eos": True,  # vLLM extension: generate exactly max_tokens
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},  # the last event carries usage
    }
    if endpoint == "completions":
        body["prompt"] = pool.completion_prompt(prompt_tokens, rng)
    elif endpoint == "chat":
        body["messages"] = [{"role": "user", "content": pool.chat_prompt(prompt_tokens, rng)}]
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}; supported: {', '.join(ENDPOINTS)}")
    return body


# ----------------------------------------------------------------------------------------------
# one request's outcome, and a step's metrics
# ----------------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    endpoint: str
    start: float  # wall clock (time.time()) when the request was sent
    ok: bool = False
    ttft_s: float | None = None
    latency_s: float | None = None  # to the last event of the stream
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    events: int = 0  # data events received
    status: int | None = None
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> RequestRecord:
        return cls(**json.loads(line))


class StreamReader:
    """Consumes one SSE response (``data: {...}`` lines, ``data: [DONE]`` last) line by line and
    fills a :class:`RequestRecord`. Only the first choice-carrying event and usage-carrying
    events are JSON-decoded: at high concurrency the load generator must stay cheap per token."""

    def __init__(self, record: RequestRecord, expected_output_tokens: int):
        self.record = record
        self.expected = expected_output_tokens
        self.done = False
        self.usage: dict | None = None
        self.first_event_error: str | None = None

    def feed(self, line: bytes, now: float, sent: float) -> None:
        if not line or not line.startswith(b"data:"):
            return  # blank separators, comments (": ping")
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        rec = self.record
        rec.events += 1
        rec.latency_s = now - sent
        if rec.ttft_s is None or b'"usage"' in payload or b'"error"' in payload:
            data = json.loads(payload)
            if "error" in data and "choices" not in data:
                self.first_event_error = str(data["error"])[:300]
            if rec.ttft_s is None and data.get("choices"):
                rec.ttft_s = now - sent
            if data.get("usage"):
                self.usage = data["usage"]

    def finish(self) -> RequestRecord:
        """Decide success: a complete stream, usage present, exactly the pinned output length."""
        rec = self.record
        if self.usage:
            rec.prompt_tokens = self.usage.get("prompt_tokens")
            rec.output_tokens = self.usage.get("completion_tokens")
        if self.first_event_error:
            rec.error = f"error event in stream: {self.first_event_error}"
        elif not self.done:
            rec.error = "stream ended without [DONE]"
        elif rec.ttft_s is None:
            rec.error = "no token in stream"
        elif self.usage is None:
            rec.error = "no usage in the stream (server ignored stream_options.include_usage)"
        elif rec.output_tokens != self.expected:
            rec.error = f"output length {rec.output_tokens}, expected {self.expected} (ignore_eos + max_tokens)"
        rec.ok = rec.error is None
        return rec


def percentile(values: list[float], q: float) -> float | None:
    """``q``-th percentile (0..100) with linear interpolation; ``None`` for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


ROW_KEYS = ("server", "concurrency", "requests", "failed", "output_tok_s",
            "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")


def summarize(server: str, concurrency: int, records: list[RequestRecord]) -> dict:
    """One result row (keys :data:`ROW_KEYS`) from a step's records."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s * 1000 for r in ok]
    tpot = [r.tpot_s * 1000 for r in ok if r.tpot_s is not None]
    if records:
        t0 = min(r.start for r in records)
        t1 = max(r.start + (r.latency_s or 0.0) for r in records)
        duration = t1 - t0
    else:
        duration = 0.0
    out_tokens = sum(r.output_tokens or 0 for r in ok)

    def r2(x):
        return None if x is None else round(x, 3)

    return {
        "server": server,
        "concurrency": concurrency,
        "requests": len(records),
        "failed": len(records) - len(ok),
        "output_tok_s": round(out_tokens / duration, 2) if duration > 0 else 0.0,
        "ttft_ms_p50": r2(percentile(ttft, 50)),
        "ttft_ms_p99": r2(percentile(ttft, 99)),
        "tpot_ms_p50": r2(percentile(tpot, 50)),
        "tpot_ms_p99": r2(percentile(tpot, 99)),
    }


def step_details(records: list[RequestRecord]) -> dict:
    """Extra numbers for the metadata: durations, mean lengths, the most common errors."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "unknown")[:200]
            errors[key] = errors.get(key, 0) + 1
    starts = [r.start for r in records]
    ends = [r.start + (r.latency_s or 0.0) for r in records]
    return {
        "duration_s": round(max(ends) - min(starts), 3) if records else 0.0,
        "output_tokens": sum(r.output_tokens or 0 for r in ok),
        "mean_prompt_tokens": round(sum(r.prompt_tokens or 0 for r in ok) / len(ok), 1) if ok else None,
        "mean_latency_ms": round(1000 * sum(r.latency_s for r in ok) / len(ok), 1) if ok else None,
        "endpoints": sorted({r.endpoint for r in records}),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
    }
