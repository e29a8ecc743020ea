"""OpenTelemetry, when the config turns it on: a trace of each request, and metrics, over OTLP.

`Telemetry` is what the request path holds (`Lasting.telemetry`): `begin` gives a client
request its trace, which the failover tells of each attempt and the accounting ends
(tracing.py says what a trace is told). While `telemetry.enabled` is off, or the standard
`OTEL_SDK_DISABLED` is set, every request gets `NO_TRACE` and nothing of OpenTelemetry is
imported: the SDK's side (`spans`, `meters`) loads with the first config that
turns it on. An SDK is set up once in a process, so a reload that changes the section says
that the change waits for the next start.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ..config import Telemetry as Settings
from ..logs import EventLog
from ..metrics import Metrics
from ..tracing import NO_TRACE, Trace

if TYPE_CHECKING:
    from .spans import Tracer

OPEN_LIMIT = 10_000  # traces of requests not yet ended; past it the oldest is let go unsent


class Telemetry:
    """Gives each request its trace, and finds it again when the request ends (`pop`)."""

    def __init__(self, metrics: Metrics, events: EventLog) -> None:
        self.metrics = metrics
        self.events = events
        self.settings: Settings | None = None  # the section the process started with
        self.tracer: Tracer | None = None
        self.open: dict[str, Trace] = {}  # by flow id

    def configure(self, settings: Settings) -> None:
        """Starts OpenTelemetry with the first config that turns it on; later configs leave it."""
        if self.settings is None:
            self.settings = settings
            if settings.enabled and disabled_by_environment():
                self.events.event("telemetry_off", logging.WARNING, reason="OTEL_SDK_DISABLED is set")
            elif settings.enabled:
                from .spans import Tracer

                self.tracer = Tracer(settings, self.metrics, self.events)
            return
        if settings != self.settings:
            self.events.event(
                "telemetry_unchanged",
                logging.WARNING,
                reason="the telemetry section changed; it applies when the proxy next starts",
            )

    def begin(
        self, flow_id: str, method: str, path: str, headers: list[tuple[str, str]], client: str
    ) -> Trace:
        """A client request's trace, continuing its `traceparent` if it sent one."""
        if self.tracer is None:
            return NO_TRACE
        trace = self.tracer.begin(method, path, headers, client)
        if trace is not NO_TRACE:  # a request the sampler left out has nothing to end
            if len(self.open) >= OPEN_LIMIT:
                del self.open[next(iter(self.open))]
            self.open[flow_id] = trace
        return trace

    def pop(self, flow_id: str) -> Trace:
        """The trace of a request that ends: the accounting ends it."""
        return self.open.pop(flow_id, NO_TRACE)


def disabled_by_environment() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
