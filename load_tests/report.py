"""The load test's outputs: ``<stem>.json`` (result rows), ``<stem>.meta.json`` (where, when, how),
``<stem>.md`` (tables) and ``<stem>.png`` (output tok/s and TPOT against concurrency).

``<stem>.json`` is a list of rows with exactly the keys of :data:`workload.ROW_KEYS`::

    {"server": "quick", "concurrency": 64, "requests": 256, "failed": 0, "output_tok_s": 5012.3,
     "ttft_ms_p50": 80.1, "ttft_ms_p99": 190.2, "tpot_ms_p50": 11.9, "tpot_ms_p99": 13.0}

Results of several runs (say, servers measured in separate calls) are combined with
``python -m load_tests.run_load --merge A.json B.json --out-dir DIR --stem NAME``; the rows of a
later file replace those of an earlier one for the same server and concurrency.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from load_tests.workload import ROW_KEYS

METRIC_DEFINITIONS = (
    "TTFT: request sent -> first streamed token. TPOT per request: (latency - TTFT) / (output tokens - 1); "
    "p50/p99 over the step's successful requests. Output tok/s: output tokens of the successful requests / "
    "(last response end - first request start) of the step. `failed`: requests of the step that did not "
    "complete with exactly the pinned output length (including any cut off by the step's time limit)."
)


def paths(out_dir: str | Path, stem: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "json": out_dir / f"{stem}.json",
        "meta": out_dir / f"{stem}.meta.json",
        "md": out_dir / f"{stem}.md",
        "png": out_dir / f"{stem}.png",
    }


def server_order(rows: list[dict], meta: dict | None = None) -> list[str]:
    order = list((meta or {}).get("server_order", []))
    for row in rows:
        if row["server"] not in order:
            order.append(row["server"])
    return [s for s in order if any(r["server"] == s for r in rows)]


def sorted_rows(rows: list[dict], meta: dict | None = None) -> list[dict]:
    order = server_order(rows, meta)
    return sorted(rows, key=lambda r: (order.index(r["server"]), r["concurrency"]))


def _fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def side_by_side(rows: list[dict], meta: dict | None = None) -> str:
    """Markdown table: one line per concurrency, output tok/s of every server side by side
    (TPOT p50 in brackets), failed requests flagged."""
    servers = server_order(rows, meta)
    by = {(r["server"], r["concurrency"]): r for r in rows}
    conc = sorted({r["concurrency"] for r in rows})
    lines = ["| concurrency | " + " | ".join(servers) + " |", "|---:|" + "---:|" * len(servers)]
    for c in conc:
        cells = []
        for s in servers:
            r = by.get((s, c))
            if r is None:
                cells.append("-")
                continue
            cell = f"{r['output_tok_s']:,.0f} ({_fmt(r['tpot_ms_p50'])} ms)"
            if r["failed"]:
                cell += f" **{r['failed']} failed**"
            cells.append(cell)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(rows: list[dict], meta: dict | None = None, reference: str = "quick") -> str | None:
    """``reference`` output tok/s divided by each other server's, per concurrency (None if the
    reference server or any other is missing)."""
    servers = [s for s in server_order(rows, meta) if s != reference]
    by = {(r["server"], r["concurrency"]): r for r in rows}
    if not servers or not any(r["server"] == reference for r in rows):
        return None
    conc = sorted({r["concurrency"] for r in rows if r["server"] == reference})
    lines = ["| concurrency | " + " | ".join(f"{reference} / {s}" for s in servers) + " |",
             "|---:|" + "---:|" * len(servers)]
    for c in conc:
        ref = by[(reference, c)]["output_tok_s"]
        cells = []
        for s in servers:
            other = by.get((s, c))
            cells.append(f"{ref / other['output_tok_s']:.2f}x" if other and other["output_tok_s"] else "-")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(rows: list[dict], meta: dict | None = None) -> str:
    head = ("| server | concurrency | requests | failed | output tok/s | TTFT p50 ms | TTFT p99 ms "
            "| TPOT p50 ms | TPOT p99 ms |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted_rows(rows, meta):
        lines.append(
            f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['failed']} | {_fmt(r['output_tok_s'])} "
            f"| {_fmt(r['ttft_ms_p50'])} | {_fmt(r['ttft_ms_p99'])} | {_fmt(r['tpot_ms_p50'], 2)} "
            f"| {_fmt(r['tpot_ms_p99'], 2)} |"
        )
    return "\n".join(lines)


def crosscheck_table(meta: dict) -> str | None:
    checks = meta.get("crosscheck") or []
    if not checks:
        return None
    head = ("| server | concurrency | requests | output tok/s (locust) | output tok/s (vllm bench serve) "
            "| ratio | TPOT p50 ms (locust / bench) | TTFT p50 ms (locust / bench) | bench failed |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in checks:
        ours, theirs = c.get("ours") or {}, c.get("bench") or {}
        ratio = (f"{ours['output_tok_s'] / theirs['output_tok_s']:.3f}"
                 if ours.get("output_tok_s") and theirs.get("output_tok_s") else "-")
        lines.append(
            f"| {c['server']} | {c['concurrency']} | {c.get('num_prompts', '-')} | {_fmt(ours.get('output_tok_s'))} "
            f"| {_fmt(theirs.get('output_tok_s'))} | {ratio} "
            f"| {_fmt(ours.get('tpot_ms_p50'), 2)} / {_fmt(theirs.get('tpot_ms_p50'), 2)} "
            f"| {_fmt(ours.get('ttft_ms_p50'))} / {_fmt(theirs.get('ttft_ms_p50'))} | {_fmt(theirs.get('failed'))} |"
        )
        if c.get("error"):
            lines.append(f"| {c['server']} | {c['concurrency']} | error: {c['error']} | | | | | | |")
    return "\n".join(lines)


def header_lines(meta: dict) -> list[str]:
    s = meta.get("settings", {})
    lines = [
        f"- device: {meta.get('device', '?')}",
        f"- date: {meta.get('date', '?')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()),
        f"- command: `{meta.get('command', '?')}`",
    ]
    if s:
        lines.append(
            f"- workload: {s.get('endpoint')} (streaming), prompt {s.get('prompt_tokens')} tokens "
            f"({s.get('prompt_source')}), output pinned to {s.get('output_tokens')} tokens (ignore_eos), "
            f"temperature {s.get('temperature')}; per step {s.get('requests_rule')} requests from as many "
            f"closed-loop locust users as the concurrency; warm-up {s.get('warmup_requests')} requests per server"
        )
        if s.get("tensor_parallel_size", 1) != 1:
            lines.append(f"- tensor parallel: every server on {s['tensor_parallel_size']} GPUs "
                         f"(`--tensor-parallel-size {s['tensor_parallel_size']}`)")
    for name, srv in (meta.get("servers") or {}).items():
        desc = srv.get("command") or srv.get("url")
        env = srv.get("env") or {}
        extra = (" with " + ", ".join(f"`{k}={v}`" for k, v in env.items())) if env else ""
        version = f" (vLLM {srv['vllm_version']})" if srv.get("vllm_version") else ""
        start = f", ready after {srv['startup_s']:.0f} s" if srv.get("startup_s") else ""
        lines.append(f"- server `{name}`{version}: `{desc}`{extra}{start}")
    for m in meta.get("merged_from") or []:
        lines.append(f"- merged from `{m}`")
    return lines


def markdown(rows: list[dict], meta: dict) -> str:
    parts = [f"# Serving load test: {meta.get('title', meta.get('stem', 'results'))}", "", *header_lines(meta), "",
             "## Output tokens/s per server (TPOT p50 in brackets)", "", side_by_side(rows, meta), ""]
    ratios = ratio_table(rows, meta)
    if ratios:
        parts += ["## quick relative to the other servers (output tokens/s)", "", ratios, ""]
    parts += ["## All metrics", "", full_table(rows, meta), "", METRIC_DEFINITIONS, ""]
    cross = crosscheck_table(meta)
    if cross:
        parts += ["## Cross-check with `vllm bench serve` (same server, same shapes)", "", cross, ""]
        for c in meta.get("crosscheck") or []:
            if c.get("command"):
                parts.append(f"- `{c['command']}`")
        parts.append("")
    soak = meta.get("soak") or []
    if soak:
        parts += ["## Soak: one long step after the sweep (nothing may be lost under load)", "",
                  full_table([{k: r[k] for k in ROW_KEYS} for r in soak], meta), ""]
    notes = meta.get("notes") or []
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


def plot(rows: list[dict], meta: dict, path: str | Path) -> Path:
    """Output tok/s (left) and TPOT p50 (solid) / p99 (dashed) (right) against concurrency,
    one colour per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_tpot) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, server in enumerate(server_order(rows, meta)):
        pts = sorted((r for r in rows if r["server"] == server), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in pts]
        color = colors[i % len(colors)]
        ax_tp.plot(xs, [r["output_tok_s"] for r in pts], "o-", color=color, label=server)
        p50 = [(r["concurrency"], r["tpot_ms_p50"]) for r in pts if r["tpot_ms_p50"] is not None]
        p99 = [(r["concurrency"], r["tpot_ms_p99"]) for r in pts if r["tpot_ms_p99"] is not None]
        if p50:
            ax_tpot.plot(*zip(*p50), "o-", color=color, label=f"{server} p50")
        if p99:
            ax_tpot.plot(*zip(*p99), "x--", color=color, label=f"{server} p99")
    for ax, title, ylabel in ((ax_tp, "Output throughput", "output tokens/s"),
                              (ax_tpot, "Time per output token", "TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(bottom=0)
        concs = sorted({r["concurrency"] for r in rows})
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.legend(fontsize=8)
    s = meta.get("settings", {})
    tp = s.get("tensor_parallel_size", 1)
    fig.suptitle(f"{meta.get('device', '')}{f' x{tp} (TP={tp})' if tp != 1 else ''} - prompt {s.get('prompt_tokens')} / output {s.get('output_tokens')} "
                 f"tokens, {meta.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(rows: list[dict], meta: dict, out_dir: str | Path, stem: str) -> dict[str, Path]:
    """Write the four outputs; returns their paths. The PNG is skipped (with a note) when
    matplotlib is missing, so results are never lost to a plotting problem."""
    p = paths(out_dir, stem)
    p["json"].parent.mkdir(parents=True, exist_ok=True)
    rows = sorted_rows(rows, meta)
    for r in rows:
        assert tuple(r) == ROW_KEYS, f"row keys {tuple(r)} != {ROW_KEYS}"
    p["json"].write_text(json.dumps(rows, indent=1) + "\n")
    p["meta"].write_text(json.dumps(meta, indent=1) + "\n")
    p["md"].write_text(markdown(rows, meta))
    if rows:
        try:
            plot(rows, meta, p["png"])
        except ImportError as e:
            p.pop("png")
            meta.setdefault("notes", []).append(f"no plot: {e}")
            p["md"].write_text(markdown(rows, meta))
    else:
        p.pop("png")
    return p


def load(json_path: str | Path) -> tuple[list[dict], dict]:
    """Rows and metadata of one earlier run (the metadata file is optional)."""
    json_path = Path(json_path)
    rows = json.loads(json_path.read_text())
    meta_path = json_path.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return rows, meta


_RUN_DATE = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d UTC)")


def merge(json_paths: list[str | Path]) -> tuple[list[dict], dict]:
    """Combine earlier runs: later rows replace earlier ones for the same (server, concurrency);
    servers, cross-checks and notes are concatenated; device/versions/settings taken from the
    first run that has them (a differing device or settings is noted); the date is the span of
    the runs' dates."""
    by_key: dict[tuple, dict] = {}
    meta: dict = {"servers": {}, "crosscheck": [], "notes": [], "server_order": [], "merged_from": []}
    for path in json_paths:
        rows, m = load(path)
        # a file that is itself a merge names its own parts: keep naming the original runs
        meta["merged_from"] += m.get("merged_from") or [
            f"{Path(path).name} ({m.get('date', '?')}: {m.get('command', '?')})"]
        for key in ("device", "versions", "settings", "title"):
            if key in m and key not in meta:
                meta[key] = m[key]
            elif key in ("device", "settings") and key in m and m[key] != meta.get(key):
                meta["notes"].append(f"{Path(path).name} has a different {key}: {m[key]}")
        meta["servers"].update(m.get("servers") or {})
        meta["crosscheck"] += m.get("crosscheck") or []
        meta.setdefault("soak", [])
        meta["soak"] += m.get("soak") or []
        meta["notes"] += m.get("notes") or []
        for s in m.get("server_order") or []:
            if s not in meta["server_order"]:
                meta["server_order"].append(s)
        for r in rows:
            by_key[(r["server"], r["concurrency"])] = r
    # each merged_from entry reads "<file> (<date>: <command>)"
    dates = sorted(found.group(1) for f in meta["merged_from"] if (found := _RUN_DATE.search(f)))
    if dates:  # the span of the merged runs
        meta["date"] = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    rows = list(by_key.values())
    for r in rows:
        if r["server"] not in meta["server_order"]:
            meta["server_order"].append(r["server"])
    return rows, meta
