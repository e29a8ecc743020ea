"""Each request's trace with OpenTelemetry's SDK: a server span, and a client span per attempt.

Loaded only when `telemetry.enabled` (telemetry.py). The spans follow OpenTelemetry's
semantic conventions v1.41.0. The request's span is a GenAI inference span (`chat {model}`,
the `gen_ai.*` attributes), of kind SERVER since the proxy serves it, and it continues the
client's `traceparent`; each attempt at an endpoint is an HTTP client span (`POST`, the
`http.*`, `server.*` and `url.full` attributes). What the conventions have no name for is under
`ccf.`. An attribute is never a key, a header or any of a request's text: models, the
session id, the name of the client's key, endpoints, statuses, timings and token counts.

The attempt whose answer reaches the client stays open until that answer has been relayed,
so that a trace shows the stream; one that breaks and is continued on another endpoint ends
with a `ccf.stream.resumed` event, and the continuation's attempts follow it.

Spans leave in the background: the BatchSpanProcessor's thread sends them and a request only
queues its own. Once `maxQueueSize` spans wait, a new one is dropped and counted
(`ccf_telemetry_spans_dropped_total`) instead: a slow or absent collector costs a request
nothing.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, StatusCode, set_span_in_context
from prometheus_client import Counter

from .. import __version__
from ..config import Endpoint
from ..config import Telemetry as Settings
from ..cost.spend import Spend
from ..fleet import workers
from ..logs import EventLog
from ..metrics import Metrics
from ..request import ClientRequest
from ..state.routing import session_of
from ..tracing import NO_TRACE, Answer, Failed, Trace
from .meters import Meters

SERVICE = "claude-code-fallback"
# `gen_ai.provider.name` of each platform, as the conventions name them
PROVIDERS = {
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
    "bedrock-mantle": "aws.bedrock",
    "vertex": "gcp.vertex_ai",
    "openai": "openai",
}
SERVER_ERRORS = frozenset({"aborted", "internal_error"})  # outcomes the proxy failed, whatever the status
MODEL_NAMES = 64  # distinct model names a metric attribute takes; past them, `_OTHER`
STOP_WAIT = 2.0  # seconds the process waits at exit for the last spans to leave
STOP_WAIT_FAILING = 0.2  # when the collector's last export failed
LOG_EVERY = 60.0  # seconds between two log lines of one SDK message


class Tracer:
    """The SDK set up once for the process: the tracer provider, its batching exporter, and
    the meters when `telemetry.metrics` is on."""

    def __init__(self, settings: Settings, metrics: Metrics, events: EventLog) -> None:
        self.events = events
        self.loop: asyncio.AbstractEventLoop | None = None  # where events are logged from other threads
        _route_sdk_logs(self.report)
        resource = resource_of(settings)
        self.exporter = _Waiting(
            OTLPSpanExporter(
                endpoint=f"{settings.endpoint}/v1/traces" if settings.endpoint else None,
                headers=dict(settings.headers) or None,
                timeout=settings.timeout,
            ),
            self.export_changed,
        )
        self.processor = _Bounded(self.exporter, settings, metrics.spans_dropped)
        self.provider = TracerProvider(
            resource=resource, sampler=sampler_of(settings), shutdown_on_exit=False
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer(SERVICE, __version__)
        self.meters = Meters(settings, resource, metrics) if settings.metrics else None
        self.models: set[str] = set()
        # The closing thread is started now: a thread cannot be started once the process exits.
        self.closing, self.closed = threading.Event(), threading.Event()
        threading.Thread(target=self.close, name="ccf-otel-close", daemon=True).start()
        atexit.register(self.stop)

    def begin(self, method: str, path: str, headers: list[tuple[str, str]], client: str) -> Trace:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        parent = None
        if any(name.lower() == "traceparent" for name, _ in headers):
            parent = propagate.extract({name.lower(): value for name, value in headers})
        span = self.tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
        if not span.is_recording():  # not sampled: neither are its attempts
            span.end()
            return NO_TRACE
        url_path = path.split("?", 1)[0]
        attributes = {"http.request.method": method, "url.path": url_path, "ccf.client": client}
        return RequestTrace(self, span, attributes, url_path.endswith("/messages"))

    def model(self, name: str | None) -> str | None:
        """A model name fit for a metric attribute: the first MODEL_NAMES seen, then `_OTHER`."""
        if name is None or name in self.models:
            return name
        if len(self.models) < MODEL_NAMES:
            self.models.add(name)
            return name
        return "_OTHER"

    def export_changed(self, failing: bool) -> None:
        if failing:
            self.report("telemetry_export_failing", logging.WARNING, "spans could not be sent")
        else:
            self.report("telemetry_export_recovered", logging.INFO, "spans are sent again")

    def report(self, event: str, level: int, message: str) -> None:
        """An event in the proxy's log, from whichever thread: it is written on the event loop."""
        if self.loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: the process is ending
            self.loop.call_soon_threadsafe(lambda: self.events.event(event, level, message=message))

    def stop(self) -> None:
        """At exit: the spans still waiting leave, for a moment at most."""
        self.closing.set()
        self.closed.wait(STOP_WAIT_FAILING if self.exporter.failing else STOP_WAIT)

    def close(self) -> None:
        self.closing.wait()
        self.provider.shutdown()
        if self.meters is not None:
            self.meters.stop()
        self.closed.set()


class RequestTrace:
    """One client request's trace (tracing.Trace): its server span and its attempts' spans.

    Attributes gather in a plain dict and reach the span once, as it ends: each call into the
    SDK's attributes costs a lock and a check of every value.
    """

    def __init__(self, tracer: Tracer, span: Span, attributes: dict[str, Any], chat: bool) -> None:
        self.tracer = tracer
        self.span = span
        self.attributes = attributes
        self.context: Context = set_span_in_context(span)
        self.chat = chat  # a Messages request: a GenAI `chat` operation
        self.started = time.monotonic()
        self.attempts = 0
        self.last: Endpoint | None = None  # the endpoint of the latest attempt
        self.model: str | None = None  # the model the client asked for
        self.open: AttemptSpan | None = None  # the attempt whose answer is being relayed

    def attempt(self, endpoint: Endpoint, request: ClientRequest) -> AttemptSpan:
        if self.attempts == 0:
            self._request(request)
        self.attempts += 1
        self.last = endpoint
        host, port = _address(endpoint.base_url)
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "server.address": host,
            "server.port": port,
            "ccf.endpoint": endpoint.name,
            "ccf.platform": endpoint.provider,
        }
        if self.attempts > 1:
            attributes["http.request.resend_count"] = self.attempts - 1
        span = self.tracer.tracer.start_span(request.method, context=self.context, kind=SpanKind.CLIENT)
        return AttemptSpan(self, span, attributes)

    def _request(self, request: ClientRequest) -> None:
        """What the request itself says, known at its first attempt."""
        self.model = request.model
        if not self.chat:
            return
        self.span.update_name(f"chat {request.model}" if request.model else "chat")
        self.attributes["gen_ai.operation.name"] = "chat"
        if request.model:
            self.attributes["gen_ai.request.model"] = request.model
        if session := session_of(request):
            self.attributes["gen_ai.conversation.id"] = session

    def resumed(self, broken: str, reason: str) -> None:
        attempt, self.open = self.open, None
        if attempt is None:
            return
        attempt.span.add_event("ccf.stream.resumed", {"ccf.resume.reason": reason})
        attempt.attributes["ccf.cooled"] = True  # the broken endpoint cools (failover.resume)
        attempt.end(reason)

    def end(
        self,
        outcome: str,
        status: int | None,
        spent: Sequence[Spend],
        answer: Answer | None,
        broke: str | None,
    ) -> None:
        seconds = time.monotonic() - self.started
        if (attempt := self.open) is not None:
            attempt.end(broke)
        endpoint = answer.endpoint if answer is not None else self.last
        provider = PROVIDERS.get(endpoint.provider, endpoint.provider) if endpoint else None
        failed = outcome in SERVER_ERRORS or (status is not None and status >= 500)
        error = (broke or outcome) if outcome in SERVER_ERRORS else str(status) if failed else None
        tokens = _tokens(spent) if spent else None
        attributes = self.attributes
        attributes["ccf.outcome"], attributes["ccf.attempts"] = outcome, self.attempts
        if status is not None:
            attributes["http.response.status_code"] = status
        if answer is not None:
            attributes["ccf.endpoint"] = answer.endpoint.name
        if self.chat and provider is not None:
            attributes.update(_answer_attributes(provider, answer, tokens))
        if error is not None:
            attributes["error.type"] = error
            self.span.set_status(StatusCode.ERROR, f"{outcome} ({error})")
        self.span.set_attributes(attributes)
        self.span.end()
        meters = self.tracer.meters
        if meters is not None and self.chat and provider is not None:
            measured: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider}
            if model := self.tracer.model(self.model):
                measured["gen_ai.request.model"] = model
            if answer is not None and (answered := self.tracer.model(answer.answered_model)):
                measured["gen_ai.response.model"] = answered
            if endpoint is not None:
                measured["server.address"], measured["server.port"] = _address(endpoint.base_url)
            if error is not None:
                measured["error.type"] = error
            meters.record(seconds, tokens[0] if tokens else None, tokens[1] if tokens else None, measured)


class AttemptSpan:
    """One attempt's span (tracing.AttemptTrace), its attributes set as it ends."""

    def __init__(self, trace: RequestTrace, span: Span, attributes: dict[str, Any]) -> None:
        self.trace = trace
        self.span = span
        self.attributes = attributes

    def answered(self, answer: Answer, cooled: bool) -> None:
        self.attributes["http.response.status_code"] = answer.status
        self.attributes["url.full"] = _url(answer.url)
        self.attributes["ccf.time_to_first_byte"] = answer.time_to_headers
        self.attributes["ccf.cooled"] = cooled
        if answer.is_event_stream and answer.held:
            held = sum(len(chunk) for chunk in answer.held)
            self.span.add_event("ccf.preamble.held", {"ccf.preamble.bytes": held})
        # open until the answer has been relayed: the request's end ends it
        if (earlier := self.trace.open) is not None:
            earlier.end(None)
        self.trace.open = self

    def failed(self, failure: Failed, cooled: bool) -> None:
        self.attributes["ccf.failure.kind"] = str(failure.kind)
        self.attributes["ccf.cooled"] = cooled
        if failure.status is not None:
            self.attributes["http.response.status_code"] = failure.status
        if failure.retry_after is not None:
            self.attributes["ccf.retry_after"] = failure.retry_after
        self.end(str(failure.status) if failure.status is not None else str(failure.kind))

    def abandoned(self, error: BaseException) -> None:
        self.end(type(error).__name__)

    def end(self, error: str | None) -> None:
        """Ends the span; with `error`, as failed (an answer of 400 or more is one too)."""
        status = self.attributes.get("http.response.status_code")
        if error is None and isinstance(status, int) and status >= 400:
            error = str(status)
        if error is not None:
            self.attributes["error.type"] = error
            self.span.set_status(StatusCode.ERROR, error)
        self.span.set_attributes(self.attributes)
        self.span.end()


def _answer_attributes(
    provider: str, answer: Answer | None, tokens: tuple[int, ...] | None
) -> dict[str, Any]:
    """The GenAI attributes of what answered: the provider, the model, the tokens, why it stopped."""
    attributes: dict[str, Any] = {"gen_ai.provider.name": provider}
    if answer is not None and answer.answered_model:
        attributes["gen_ai.response.model"] = answer.answered_model
    if answer is not None and answer.stop_reason:
        attributes["gen_ai.response.finish_reasons"] = [answer.stop_reason]
    if tokens is not None:
        names = (
            "gen_ai.usage.input_tokens",
            "gen_ai.usage.output_tokens",
            "gen_ai.usage.cache_read.input_tokens",
            "gen_ai.usage.cache_creation.input_tokens",
        )
        attributes.update(zip(names, tokens, strict=True))
    return attributes


def _tokens(spent: Sequence[Spend]) -> tuple[int, int, int, int]:
    """Input, output, cache-read and cache-write tokens of every part of an answer. Anthropic
    counts cached tokens apart from `input_tokens`; the conventions' input counts them all."""
    read = sum(s.tokens.cache_read for s in spent)
    written = sum(s.tokens.cache_write_5m + s.tokens.cache_write_1h for s in spent)
    fresh = sum(s.tokens.input for s in spent)
    return fresh + read + written, sum(s.tokens.output for s in spent), read, written


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _url(url: str) -> str:
    """A URL fit for `url.full`: no user or password, no query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


# -- the SDK's setup ---------------------------------------------------------------------------


def resource_of(settings: Settings) -> Resource:
    """The proxy as a resource: `service.name` (the config's, else OTEL_SERVICE_NAME, else
    claude-code-fallback), its version, and an instance id of this process's own."""
    attributes: dict[str, Any] = {"service.name": SERVICE, "service.version": __version__}
    # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, over the proxy's own
    attributes.update(OTELResourceDetector().detect().attributes)
    attributes.update(settings.resource_attributes)
    if settings.service_name:
        attributes["service.name"] = settings.service_name
    worker = workers.log_context().get("worker")
    if "service.instance.id" not in attributes:
        attributes["service.instance.id"] = str(uuid.uuid4())
    elif worker is not None:  # one id for every worker would merge their counts: each its own
        attributes["service.instance.id"] = f"{attributes['service.instance.id']}-{worker}"
    return Resource.create(attributes)


def sampler_of(settings: Settings) -> sampling.Sampler | None:
    """The config's sampler; None leaves OTEL_TRACES_SAMPLER and its argument to the SDK."""
    if settings.sampler is None and settings.sampler_arg is None:
        return None
    name = settings.sampler or os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    ratio = settings.sampler_arg
    if ratio is None:
        try:
            ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1"))
        except ValueError:
            ratio = 1.0
    samplers: dict[str, Callable[[], sampling.Sampler]] = {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBasedTraceIdRatio(ratio),
    }
    make = samplers.get(name)
    return make() if make is not None else None


class _Waiting(SpanExporter):
    """The OTLP exporter, counting the spans that wait for it and telling when exports start
    to fail and work again."""

    def __init__(self, exporter: SpanExporter, changed: Callable[[bool], None]) -> None:
        self.exporter = exporter
        self.changed = changed
        self.lock = threading.Lock()
        self.waiting = 0  # queued and not yet handed to the exporter
        self.failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.lock:
            self.waiting -= len(spans)
        try:
            result = self.exporter.export(spans)
        except Exception:  # older exporters raise what a refused connection raises
            logging.getLogger("opentelemetry.exporter").warning("Failed to export spans", exc_info=True)
            result = SpanExportResult.FAILURE
        if (result is not SpanExportResult.SUCCESS) != self.failing:
            self.failing = not self.failing
            self.changed(self.failing)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class _Bounded(BatchSpanProcessor):
    """A BatchSpanProcessor that drops a span once `maxQueueSize` wait, and counts it.

    The SDK's own queue would drop the oldest span silently and log a line for each; this
    drops the new one before it queues, where the proxy can count it.
    """

    def __init__(self, exporter: _Waiting, settings: Settings, dropped: Counter) -> None:
        self.limit = settings.max_queue_size or _environment_integer("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        batch = _environment_integer("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        super().__init__(
            exporter,
            max_queue_size=self.limit,
            schedule_delay_millis=settings.schedule_delay * 1000 if settings.schedule_delay else None,
            max_export_batch_size=min(batch, self.limit),
        )
        self.waiting = exporter
        self.dropped = dropped

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        with self.waiting.lock:
            full = self.waiting.waiting >= self.limit
            if not full:
                self.waiting.waiting += 1
        if full:
            self.dropped.inc()
            return
        super().on_end(span)


def _environment_integer(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


class _SdkLog(logging.Handler):
    """The SDK's own warnings, in the proxy's log as `telemetry_sdk` events, each message at
    most once a minute: a collector that is away would otherwise fill the log."""

    def __init__(self, report: Callable[[str, int, str], None]) -> None:
        super().__init__(logging.WARNING)
        self.report = report
        self.last: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        key = str(record.msg)
        if now - self.last.get(key, -LOG_EVERY) < LOG_EVERY:
            return
        self.last[key] = now
        self.report("telemetry_sdk", record.levelno, record.getMessage())


def _route_sdk_logs(report: Callable[[str, int, str], None]) -> None:
    sdk = logging.getLogger("opentelemetry")
    sdk.addHandler(_SdkLog(report))
    sdk.propagate = False
