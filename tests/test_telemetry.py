"""OpenTelemetry: each request's trace and the metrics, as a real OTLP/HTTP collector receives them.

The proxy runs as `ccf dev` runs it, against fake upstreams, and sends to a small collector
on loopback that decodes what arrives with opentelemetry-proto, as any collector would.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from addon.config import ConfigError, load_config
from addon.fakes.anthropic import Behavior, FakeAnthropic, blackhole_listener

from .conftest import (
    ACCESS_KEY,
    BACKUP_KEY,
    PRIMARY_KEY,
    ROOT,
    Proxy,
    endpoints_config,
    free_port,
    wait_until,
)
from .test_failover import MESSAGE, open_when, sdk
from .test_resume import REST, TODAY

pytest.importorskip("opentelemetry.proto", reason="the test extra brings opentelemetry-proto")

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

SERVER, CLIENT = SpanProto.SPAN_KIND_SERVER, SpanProto.SPAN_KIND_CLIENT
PROMPT = "Please keep this distinctive prompt text out of every span attribute"
SESSION = "3f6d2c1e-5b7a-4c8d-9e0f-123456789abc"
CLIENT_KEY = "sk-ant-client-key-0000"  # what `sdk` and `post` present


# -- a collector -------------------------------------------------------------------------------


@dataclass
class SpanSeen:
    """One span as the collector decoded it."""

    trace_id: str
    span_id: str
    parent: str
    name: str
    kind: int
    start: int
    end: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: int
    resource: dict[str, Any]


@dataclass
class Collector:
    """An OTLP/HTTP receiver on loopback: /v1/traces and /v1/metrics, protobuf-encoded."""

    spans: list[SpanSeen] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Collector:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                elif self.headers.get("content-encoding") == "deflate":
                    body = zlib.decompress(body)
                if self.path == "/v1/traces":
                    collector.traces(body)
                    reply = trace_service_pb2.ExportTraceServiceResponse()
                else:
                    collector.received_metrics(body)
                    reply = metrics_service_pb2.ExportMetricsServiceResponse()
                out = reply.SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def traces(self, body: bytes) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        seen = []
        for resource_spans in request.resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    seen.append(
                        SpanSeen(
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.name,
                            span.kind,
                            span.start_time_unix_nano,
                            span.end_time_unix_nano,
                            attributes_of(span.attributes),
                            [(e.name, attributes_of(e.attributes)) for e in span.events],
                            span.status.code,
                            resource,
                        )
                    )
        with self.lock:
            self.spans += seen

    def received_metrics(self, body: bytes) -> None:
        with self.lock:
            self.metrics.append(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))

    def trace(self, trace_id: str, spans: int) -> list[SpanSeen]:
        """The spans of one trace, in the order they started, once `spans` of them have come."""

        def arrived() -> list[SpanSeen]:
            with self.lock:
                found = [s for s in self.spans if s.trace_id == trace_id]
            return found if len(found) >= spans else []

        return sorted(wait_until(arrived, 10, f"{spans} spans of trace {trace_id}"), key=lambda s: s.start)

    def request_span(self, since: int) -> SpanSeen:
        """The first server span that began after `since` (a time.time_ns())."""

        def arrived() -> SpanSeen | None:
            with self.lock:
                return next((s for s in self.spans if s.kind == SERVER and s.start >= since), None)

        found: SpanSeen = wait_until(arrived, 10, "a request's span")
        return found

    def metric_names(self) -> set[str]:
        with self.lock:
            return {
                metric.name
                for request in self.metrics
                for resource_metrics in request.resource_metrics
                for scope_metrics in resource_metrics.scope_metrics
                for metric in scope_metrics.metrics
            }


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes_of(pairs: Any) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


# -- the proxies -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    collector = Collector().start()
    yield collector
    collector.stop()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[FakeAnthropic]]:
    fakes = [FakeAnthropic(name).start_in_thread() for name in ("first", "second", "third")]
    yield fakes
    for fake in fakes:
        fake.stop_thread()


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Proxy]]:
    """Proxies as `ccf dev` or mitmdump runs them, for the whole module; no key may reach their logs."""
    started: list[Proxy] = []

    def make(config: dict[str, Any], ccf: bool = True) -> Proxy:
        proxy = Proxy(tmp_path_factory.mktemp("proxy"), config, ccf=ccf)
        started.append(proxy)
        return proxy.start()

    yield make
    for proxy in started:
        proxy.stop()
    for proxy in started:
        for key in (PRIMARY_KEY, BACKUP_KEY, ACCESS_KEY):
            assert key not in proxy.logs(), f"{key} leaked into {proxy.log_path}"


def telemetry(endpoint: str, **more: Any) -> dict[str, Any]:
    return {"enabled": True, "endpoint": endpoint, "scheduleDelay": 50, **more}


@pytest.fixture(scope="module")
def traced(proxies, upstreams, collector) -> Proxy:
    config = endpoints_config(
        *upstreams,
        retry={"cooldownSeconds": 0.3},
        streaming={"resume": True},
        telemetry=telemetry(collector.url, metrics=True, exportInterval=200),
    )
    return proxies(config)


@pytest.fixture
def proxy(traced, upstreams) -> Proxy:
    """The traced proxy, its upstreams answering well and none of them cooling."""
    for fake in upstreams:
        fake.reset()
        fake.cut_gate = None
    wait_until(lambda: all(e["status"] == "healthy" for e in traced.health()["endpoints"]), 5, "no cooldown")
    return traced


def post(proxy: Proxy, headers: dict[str, str] | None = None, stream: bool = False) -> httpx.Response:
    body = dict(MESSAGE, stream=stream, messages=[{"role": "user", "content": PROMPT}])
    return httpx.post(
        proxy.url + "/v1/messages",
        json=body,
        headers={"x-api-key": CLIENT_KEY, "x-claude-code-session-id": SESSION, **(headers or {})},
        timeout=30,
    )


def every_value(span: SpanSeen) -> list[str]:
    values = [*span.attributes.values(), *span.resource.values()]
    values += [v for _, attributes in span.events for v in attributes.values()]
    return [json.dumps(v) for v in values]


# -- traces ------------------------------------------------------------------------------------


def test_a_request_failed_over_twice_is_one_trace_with_three_attempts_in_order(proxy, collector, upstreams):
    first, second, third = upstreams
    first.behavior = Behavior(kind="status", status=529)
    second.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "0.2"),))
    since = time.time_ns()
    answer = post(proxy, stream=True)
    assert answer.status_code == 200 and answer.text.endswith('data: {"type":"message_stop"}\n\n')
    request = collector.request_span(since)
    spans = collector.trace(request.trace_id, 4)
    assert [s.kind for s in spans] == [SERVER, CLIENT, CLIENT, CLIENT]
    attempts = spans[1:]
    assert all(s.parent == request.span_id for s in attempts)
    assert [s.attributes["ccf.endpoint"] for s in attempts] == ["first", "second", "third"]
    assert [s.attributes.get("ccf.failure.kind") for s in attempts] == ["status", "status", None]
    assert [s.attributes["http.response.status_code"] for s in attempts] == [529, 429, 200]
    assert [s.attributes.get("http.request.resend_count") for s in attempts] == [None, 1, 2]
    assert [s.attributes["ccf.cooled"] for s in attempts] == [True, True, False]
    assert [s.attributes.get("error.type") for s in attempts] == ["529", "429", None]
    assert attempts[1].attributes["ccf.retry_after"] == pytest.approx(0.2)
    assert all(s.name == "POST" and s.attributes["server.address"] == "127.0.0.1" for s in attempts)
    assert all(s.attributes["ccf.platform"] == "anthropic" for s in attempts)
    assert attempts[2].attributes["url.full"] == f"{third.url}/v1/messages"
    assert 0 < attempts[2].attributes["ccf.time_to_first_byte"] < 5
    assert [name for name, _ in attempts[2].events] == ["ccf.preamble.held"]
    assert attempts[2].end <= request.end  # open while the stream was relayed
    assert request.name == "chat claude-sonnet-4-6"
    assert request.attributes == {
        "http.request.method": "POST",
        "url.path": "/v1/messages",
        "ccf.client": "anonymous",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "claude-sonnet-4-6",
        "gen_ai.conversation.id": SESSION,
        "ccf.outcome": "success",
        "ccf.attempts": 3,
        "http.response.status_code": 200,
        "ccf.endpoint": "third",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.response.model": "claude-sonnet-4-6",
        "gen_ai.response.finish_reasons": ["end_turn"],
        "gen_ai.usage.input_tokens": request.attributes["gen_ai.usage.input_tokens"],
        "gen_ai.usage.output_tokens": request.attributes["gen_ai.usage.output_tokens"],
        "gen_ai.usage.cache_read.input_tokens": 0,
        "gen_ai.usage.cache_creation.input_tokens": 0,
    }
    assert request.attributes["gen_ai.usage.input_tokens"] > 0
    assert request.attributes["gen_ai.usage.output_tokens"] > 0
    assert request.resource["service.name"] == "claude-code-fallback"
    assert request.resource["service.instance.id"]


def test_a_clients_traceparent_is_continued(proxy, collector):
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    answer = post(proxy, {"traceparent": f"00-{trace_id}-{parent}-01"})
    assert answer.status_code == 200
    (request, attempt) = collector.trace(trace_id, 2)
    assert request.kind == SERVER and request.parent == parent
    assert attempt.kind == CLIENT and attempt.parent == request.span_id
    assert request.attributes["gen_ai.response.finish_reasons"] == ["end_turn"]  # a whole answer's


def test_a_stream_continued_elsewhere_shows_the_break_and_the_continuation(proxy, collector, upstreams):
    first, second, _ = upstreams
    first.behavior = Behavior(kind="close_mid_stream", text="Hello there from the first", after_events=5)
    second.behavior = Behavior(kind="ok", text=REST)
    gate = first.cut_gate = threading.Event()
    since = time.time_ns()
    with sdk(proxy).messages.stream(**TODAY) as stream:
        assert "".join(open_when(gate, "Hello there", stream.text_stream)) == "Hello there" + REST
    request = collector.request_span(since)
    broken, continued = collector.trace(request.trace_id, 3)[1:]
    assert [name for name, _ in broken.events] == ["ccf.preamble.held", "ccf.stream.resumed"]
    assert broken.events[1][1] == {"ccf.resume.reason": "upstream_cut"}
    assert broken.attributes["error.type"] == "upstream_cut" and broken.attributes["ccf.cooled"] is True
    assert continued.attributes["ccf.endpoint"] == "second" and continued.start >= broken.end
    assert request.attributes["ccf.outcome"] == "success" and request.attributes["ccf.attempts"] == 2


def test_no_key_and_no_prompt_text_is_in_any_attribute(proxy, collector, upstreams):
    upstreams[0].behavior = Behavior(kind="status", status=500)
    since = time.time_ns()
    assert post(proxy, stream=True).status_code == 200
    collector.trace(collector.request_span(since).trace_id, 3)
    with collector.lock:
        spans = list(collector.spans)  # this test's, and those of the tests before it in this module
    for span in spans:
        for value in every_value(span):
            for secret in (PRIMARY_KEY, BACKUP_KEY, CLIENT_KEY, PROMPT, "distinctive"):
                assert secret not in value, (span.name, value)


def test_metrics_go_over_otlp_too_and_prometheus_keeps_them(proxy, collector):
    assert post(proxy).status_code == 200
    expected = {"ccf_requests", "ccf_request_duration_seconds", "ccf_endpoint_up"}
    expected |= {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"}
    wait_until(lambda: expected <= collector.metric_names(), 10, "the metrics over OTLP")
    assert proxy.metric("ccf_requests_total", outcome="success", client="anonymous") >= 1


# -- a collector that is away ----------------------------------------------------------------------


def test_each_worker_exports_its_spans_with_its_own_instance_id(proxies, upstreams, collector):
    """With `server.workers`, every worker sends its own spans, told apart by `service.instance.id`."""
    upstreams[2].reset()
    workers = proxies(
        endpoints_config(upstreams[2], server={"workers": 2}, telemetry=telemetry(collector.url))
    )
    since = time.time_ns()

    def instances() -> set[str] | None:
        # each request on a new connection: the supervisor hands them out in turn, once the
        # second worker serves too (the proxy answers as soon as the first does)
        assert post(workers).status_code == 200
        with collector.lock:
            seen = {s.resource.get("service.instance.id") for s in collector.spans if s.start >= since}
        return seen if len(seen) >= 2 else None

    found = wait_until(instances, 20, "spans from both workers")
    assert len(found) == 2 and None not in found


def settings(collector: str) -> dict[str, Any]:
    """Spans sent every 50 ms, at most 4 waiting, 300 ms for an export: a dead collector shows fast."""
    return telemetry(collector, maxQueueSize=4, timeout=300)


@pytest.fixture(scope="module")
def served(proxies, upstreams, collector) -> Proxy:
    """A proxy whose collector answers (mitmdump's: `ccf dev`'s figures are not compared here)."""
    return proxies(endpoints_config(upstreams[2], telemetry=settings(collector.url)), ccf=False)


def dead_collector(kind: str) -> tuple[str, socket.socket | None]:
    if kind == "refused":
        return f"http://127.0.0.1:{free_port()}", None
    listener, port = blackhole_listener()  # connects hang: a collector that never answers
    return f"http://127.0.0.1:{port}", listener


def timed(proxies: dict[str, Proxy], rounds: int) -> tuple[dict[str, list[float]], dict[str, set[str]]]:
    """Each proxy's latencies and answers, the proxies taking turns, one request at a time each.

    http.client sends a request in one write: no delay of the client's own blurs the figures.
    """
    connections = {name: http.client.HTTPConnection("127.0.0.1", p.port) for name, p in proxies.items()}
    body, headers = json.dumps(MESSAGE), {"content-type": "application/json", "x-api-key": CLIENT_KEY}
    latency: dict[str, list[float]] = {name: [] for name in proxies}
    answers: dict[str, set[str]] = {name: set() for name in proxies}
    for _ in range(rounds):
        for name, connection in connections.items():
            started = time.perf_counter()
            connection.request("POST", "/v1/messages", body, headers)
            answer = connection.getresponse()
            text = json.loads(answer.read())["content"][0]["text"]
            latency[name].append(time.perf_counter() - started)
            answers[name].add(f"{answer.status} {text}")
    for connection in connections.values():
        connection.close()
    return latency, answers


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_a_dead_collector_changes_no_answer_and_no_latency(proxies, upstreams, served, kind):
    upstreams[2].reset()
    url, listener = dead_collector(kind)
    try:
        dead = proxies(endpoints_config(upstreams[2], telemetry=settings(url)), ccf=False)
        latency, answers = timed({"dead": dead, "served": served}, 100)
        assert answers["dead"] == answers["served"] == {"200 Hello from the fake."}
        slower = statistics.median(
            d - s for d, s in zip(latency["dead"][10:], latency["served"][10:], strict=True)
        )
        usual = statistics.median(latency["served"][10:])
        # a dead collector that held requests up would add its 300 ms timeout, not a millisecond
        assert slower <= 0.25 * usual + 0.001, f"{slower * 1000:.2f} ms slower than {usual * 1000:.2f} ms"
        wait_until(lambda: "telemetry_export_failing" in dead.logs(), 10, "the log saying so")
        if kind == "silent":  # its exports hang: spans wait, and past four they are dropped
            wait_until(lambda: dead.metric("ccf_telemetry_spans_dropped_total") > 0, 10, "dropped spans")
    finally:
        if listener is not None:
            listener.close()


# -- without it --------------------------------------------------------------------------------


def test_without_the_setting_nothing_of_opentelemetry_is_imported():
    code = (
        "import sys\n"
        "from addon.proxy import Fallback\n"
        "from addon.config import load_config\n"
        "fallback = Fallback()\n"
        "fallback.install(load_config(None, {}))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'addon.ops.otel'))))\n"
    )
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


def test_telemetry_without_its_extra_names_the_pip_command(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("addon.config._absent", lambda module: True)
    config = tmp_path / "config.yaml"
    config.write_text("telemetry:\n  enabled: true\n")
    with pytest.raises(
        ConfigError, match=r"telemetry\.enabled: needs the otel extra; install it: pip install"
    ):
        load_config(config, {})
