"""The status page's recent history, bounded and in memory: per-endpoint minutes and recent incidents.

Nothing here runs on a request's path. A background task samples the Prometheus counters
every few seconds and adds what grew since the last sample to the current minute, so an
hour of traffic is sixty small buckets however busy the proxy is. Failovers and stream
aborts arrive as the event log writes them (an `EventLog` listener); the last fifty are kept,
each with the cause its endpoint's cooldown gave ("HTTP 429" says more than "status").
With `server.workers`, each worker writes its incidents to a directory they share at each
sample, and the page shows every worker's (the others' as of their last sample).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import Metric

from ..metrics import Metrics
from ..state.endpoints import iso_time

MINUTES = 60
INCIDENTS = 50
SAMPLE_SECONDS = 5.0
INCIDENT_EVENTS = {"failover", "stream_aborted", "stream_resumed"}
ANSWERED = ("ok", "client_error")  # attempt outcomes that are not the endpoint's failure


def _counts() -> defaultdict[str, float]:
    return defaultdict(float)


@dataclass
class Minute:
    """What one endpoint did in one wall-clock minute, keyed by endpoint name."""

    start: int
    requests: defaultdict[str, float] = field(default_factory=_counts)
    errors: defaultdict[str, float] = field(default_factory=_counts)
    failovers: defaultdict[str, float] = field(default_factory=_counts)
    tokens: defaultdict[str, float] = field(default_factory=_counts)
    # time to headers: per endpoint, observations per histogram bucket (upper bound), not cumulative
    headers: defaultdict[str, defaultdict[float, float]] = field(
        default_factory=lambda: defaultdict(_counts)  # type: ignore[arg-type]
    )


class Timeline:
    """Sixty one-minute buckets per endpoint and the last fifty failovers and stream aborts."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        shared: Path | None = None,
        worker: int | None = None,
    ) -> None:
        self.clock = clock
        self.minutes: deque[Minute] = deque(maxlen=MINUTES)
        self.incidents: deque[dict[str, object]] = deque(maxlen=INCIDENTS)
        self.shared = shared  # workers: the directory where each writes its incidents
        self.worker = worker  # which worker this is, on each of its incidents
        self.recorded = self.written = 0  # incidents recorded, and how many had been when last written
        self.seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.causes: dict[str, str] = {}  # endpoint → why it last went cooling

    def record(self, event: str, fields: Mapping[str, object]) -> None:
        """An `EventLog` listener: keeps failovers, resumed and aborted streams, and why endpoints cool."""
        if event == "endpoint_cooling":
            self.causes[str(fields.get("endpoint"))] = str(fields.get("detail") or fields.get("reason"))
        if event not in INCIDENT_EVENTS:
            return
        source = fields.get("from_endpoint") or fields.get("endpoint")
        reason = fields.get("reason")
        if event == "failover":
            reason = self.causes.get(str(source), reason)
        incident = {
            "time": iso_time(self.clock()),
            "event": event,
            "from": source,
            "to": fields.get("to_endpoint"),
            "reason": reason,
        }
        if self.worker is not None:
            incident["worker"] = self.worker
        self.incidents.appendleft(incident)
        self.recorded += 1

    def share(self) -> None:
        """Workers: writes this worker's incidents for the others' pages, when there are new ones."""
        if self.shared is None or self.written == self.recorded:
            return
        path = self.shared / f"incidents-{os.getpid()}.json"  # by pid: a restarted worker's stay
        part = path.with_suffix(".part")
        with contextlib.suppress(OSError):  # a full disk: the other pages miss these for now
            part.write_text(json.dumps(list(self.incidents)))
            part.replace(path)  # whole or not at all, for a reader
            self.written = self.recorded

    def recent_incidents(self) -> list[dict[str, object]]:
        """The last fifty incidents, newest first: this process's, and every worker's."""
        found = list(self.incidents)
        if self.shared is None:
            return found
        mine = f"incidents-{os.getpid()}.json"
        for path in self.shared.glob("incidents-*.json"):
            if path.name != mine:
                with contextlib.suppress(OSError, ValueError):
                    found += json.loads(path.read_text())
        found.sort(key=lambda incident: str(incident["time"]), reverse=True)
        return found[:INCIDENTS]

    async def run(self, metrics: Metrics, interval: float = SAMPLE_SECONDS) -> None:
        while True:
            self.sample(metrics)
            self.share()
            await asyncio.sleep(interval)

    def sample(self, metrics: Metrics) -> None:
        """Adds what each counter grew by since the last sample to the current minute."""
        minute = self.current()
        attempts, failovers, tokens, headers = metrics.collect(
            metrics.attempts, metrics.failovers, metrics.tokens, metrics.time_to_headers
        )
        for labels, grew in self.growth(attempts, "_total"):
            minute.requests[labels["endpoint"]] += grew
            if labels["outcome"] not in ANSWERED:
                minute.errors[labels["endpoint"]] += grew
        for labels, grew in self.growth(failovers, "_total"):
            minute.failovers[labels["from_endpoint"]] += grew
        for labels, grew in self.growth(tokens, "_total"):
            minute.tokens[labels["endpoint"]] += grew
        # cumulative buckets: what each `le` grew by, less what the bucket below it grew by
        below: dict[str, float] = {}
        for labels, grew in self.growth(headers, "_bucket"):
            endpoint = labels["endpoint"]
            minute.headers[endpoint][float(labels["le"])] += grew - below.get(endpoint, 0.0)
            below[endpoint] = grew

    def growth(self, families: Iterable[Metric], suffix: str) -> Iterable[tuple[dict[str, str], float]]:
        for family in families:
            for sample in family.samples:
                if not sample.name.endswith(suffix):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                grew = sample.value - self.seen.get(key, 0.0)
                self.seen[key] = sample.value
                yield sample.labels, max(grew, 0.0)

    def current(self) -> Minute:
        start = int(self.clock() // 60) * 60
        if not self.minutes or self.minutes[-1].start != start:
            self.minutes.append(Minute(start))
        return self.minutes[-1]

    def history(self, endpoints: Iterable[str]) -> dict[str, object]:
        """The last sixty minutes, oldest first, one list of numbers per endpoint and series."""
        now = int(self.clock() // 60) * 60
        starts = [now - 60 * (MINUTES - 1 - i) for i in range(MINUTES)]
        by_start = {m.start: m for m in self.minutes}
        empty = Minute(0)
        rows = [by_start.get(s, empty) for s in starts]
        return {
            "minutes": [iso_time(s) for s in starts],
            "endpoints": {
                name: {
                    series: [round(getattr(m, series)[name], 3) for m in rows]
                    for series in ("requests", "errors", "failovers", "tokens")
                }
                for name in endpoints
            },
        }

    def headers_p50(self, endpoint: str) -> float | None:
        """The median time to headers over the kept minutes, in seconds, as histogram_quantile reads it."""
        counts: defaultdict[float, float] = defaultdict(float)
        for minute in self.minutes:
            for bound, n in minute.headers.get(endpoint, {}).items():
                counts[bound] += n
        total = sum(counts.values())
        if not total:
            return None
        rank, seen, lower = total / 2, 0.0, 0.0
        for bound in sorted(counts):
            if counts[bound] and seen + counts[bound] >= rank:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - seen) / counts[bound]
            seen += counts[bound]
            lower = bound
        return lower
