"""Accounting for each client request, once it has ended: its outcome, tokens and log line.

Every request ends in exactly one `account` call: in `ccf_requests_total` and the request
duration by outcome and client, and one `request` line in the log. An answer that reached
the client (whole, streamed or cut) is first read for its outcome by `answered`: the
tokens its parts reported, and a cut stream's reason.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http

from ..logs import EventLog
from ..metrics import Metrics
from ..request import StreamBroken
from ..state.access import UNAUTHENTICATED
from .handoff import InFlight
from .resume import ResumingResponse

CLIENT_KEY = "claude-code-fallback-client"  # the name of the client's access key, on the flow


class Accounting:
    """Counts and logs each request's end, per client."""

    def __init__(self, metrics: Metrics, events: EventLog) -> None:
        self.metrics = metrics
        self.events = events

    def answered(self, flow: http.HTTPFlow, state: InFlight, error: BaseException | None) -> None:
        """An answer has reached the client, whole or cut."""
        upstream = state.outcome.response
        if upstream is None:
            return
        name = upstream.endpoint.name
        parts = [upstream]
        if isinstance(state.relay, ResumingResponse):
            parts, error = state.relay.parts, error or state.relay.broken
        for part in parts:
            self.metrics.count_usage(part.endpoint.name, part.usage)
        if error is None:
            result = "success" if upstream.status < 400 else "client_error"
        else:
            reason = error.reason if isinstance(error, StreamBroken) else "client_cancel"
            self.metrics.stream_aborts.labels(name, reason).inc()
            result = "aborted"
            self.events.event(
                "stream_aborted", logging.WARNING, endpoint=name, reason=reason, detail=str(error)
            )
        self.account(flow, result, state.started, upstream.status, name, len(state.outcome.attempts))

    def refused_body(self) -> None:
        """A body past the limit, refused before it was read: no flow hook will tell."""
        self.metrics.requests.labels("rejected", UNAUTHENTICATED).inc()

    def account(
        self,
        flow: http.HTTPFlow,
        result: str,
        started: float | None = None,
        status: int | None = None,
        endpoint: str | None = None,
        attempts: int | None = None,
    ) -> None:
        """One request's outcome: in the metrics, the per-client counts and one log line."""
        client = flow.metadata.get(CLIENT_KEY, UNAUTHENTICATED)
        self.metrics.requests.labels(result, client).inc()
        if started is None:
            return
        duration = time.monotonic() - started
        self.metrics.request_duration.labels(result, client).observe(duration)
        self.events.event(
            "request",
            logging.INFO if result in ("success", "client_error") else logging.WARNING,
            method=flow.request.method,
            path=flow.request.path.split("?", 1)[0],
            client=client,
            endpoint=endpoint,
            status=status,
            outcome=result,
            attempts=attempts,
            duration_ms=round(duration * 1000, 1),
        )
