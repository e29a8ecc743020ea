"""Prometheus metrics: one registry per addon, served on the proxy port and optionally on its own.

Label values are bounded: endpoint names come from the config, outcomes and reasons from
fixed sets. Endpoint state is read from the pool at scrape time rather than kept twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .endpoints import COOLING, EndpointPool
from .sse import Usage

NAMESPACE = "ccf"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _EndpointCollector(Collector):
    def __init__(self, pool: Callable[[], EndpointPool]) -> None:
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
        for state in self.pool():
            up.add_metric([state.name], 0 if state.status == COOLING else 1)
            left.add_metric([state.name], state.cooldown_left())
            failures.add_metric([state.name], state.consecutive_failures)
        yield from (up, left, failures)


class Metrics:
    def __init__(self, pool: Callable[[], EndpointPool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "requests",
            "Client requests by final outcome.",
            ["outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.attempts = Counter(
            "upstream_attempts",
            "Upstream attempts by endpoint and outcome.",
            ["endpoint", "outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.failovers = Counter(
            "failovers",
            "Requests that moved from one endpoint to the next.",
            ["from_endpoint", "to_endpoint"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.time_to_headers = Histogram(
            "upstream_time_to_headers_seconds",
            "Time from sending a request upstream to its response headers.",
            ["endpoint"],
            namespace=NAMESPACE,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.request_duration = Histogram(
            "request_duration_seconds",
            "Whole client request duration, to the end of the response body.",
            ["outcome"],
            namespace=NAMESPACE,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.active_streams = Gauge(
            "active_streams",
            "Responses being relayed to clients right now.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.stream_aborts = Counter(
            "stream_aborts",
            "Responses cut after they began, by endpoint and reason.",
            ["endpoint", "reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.resumes = Counter(
            "stream_resumes",
            "Streams cut mid-answer and continued on another endpoint.",
            ["from_endpoint", "to_endpoint"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.retries = Counter(
            "retries",
            "Attempts that went back to an endpoint that had already failed or was cooling.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.backoff = Counter(
            "backoff_seconds",
            "Time requests spent waiting between attempts.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.budget_exhausted = Counter(
            "retry_budget_exhausted",
            "Retries refused because the retry budget was spent.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.cooldowns = Counter(
            "endpoint_cooldowns",
            "Times an endpoint was put to cool, by reason.",
            ["endpoint", "reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.reloads = Counter(
            "config_reloads",
            "Config reloads by result.",
            ["result"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.tokens = Counter(
            "tokens",
            "Tokens reported by endpoints in streamed usage fields.",
            ["endpoint", "kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        r.register(_EndpointCollector(pool))

    def count_usage(self, endpoint: str, usage: list[Usage]) -> None:
        if not usage:
            return
        # message_start carries input and cache figures, the final message_delta the output total
        totals = {
            "input": max(u.input for u in usage),
            "output": max(u.output for u in usage),
            "cache_read": max(u.cache_read for u in usage),
            "cache_creation": max(u.cache_creation for u in usage),
        }
        for kind, value in totals.items():
            if value:
                self.tokens.labels(endpoint, kind).inc(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
