"""What the main benchmark compares (its variants), what the fakes answer, how long each
measurement runs (Settings), and where its figures go (Results)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# The variants, in the table's order:
#   direct      the client talks to the fake upstream: the limit;
#   ccr         claude-code-router, one node process, its primary the fake and its
#               `fallback` provider a fake that answers 429;
#   mitmdump    `mitmdump --mode reverse:...` with the stream-only addon: what mitmdump costs;
#   floor       that addon in the lean master: mitmproxy's proxy core alone;
#   healthy     the proxy as `ccf` runs it, its only endpoint answering;
#   failover    the same with a primary answering 429 (`retry-after: 1`) in a long
#               cooldown, so the backup serves everything after the first request;
#   workers     healthy with `server.workers`: a supervisor and its worker processes;
#   failover-w  failover with the same workers (the primary's cooldown is shared).
VARIANTS = ("direct", "ccr", "mitmdump", "floor", "healthy", "failover", "workers", "failover-w")
MITM_VARIANTS = VARIANTS[2:]  # started by `services.start_proxies`
WORKER_VARIANTS = ("workers", "failover-w")  # only on the lean master: mitmdump ignores server.workers
SINGLE = ("healthy", "failover")  # the proxy as it runs by default, one process
FAILOVERS = frozenset(("failover", "failover-w"))  # a primary that answers 429
PROXIES = (*SINGLE, *WORKER_VARIANTS)
COLUMNS = {
    "direct": "(1) direct",
    "ccr": "ccr",
    "mitmdump": "(2) mitmdump",
    "floor": "floor",
    "healthy": "(3) proxy",
    "failover": "(4) failover",
    "workers": "(5) workers",
    "failover-w": "(6) failover w",
}
LABELS = {"healthy": "h", "failover": "f", "workers": "w", "failover-w": "fw"}  # in a target's result

# What the fakes answer
STREAM_WORDS = 20
STREAM_DELAY = 0.02
RSS_STREAMS = 500
RSS_DELAY = 0.25
RSS_EVENTS = 40  # sent RSS_DELAY apart, then the stream stalls (stays open) until the client leaves
EVENTS_PER_STREAM = STREAM_WORDS + 6  # message_start, block start, ping, deltas, stop, delta, stop
FAIL_NAME, FAST_NAME, STREAM_NAME, SLOW_NAME = "failing", "fast", "stream", "slow"
LONG_NAME = "long"
LONG_WORDS = 1500  # a long answer: one text delta per word, LONG_DELAY apart
LONG_DELAY = 0.002
LONG_STREAMS = 8  # at once, as a few sessions and their subagents would
LONG_ARGS = ["--text", " ".join(f"w{i}" for i in range(LONG_WORDS)), "--event-delay", str(LONG_DELAY)]
FAIL_NOW_NAME = "failing-now"


def fake_specs() -> dict[str, list[str]]:
    """The fake upstreams of a run, by name: their `python -m addon.fakes.anthropic` arguments."""
    words = " ".join(f"word{i}" for i in range(STREAM_WORDS))
    slow_words = " ".join(f"word{i}" for i in range(RSS_EVENTS))
    return {
        FAST_NAME: [],
        FAIL_NAME: ["--kind", "status", "--status", "429", "--header", "retry-after: 1"],
        FAIL_NOW_NAME: ["--kind", "status", "--status", "429"],
        STREAM_NAME: ["--text", words, "--event-delay", str(STREAM_DELAY)],
        SLOW_NAME: [
            *("--kind", "stall", "--after-events", str(RSS_EVENTS), "--text", slow_words),
            *("--event-delay", str(RSS_DELAY)),
        ],
        LONG_NAME: LONG_ARGS,
    }


@dataclass(frozen=True)
class Settings:
    """How long and how often a run measures, and how it runs the proxy: `runner` "lean"
    (the lean master, as `ccf` runs it) or "mitmdump" (`mitmdump -s addon/fallback.py`,
    without the worker variants), with `workers` the server.workers of those variants."""

    duration: int
    warmup: int
    latency_requests: int
    latency_block: int
    streams: int
    failover_samples: int
    rss_hold: float
    relay_rounds: int
    starts: int
    runner: str = "lean"
    workers: int = 2

    @classmethod
    def make(cls, quick: bool, duration: int | None, runner: str = "lean", workers: int = 2) -> Settings:
        quick_run = cls(2, 1, 300, 100, 4, 60, 1.0, 1, 1)
        # six 5 s rounds per load: with two, a comparison of two columns within 5% could flip
        base = quick_run if quick else cls(30, 2, 2000, 200, 16, 400, 4.0, 3, 3)
        base = base if duration is None else cls(**{**asdict(base), "duration": duration})
        return replace(base, runner=runner, workers=workers)

    def mitm_variants(self) -> tuple[str, ...]:
        """The variants `services.start_proxies` runs: the worker ones only on the lean master."""
        return tuple(v for v in MITM_VARIANTS if self.runner == "lean" or v not in WORKER_VARIANTS)


@dataclass
class Results:
    """Everything a run found: each figure by variant (None where it was not measured), each
    target's verdicts, notes on what went wrong or was noisy, and each phase's wall time and
    the CPU other processes used meanwhile."""

    settings: Settings
    tools: dict[str, str]
    figures: dict[str, dict[str, float | None]] = field(default_factory=dict)
    targets: dict[str, dict[str, bool]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    other_cpu: dict[str, float] = field(default_factory=dict)  # CPU-s used by other processes
    load_before: float = 0.0

    def put(self, figure: str, variant: str, value: float | None) -> None:
        self.figures.setdefault(figure, {v: None for v in VARIANTS})[variant] = value
