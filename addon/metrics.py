"""Prometheus metrics: one registry per addon, served on the proxy port and optionally on its own.

Label values are bounded: endpoint names come from the config, outcomes and reasons from
fixed sets. Endpoint state is read from the pool at scrape time rather than kept twice.
Workers of one proxy (workers.py) keep their counts in prometheus-client's multiprocess
files instead, and any worker serves the sum of all.
"""

from __future__ import annotations

import os
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .sse import Usage
from .state.endpoints import COOLING, EndpointPool

NAMESPACE = "ccf"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _EndpointCollector(Collector):
    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{NAMESPACE}_endpoint_up",
            "1 when the endpoint takes requests, 0 while it cools down.",
            labels=["endpoint"],
        )
        left = GaugeMetricFamily(
            f"{NAMESPACE}_endpoint_cooldown_remaining_seconds",
            "Seconds until a cooling endpoint may be probed again.",
            labels=["endpoint"],
        )
        failures = GaugeMetricFamily(
            f"{NAMESPACE}_endpoint_consecutive_failures",
            "Failures since the endpoint last answered well.",
            labels=["endpoint"],
        )
        # `window` takes the names the endpoint sends (5h, 7d, requests, ...), a few at most
        utilization = GaugeMetricFamily(
            f"{NAMESPACE}_endpoint_ratelimit_utilization",
            "How full each usage window of the endpoint is (0 to 1), as its last response said.",
            labels=["endpoint", "window"],
        )
        resets = GaugeMetricFamily(
            f"{NAMESPACE}_endpoint_ratelimit_reset_timestamp_seconds",
            "When each usage window of the endpoint reopens (Unix time).",
            labels=["endpoint", "window"],
        )
        info = GaugeMetricFamily(
            f"{NAMESPACE}_endpoint_info",
            "Always 1: which platform each endpoint is (anthropic, bedrock, bedrock-mantle, vertex, openai).",
            labels=["endpoint", "provider"],
        )
        for state in self.pool:
            info.add_metric([state.name, state.endpoint.provider], 1)
            up.add_metric([state.name], 0 if state.status == COOLING else 1)
            left.add_metric([state.name], state.cooldown_left())
            failures.add_metric([state.name], state.consecutive_failures)
            for window, reading in state.current_windows().items():
                if reading.utilization is not None:
                    utilization.add_metric([state.name, window], reading.utilization)
                if reading.resets_at is not None:
                    resets.add_metric([state.name, window], reading.resets_at)
        yield from (info, up, left, failures, utilization, resets)


class _Memory:
    up = True


_ALWAYS_UP = _Memory()


class Backend(Protocol):
    """The shared state, as the metrics see it."""

    @property
    def up(self) -> bool: ...


class _StateCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{NAMESPACE}_state_backend_up",
            "1 while the state backend works (always for memory); 0 while Redis is away.",
            value=1 if self.metrics.backend.up else 0,
        )


class Budgets(Protocol):
    """The spend caps (cost/budgets.py), as the metrics see them."""

    def used(self) -> list[tuple[str, str, float]]: ...


class _NoBudgets:
    def used(self) -> list[tuple[str, str, float]]:
        return []


class _BudgetCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        # `client` is a key's name from the config, or `*` for the whole proxy's budget
        used = GaugeMetricFamily(
            f"{NAMESPACE}_budget_used_ratio",
            "How much of each budget is spent (1 is all of it), by client (`*`: the whole proxy) "
            "and window: daily, weekly, monthly.",
            labels=["client", "window"],
        )
        for client, window, ratio in self.metrics.budgets.used():
            used.add_metric([client, window], ratio)
        yield used


class Metrics:
    """The proxy's Prometheus metrics; endpoint states are read from `pool` when scraped."""

    def __init__(self, pool: EndpointPool, backend: Backend | None = None) -> None:
        self.backend: Backend = backend or _ALWAYS_UP  # the fleet's shared state, once started
        self.budgets: Budgets = _NoBudgets()  # the spend caps, once the process has them
        self.registry = CollectorRegistry()
        self._requests()
        self._attempts()
        self._streams()
        self._endpoints()
        self._telemetry()
        # What /metrics serves: this registry, or with workers every worker's counts
        self.exposition = self.registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            self.exposition = CollectorRegistry()
            MultiProcessCollector(self.exposition)
        self.collectors = [_EndpointCollector(pool), _StateCollector(self), _BudgetCollector(self)]
        for collector in self.collectors:
            self.exposition.register(collector)

    def _requests(self) -> None:
        """Client requests: their outcomes, durations and the tokens their answers used."""
        counter = self._counter
        self.requests = counter(
            "requests",
            "Client requests by final outcome and client (its access key's name).",
            "outcome",
            "client",
        )
        self.request_duration = Histogram(
            "request_duration_seconds",
            "Whole client request duration, to the end of the response body.",
            ["outcome", "client"],
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.tokens = counter(
            "tokens",
            "Tokens reported in usage fields, by kind: input, output, cache_read, cache_creation.",
            "endpoint",
            "kind",
        )
        # `model`: the price table's name for the model (`other` for an endpoint's `*` price)
        self.cost = counter(
            "cost_usd",
            "What answers cost in US dollars at the price table's rates (a subscription's at what "
            "Anthropic's API would charge), by client, endpoint and the table's name for the model.",
            "client",
            "endpoint",
            "model",
        )
        self.budget_refusals = counter(
            "budget_refusals",
            "Requests refused because a budget was spent, by the budget's client (`*`: the whole "
            "proxy's) and window.",
            "client",
            "window",
        )
        self.reloads = counter("config_reloads", "Config reloads by result: success or error.", "result")

    def _attempts(self) -> None:
        """Upstream attempts: their outcomes, failovers, retries and waits."""
        counter = self._counter
        self.attempts = counter(
            "upstream_attempts",
            "Upstream attempts by endpoint and outcome: ok, client_error, or why it failed.",
            "endpoint",
            "outcome",
        )
        self.failovers = counter(
            "failovers", "Requests that moved from one endpoint to the next.", "from_endpoint", "to_endpoint"
        )
        self.cache_routed = counter(
            "cache_routed",
            "Requests the prompt-cache rules sent to another endpoint than the strategy's first choice, "
            "by rule: tool_loop, stay_warm, to_warm.",
            "endpoint",
            "rule",
        )
        self.stale_retries = counter(
            "upstream_stale_retries",
            "Requests sent again on a new connection after a pooled one turned out closed (no cooldown).",
            "endpoint",
        )
        self.time_to_headers = Histogram(
            "upstream_time_to_headers_seconds",
            "Time from sending a request upstream to its response headers.",
            ["endpoint"],
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.retries = counter(
            "retries", "Attempts that went back to an endpoint that had already failed or was cooling."
        )
        self.backoff = counter("backoff_seconds", "Time requests spent waiting between attempts.")
        self.budget_exhausted = counter(
            "retry_budget_exhausted", "Retries refused because the retry budget was spent."
        )

    def _streams(self) -> None:
        """Answers being relayed, cut or continued."""
        counter = self._counter
        self.active_streams = Gauge(
            "active_streams",
            "Responses being relayed to clients right now.",
            namespace=NAMESPACE,
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.stream_aborts = counter(
            "stream_aborts", "Responses cut after they began, by endpoint and reason.", "endpoint", "reason"
        )
        self.resumes = counter(
            "stream_resumes",
            "Streams cut mid-answer and continued on another endpoint.",
            "from_endpoint",
            "to_endpoint",
        )

    def _endpoints(self) -> None:
        """What happened to endpoints: cooldowns and refused credentials."""
        counter = self._counter
        self.cooldowns = counter(
            "endpoint_cooldowns", "Times an endpoint was put to cool, by reason.", "endpoint", "reason"
        )
        self.credentials_refused = counter(
            "endpoint_credentials_refused",
            "Times an endpoint answered 401 or 403 to credentials the proxy chose (its key, a cloud role).",
            "endpoint",
        )

    def _telemetry(self) -> None:
        """What became of the traces sent over OTLP (telemetry/)."""
        self.spans_dropped = self._counter(
            "telemetry_spans_dropped",
            "Spans not sent to the OpenTelemetry collector because too many were waiting for it "
            "(telemetry.maxQueueSize): it was slow or away.",
        )

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(name, documentation, labels, namespace=NAMESPACE, registry=self.registry)

    def count_usage(self, endpoint: str, usage: Usage) -> None:
        """One answer's tokens (`sse.combined` of its events')."""
        totals = {
            "input": usage.input,
            "output": usage.output,
            "cache_read": usage.cache_read,
            "cache_creation": usage.cache_creation,
        }
        for kind, value in totals.items():
            if value:
                self.tokens.labels(endpoint, kind).inc(value)

    def render(self) -> bytes:
        return generate_latest(self.exposition)

    def own(self) -> Iterable[Metric]:
        """This process's series: with workers its own counts, where /metrics serves every
        worker's summed (what OTLP sends, each worker under its own instance id)."""
        if self.exposition is self.registry:
            return self.registry.collect()
        return [
            *self.registry.collect(),
            *(family for collector in self.collectors for family in collector.collect()),
        ]

    def collect(self, *metrics: MetricWrapperBase) -> list[list[Metric]]:
        """Each metric's families as /metrics serves them: with workers, summed over all.

        One pass over the exposition for all of them: with workers that reads every
        worker's file.
        """
        if self.exposition is self.registry:
            return [list(metric.collect()) for metric in metrics]
        families = list(self.exposition.collect())
        names = [metric._name for metric in metrics]  # type: ignore[attr-defined]
        return [[family for family in families if family.name == name] for name in names]

    def streams_now(self) -> int:
        (streams,) = self.collect(self.active_streams)
        return int(sum(s.value for family in streams for s in family.samples))

    def requests_by_client(self) -> dict[str, int]:
        counts: Tally[str] = Tally()
        (requests,) = self.collect(self.requests)
        for family in requests:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["client"]] += int(sample.value)
        return dict(counts)
