"""The main benchmark's report: its targets judged against figures of the same run, and the
table, a line per figure with its ratios to the floor and to ccr and its targets beside."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .loads import ms
from .plan import (
    COLUMNS,
    LABELS,
    PROXIES,
    RSS_DELAY,
    RSS_STREAMS,
    SINGLE,
    STREAM_DELAY,
    STREAM_WORDS,
    VARIANTS,
    WORKER_VARIANTS,
    Results,
)


@dataclass(frozen=True)
class Target:
    """Each of `columns` must have `figure` `op` scale x the `base` variant's figure + offset
    (`offset` alone when there is no base); not judged when the base was not measured."""

    figure: str
    text: str  # as the table prints it
    op: str  # ">=" or "<="
    base: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    columns: tuple[str, ...] = PROXIES

    @property
    def key(self) -> str:
        return f"{self.figure} {self.text}"


RSS_LIMIT_MB = 115.0
TARGETS = (
    Target("rps", ">=0.90 x floor", ">=", "floor", 0.9, columns=SINGLE),
    Target("rps", ">=ccr", ">=", "ccr"),
    Target("rps", ">=0.95 x (3)", ">=", "healthy", 0.95, columns=("failover",)),
    Target("rps", ">=0.95 x (5)", ">=", "workers", 0.95, columns=("failover-w",)),
    Target("rps_sse", ">=ccr", ">=", "ccr"),
    Target("rps_sse", ">=0.95 x (3)", ">=", "healthy", 0.95, columns=("failover",)),
    Target("rps_sse", ">=0.95 x (5)", ">=", "workers", 0.95, columns=("failover-w",)),
    Target("c16_p99_ms", "<=ccr", "<=", "ccr"),
    Target("c16_sse_p99_ms", "<=ccr", "<=", "ccr"),
    Target("lat_p50_ms", "<=floor+1 ms", "<=", "floor", offset=1.0, columns=SINGLE),
    Target("ttfc_ms", "<=floor+1 ms", "<=", "floor", offset=1.0, columns=SINGLE),
    Target("jitter_p99_added_ms", "<=1 ms", "<=", offset=1.0, columns=SINGLE),
    Target("failover_gap_p50_ms", "<=backup TTFB+5", "<=", "direct", offset=5.0, columns=("failover",)),
    Target("rss_peak_mb", f"<={RSS_LIMIT_MB:g} MB", "<=", offset=RSS_LIMIT_MB, columns=SINGLE),
    # several processes are judged by what they cost the machine together, against ccr's
    Target("pss_peak_mb", "<=ccr", "<=", "ccr", columns=WORKER_VARIANTS),
    Target("cpu_per_1k_events_ms", "<=1.2 x (3)", "<=", "healthy", 1.2, columns=("workers",)),
    Target("cpu_per_1k_events_ms", "<=1.2 x (4)", "<=", "failover", 1.2, columns=("failover-w",)),
    Target("rss_idle_process_mb", "<=(3)+8 MB", "<=", "healthy", offset=8.0, columns=WORKER_VARIANTS),
    Target("start_answer_ms", "<=1000 ms", "<=", offset=1000.0, columns=("healthy", "workers")),
)


def evaluate(results: Results) -> None:
    """PASS/FAIL per target for its columns (of (3) to (6)); the limits come from the same run."""
    for target in TARGETS:
        row = results.figures.get(target.figure, {})
        base = 0.0 if target.base is None else row.get(target.base)
        if base is None:
            continue
        limit = target.scale * base + target.offset
        verdicts = {v: _cmp(row.get(v), limit, target.op) for v in target.columns}
        results.targets[target.key] = {v: ok for v, ok in verdicts.items() if ok is not None}
    if not measured(results, "ccr"):
        results.notes.append("claude-code-router was not measured: the targets against ccr are not judged")


def measured(results: Results, variant: str) -> bool:
    return any(row.get(variant) is not None for row in results.figures.values())


def _cmp(value: float | None, limit: float, op: str) -> bool | None:
    if value is None or math.isnan(limit):
        return None
    return value >= limit if op == ">=" else value <= limit


@dataclass(frozen=True)
class Row:
    """A figure's line in the table: its label, its digits, and whether lines of its ratios
    to the floor and to ccr follow it."""

    figure: str
    label: str
    digits: int
    ratios: bool
    note: str = ""  # in the target column, for a figure without a target


ROWS = (
    Row("rps", "req/s JSON, 16 conn", 0, True),
    Row("rps_sse", "req/s SSE, 16 conn", 0, True),
    Row("c16_p50_ms", "JSON p50 ms, 16 conn", 1, False),
    Row("c16_p99_ms", "JSON p99 ms, 16 conn", 1, True),
    Row("c16_sse_p50_ms", "SSE p50 ms, 16 conn", 1, False),
    Row("c16_sse_p99_ms", "SSE p99 ms, 16 conn", 1, True),
    Row("lat_p50_ms", "latency p50 ms, 1 conn", 2, True),
    Row("lat_p99_ms", "latency p99 ms, 1 conn", 2, False),
    Row("added_p50_ms", "  added p50 ms vs (1)", 2, False),
    Row("added_p99_ms", "  added p99 ms vs (1)", 2, False),
    Row("ttfe_ms", "SSE first event ms (p50)", 1, False, "(held by design)"),
    Row("ttfc_ms", "SSE first content event ms", 2, True),
    Row("ttfc_added_ms", "  first content vs (1) ms", 2, False),
    Row("jitter_p99_ms", "SSE jitter p99 |gap-20ms| ms", 2, False),
    Row("jitter_p99_added_ms", "  added jitter p99 ms", 2, False),
    Row("primary_429_p50_ms", "primary's own 429 ms, p50", 2, False),
    Row("failover_ttfb_p50_ms", "TTFB p50 ms: backup|failover", 2, False),
    Row("failover_gap_p50_ms", "429->backup 1st byte ms p50", 2, False),
    Row("failover_gap_p99_ms", "429->backup 1st byte ms p99", 2, False),
    Row("failover_first_ms", "first failover TTFB ms, cold", 2, False),
    Row("cpu_per_1k_events_ms", "CPU ms per 1000 SSE events", 0, True),
    Row("cpu_vs_one_process", "  x (3) or (4), one process", 2, False),
    Row("rss_idle_mb", "RSS idle MB", 1, False),
    Row("rss_idle_process_mb", "  largest process at rest", 1, False),
    Row("rss_idle_supervisor_mb", "  the supervisor at rest", 1, False),
    Row("start_answer_ms", "start: port -> 1st answer ms", 0, False),
    Row("start_served_ms", "start: port -> served ms", 0, False),
    Row("rss_peak_mb", f"RSS peak MB, {RSS_STREAMS} streams", 1, True),
    Row("pss_peak_mb", f"PSS peak MB, {RSS_STREAMS} streams", 1, True),
    Row("open_streams", "  streams open at once", 0, False),
    Row("open_ramp_s", "  s until all were open", 1, False),
)
LABEL, CELL, TARGET = 28, 10, 16  # column widths


def _fmt(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or not base or math.isnan(value) or math.isnan(base):
        return "-"
    return f"{value / base:.2f}"


def _verdict(results: Results, target: Target) -> str:
    verdicts = results.targets.get(target.key)
    if verdicts is None:
        return "no ccr" if target.base == "ccr" else ""
    return " ".join(f"{LABELS[v]}:{'PASS' if ok else 'FAIL'}" for v, ok in verdicts.items())


def _line(label: str, cells: list[str], widths: list[int], target: str = "", result: str = "") -> str:
    text = f"{label:{LABEL}s}" + "".join(f"{c:>{w}s}" for c, w in zip(cells, widths, strict=True))
    return f"{text}  {target:{TARGET}s} {result}".rstrip()


def table(results: Results) -> str:
    """One line per figure, then its ratios to the floor and to ccr; targets to the right."""
    shown = [v for v in VARIANTS if v not in ("ccr", *WORKER_VARIANTS) or measured(results, v)]
    heads = [COLUMNS[v].split(" ", 1) if COLUMNS[v].startswith("(") else ["", COLUMNS[v]] for v in shown]
    widths = [max(CELL, len(name) + 2) for _, name in heads]
    head = _line("figure", [name for _, name in heads], widths, "target", "result")
    lines = [_line("", [number for number, _ in heads], widths), head, "-" * len(head)]
    for row in ROWS:
        values = results.figures.get(row.figure)
        if values is not None:
            lines += _row_lines(results, row, values, shown, widths)
    return "\n".join(lines)


def _row_lines(
    results: Results, row: Row, values: dict[str, float | None], shown: list[str], widths: list[int]
) -> list[str]:
    """A figure's line, its ratio lines, and its targets beside them (more lines if needed)."""
    body = [(row.label, [_fmt(values[v], row.digits) for v in shown])]
    if row.ratios:
        bases = [b for b in ("floor", "ccr") if b in shown]
        body += [(f"  x {b}", [_ratio(values[v], values[b]) for v in shown]) for b in bases]
    targets = [t for t in TARGETS if t.figure == row.figure and set(t.columns) & set(shown)]
    judged = [(t.text, _verdict(results, t)) for t in targets]
    judged = judged or [(row.note, "")]
    body += [("", [""] * len(shown))] * (len(judged) - len(body))
    return [
        _line(label, cells, widths, *(judged[i] if i < len(judged) else ("", "")))
        for i, (label, cells) in enumerate(body)
    ]


def describe(results: Results) -> str:
    """What was measured with what, and how noisy the machine was meanwhile."""
    s, tools = results.settings, results.tools
    return (
        f"machine: {tools['cpus']} cores; proxies: {tools['proxies']}; ccr: {tools['ccr']}\n"
        f"throughput: {tools['throughput']}, small JSON and short SSE requests, {s.duration} s per "
        f"load after {s.warmup} s warm-up, loads taking turns; latency: aiohttp, "
        f"{s.latency_requests} sequential requests per variant on one keep-alive connection\n"
        f"streams: {s.streams} per variant, {STREAM_WORDS} words {ms(STREAM_DELAY):.0f} ms apart; "
        f"failover: {s.failover_samples} samples; memory: {RSS_STREAMS} streams held "
        f"{s.rss_hold:g} s once all are open, events {RSS_DELAY:g} s apart\n"
        "ccr: claude-code-router, primary healthy, fallback a 429 fake; (2) mitmdump + stream-only "
        "addon; floor: that addon in the lean master;\n(3) fallback addon healthy, (4) fallback "
        "addon with a 429 primary in cooldown; x floor, x ccr: ratio to that column;\n"
        f"{tools['workers']}\n"
        "a figure's targets are listed on its lines, result h: (3), f: (4), w: (5), fw: (6)\n"
        "failover rows: (1) is the backup's own time to first byte, (4) and (6) a proxy that tries "
        "its 429 primary on every request; 429->backup = (4) or (6) minus the primary's own 429 time\n"
        f"load average before the run: {results.load_before:.2f}; phases (wall s / CPU-s used "
        "by other processes): "
        + ", ".join(f"{k} {v:.0f}/{results.other_cpu.get(k, 0):.1f}" for k, v in results.timings.items())
    )
