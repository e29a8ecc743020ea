"""The status page's history: minute buckets sampled from the real metrics, bounded, and recent incidents."""

from __future__ import annotations

import json
import os

from addon.metrics import Metrics
from addon.ops.timeline import INCIDENTS, MINUTES, Timeline
from addon.state.endpoints import EndpointPool


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # on a minute boundary

    def __call__(self) -> float:
        return self.now


def setup() -> tuple[Metrics, Timeline, Clock]:
    clock = Clock()
    return Metrics(EndpointPool()), Timeline(clock), clock


def test_each_sample_adds_what_grew_to_the_current_minute():
    metrics, timeline, clock = setup()
    metrics.attempts.labels("primary", "status").inc()
    metrics.attempts.labels("backup", "ok").inc(2)
    metrics.failovers.labels("primary", "backup").inc()
    metrics.tokens.labels("backup", "output").inc(40)
    metrics.tokens.labels("backup", "input").inc(2)
    timeline.sample(metrics)
    timeline.sample(metrics)  # nothing grew: nothing added
    clock.now += 60
    metrics.attempts.labels("backup", "ok").inc()
    timeline.sample(metrics)
    history = timeline.history(["primary", "backup"])
    assert len(history["minutes"]) == MINUTES
    primary, backup = history["endpoints"]["primary"], history["endpoints"]["backup"]
    last = {name: {s: v[-2:] for s, v in series.items()} for name, series in history["endpoints"].items()}
    assert last["primary"] == {"requests": [1, 0], "errors": [1, 0], "failovers": [1, 0], "tokens": [0, 0]}
    assert last["backup"] == {"requests": [2, 1], "errors": [0, 0], "failovers": [0, 0], "tokens": [42, 0]}
    assert sum(primary["requests"]) == 1 and sum(backup["requests"]) == 3


def test_the_median_time_to_headers_reads_the_histogram_like_prometheus():
    metrics, timeline, clock = setup()
    assert timeline.headers_p50("backup") is None
    for seconds in (0.02, 0.02, 0.02, 0.3):
        metrics.time_to_headers.labels("backup").observe(seconds)
    timeline.sample(metrics)
    # rank 2 of 4 falls in (0.01, 0.025], which holds 3: 0.01 + 0.015 * 2/3
    assert abs(timeline.headers_p50("backup") - 0.02) < 1e-9
    clock.now += 60
    for _ in range(4):
        metrics.time_to_headers.labels("backup").observe(0.4)
    timeline.sample(metrics)
    assert 0.25 < timeline.headers_p50("backup") <= 0.5


def test_only_an_hour_is_kept():
    metrics, timeline, clock = setup()
    for _ in range(3 * MINUTES):
        metrics.attempts.labels("primary", "ok").inc()
        timeline.sample(metrics)
        clock.now += 60
    assert len(timeline.minutes) == MINUTES
    assert sum(timeline.history(["primary"])["endpoints"]["primary"]["requests"]) == MINUTES - 1


def test_the_last_incidents_are_kept_newest_first_with_the_cooldown_cause():
    _, timeline, _ = setup()
    timeline.record("request", {"endpoint": "primary"})
    assert not timeline.incidents
    for i in range(INCIDENTS + 20):
        cooling = {"endpoint": "primary", "reason": "status", "detail": f"HTTP {i}"}
        timeline.record("endpoint_cooling", cooling)
        timeline.record("failover", {"from_endpoint": "primary", "to_endpoint": "backup", "reason": "status"})
    timeline.record("stream_aborted", {"endpoint": "backup", "reason": "upstream_cut"})
    assert len(timeline.incidents) == INCIDENTS
    newest, previous = timeline.incidents[0], timeline.incidents[1]
    assert (newest["event"], newest["from"], newest["to"], newest["reason"]) == (
        "stream_aborted",
        "backup",
        None,
        "upstream_cut",
    )
    assert (previous["event"], previous["from"], previous["to"]) == ("failover", "primary", "backup")
    assert previous["reason"] == f"HTTP {INCIDENTS + 19}"


def test_workers_see_each_others_incidents_newest_first(tmp_path):
    clock = Clock()
    timeline = Timeline(clock, shared=tmp_path, worker=0)
    timeline.share()
    assert list(tmp_path.iterdir()) == []  # nothing recorded, nothing written
    timeline.record("failover", {"from_endpoint": "primary", "to_endpoint": "backup", "reason": "status"})
    clock.now += 2
    timeline.record("stream_aborted", {"endpoint": "backup", "reason": "upstream_cut"})
    other = [
        {"time": "2027-01-15T08:00:01.000Z", "event": "failover", "from": "a", "to": "b", "worker": 1},
        {"time": "2027-01-15T07:59:59.000Z", "event": "failover", "from": "a", "to": "b", "worker": 1},
    ]
    (tmp_path / "incidents-999999.json").write_text(json.dumps(other))
    (tmp_path / "incidents-999998.json").write_text("{half a file")  # being written: skipped
    merged = timeline.recent_incidents()
    assert [(i["worker"], i["event"]) for i in merged] == [
        (0, "stream_aborted"),  # 08:00:02
        (1, "failover"),  # 08:00:01
        (0, "failover"),  # 08:00:00
        (1, "failover"),  # 07:59:59
    ]
    timeline.share()
    written = json.loads(next(tmp_path.glob(f"incidents-{os.getpid()}.json")).read_text())
    assert written == list(timeline.incidents)
    (tmp_path / "incidents-999999.json").write_text(json.dumps(other * INCIDENTS))
    assert len(timeline.recent_incidents()) == INCIDENTS
