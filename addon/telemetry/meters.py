"""Metrics over OTLP, beside Prometheus: the `/metrics` series and the GenAI client metrics.

Loaded only with `telemetry.metrics` (spans.py makes it). The GenAI client metrics of
OpenTelemetry's semantic conventions v1.41.0, `gen_ai.client.token.usage` and
`gen_ai.client.operation.duration`, are the SDK's histograms with the buckets the
conventions give, recorded as each request ends. The Prometheus series are read from the
registry when they are sent, not counted twice: each family becomes the OTLP metric of the
same name (a counter a cumulative monotonic sum, a gauge a gauge, a histogram a histogram),
labels its attributes. With workers each process sends its own counts, under its own
`service.instance.id`, where `/metrics` serves their sum. A thread of its own sends them
every `exportInterval`, so that no request waits on the collector.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.util.types import Attributes
from prometheus_client.metrics_core import Metric as Family

from .. import __version__
from ..config import Telemetry as Settings
from ..metrics import Metrics

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
SCOPE = "claude-code-fallback"
DEFAULT_INTERVAL = 60.0  # seconds, as OTEL_METRIC_EXPORT_INTERVAL's default

log = logging.getLogger(__name__)


class Meters:
    """The GenAI client histograms, and the thread that sends them with the Prometheus series."""

    def __init__(self, settings: Settings, resource: Resource, metrics: Metrics) -> None:
        self.resource = resource
        self.metrics = metrics
        self.started = time.time_ns()  # the start of a series prometheus-client keeps no start of
        self.reader = InMemoryMetricReader()
        views = [
            View(
                instrument_name="gen_ai.client.token.usage",
                aggregation=ExplicitBucketHistogramAggregation(TOKEN_BUCKETS),
            ),
            View(
                instrument_name="gen_ai.client.operation.duration",
                aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS),
            ),
        ]
        self.provider = MeterProvider(
            metric_readers=[self.reader], resource=resource, views=views, shutdown_on_exit=False
        )
        meter = self.provider.get_meter(SCOPE, __version__)
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used."
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration."
        )
        self.exporter = OTLPMetricExporter(
            endpoint=f"{settings.endpoint}/v1/metrics" if settings.endpoint else None,
            headers=dict(settings.headers) or None,
            timeout=settings.timeout,
        )
        self.interval = settings.export_interval or interval_from_environment()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="ccf-otlp-metrics", daemon=True)
        self.thread.start()

    def record(
        self, seconds: float, input_tokens: int | None, output_tokens: int | None, attributes: Attributes
    ) -> None:
        """One GenAI operation: how long it took and, when its answer said, the tokens it used."""
        self.duration.record(seconds, attributes)
        if input_tokens is None or output_tokens is None:
            return
        base = dict(attributes or {})
        base.pop("error.type", None)
        self.tokens.record(input_tokens, {**base, "gen_ai.token.type": "input"})
        self.tokens.record(output_tokens, {**base, "gen_ai.token.type": "output"})

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.send()

    def send(self) -> None:
        """Sends every metric once; a failure waits for the next turn (the SDK logs why)."""
        try:
            self.exporter.export(self.collect())
        except Exception:  # a bug here must not end the thread: the next turn tries again
            log.warning("claude-code-fallback: metrics not sent over OTLP", exc_info=True)

    def collect(self) -> MetricsData:
        scopes: list[ScopeMetrics] = []
        own = self.reader.get_metrics_data()
        for resource_metrics in own.resource_metrics if own is not None else ():
            scopes += resource_metrics.scope_metrics
        bridged = bridge(self.metrics.own(), self.started, time.time_ns())
        scopes.append(ScopeMetrics(InstrumentationScope(f"{SCOPE}.prometheus", __version__), bridged, ""))
        return MetricsData([ResourceMetrics(self.resource, scopes, "")])

    def stop(self) -> None:
        """Sends the last counts; then nothing more."""
        self.stopping.set()
        self.send()
        self.exporter.shutdown()


def interval_from_environment() -> float:
    try:
        return float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "")) / 1000
    except ValueError:
        return DEFAULT_INTERVAL


def bridge(families: Iterable[Family], started: int, now: int) -> list[Metric]:
    """Prometheus families as OTLP metrics: counters cumulative monotonic sums, gauges gauges,
    histograms histograms (Prometheus keeps no minimum or maximum: they are left unset)."""
    out = []
    for family in families:
        if family.type == "counter":
            data: Any = Sum(_numbers(family, "_total", started, now), AggregationTemporality.CUMULATIVE, True)
        elif family.type == "gauge":
            data = Gauge(_numbers(family, "", started, now))
        elif family.type == "histogram":
            data = Histogram(_histograms(family, started, now), AggregationTemporality.CUMULATIVE)
        else:
            continue
        out.append(Metric(family.name, family.documentation, family.unit or "", data))
    return out


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "le"))


def _starts(family: Family) -> dict[tuple[tuple[str, str], ...], int]:
    """When each series began: its `_created` sample where prometheus-client keeps one."""
    return {_key(s.labels): int(s.value * 1e9) for s in family.samples if s.name == f"{family.name}_created"}


def _numbers(family: Family, suffix: str, started: int, now: int) -> list[NumberDataPoint]:
    starts = _starts(family)
    return [
        NumberDataPoint(dict(s.labels), starts.get(_key(s.labels), started), now, s.value)
        for s in family.samples
        if s.name == family.name + suffix
    ]


def _histograms(family: Family, started: int, now: int) -> list[HistogramDataPoint]:
    starts = _starts(family)
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = defaultdict(list)
    sums: dict[tuple[tuple[str, str], ...], float] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for sample in family.samples:
        key = _key(sample.labels)
        if sample.name == f"{family.name}_bucket":
            buckets[key].append((float(sample.labels["le"]), sample.value))
        elif sample.name == f"{family.name}_sum":
            sums[key] = sample.value
        elif sample.name == f"{family.name}_count":
            counts[key] = sample.value
    points = []
    for key, cumulative in buckets.items():
        cumulative.sort()
        per_bucket = [int(c - (cumulative[i - 1][1] if i else 0)) for i, (_, c) in enumerate(cumulative)]
        bounds = [bound for bound, _ in cumulative if bound != float("inf")]
        point = HistogramDataPoint(
            dict(key),
            starts.get(key, started),
            now,
            int(counts.get(key, cumulative[-1][1])),
            sums.get(key, 0.0),
            per_bucket,
            bounds,
            None,  # type: ignore[arg-type]  # unset in OTLP: Prometheus keeps no minimum
            None,  # type: ignore[arg-type]  # nor maximum
        )
        points.append(point)
    return points
