"""Accounting for each client request, once it has ended: its outcome, tokens, cost and log line.

Every request ends in exactly one `account` call: in `ccf_requests_total` and the request
duration by outcome and client, and one `request` line in the log. An answer that reached
the client (whole, streamed or cut) is first read for its outcome by `answered`: the
tokens each of its parts reported, what they cost at the runtime's prices (cost/spend.py),
counted in `ccf_tokens_total` and `ccf_cost_usd_total` and added to the usage store; and
a cut stream's reason. The request's trace (tracing.py) ends there too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mitmproxy import http

from ..cost.prices import PriceTable, shipped
from ..cost.spend import Spend, spend_of
from ..cost.store import UsageStore
from ..logs import EventLog
from ..metrics import Metrics
from ..request import StreamBroken
from ..sse import combined
from ..state.access import UNAUTHENTICATED
from ..tracing import NO_TRACE, Traces
from ..upstream.client import UpstreamResponse
from .handoff import InFlight
from .resume import ResumingResponse

CLIENT_KEY = "claude-code-fallback-client"  # the name of the client's access key, on the flow


class Accounting:
    """Counts and logs each request's end, per client."""

    def __init__(
        self,
        metrics: Metrics,
        events: EventLog,
        usage: UsageStore,
        on_spend: Callable[[str, float], None] | None = None,
        traces: Traces = NO_TRACE,
    ) -> None:
        self.metrics = metrics
        self.events = events
        self.usage = usage
        self.on_spend = on_spend  # told each billed cost (client, USD): the budgets (cost/budgets.py)
        self.traces = traces  # each request's trace, ended with its request (telemetry/switch.py)
        self.prices: PriceTable = shipped()  # the runtime's, set as each config is installed

    def answered(self, flow: http.HTTPFlow, state: InFlight, error: BaseException | None) -> None:
        """An answer has reached the client, whole or cut."""
        upstream = state.outcome.response
        if upstream is None:
            return
        name = upstream.endpoint.name
        parts = [upstream]
        if isinstance(state.relay, ResumingResponse):
            parts, error = state.relay.parts, error or state.relay.broken
        spent = [self.spent(flow, part) for part in parts if part.usage]
        reason = None
        if error is None:
            result = "success" if upstream.status < 400 else "client_error"
        else:
            reason = error.reason if isinstance(error, StreamBroken) else "client_cancel"
            self.metrics.stream_aborts.labels(name, reason).inc()
            result = "aborted"
            self.events.event(
                "stream_aborted", logging.WARNING, endpoint=name, reason=reason, detail=str(error)
            )
        attempts, last = len(state.outcome.attempts), parts[-1]
        self.account(
            flow, result, state.started, upstream.status, name, attempts, upstream.model, spent, last, reason
        )

    def spent(self, flow: http.HTTPFlow, part: UpstreamResponse) -> Spend:
        """What one endpoint's answer used and cost: counted, and kept in the usage store."""
        usage = combined(part.usage)
        client = flow.metadata.get(CLIENT_KEY, UNAUTHENTICATED)
        spend = spend_of(client, part.endpoint, part.model, usage, part.headers, self.prices)
        self.metrics.count_usage(spend.endpoint, usage)
        if spend.cost is not None:
            self.metrics.cost.labels(client, spend.endpoint, spend.label).inc(spend.cost)
        self.usage.add(spend)
        if spend.cost is not None and spend.billed and self.on_spend is not None:
            self.on_spend(client, spend.cost)
        return spend

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
        model: str | None = None,
        spent: list[Spend] | None = None,
        answer: UpstreamResponse | None = None,
        broke: str | None = None,
    ) -> None:
        """One request's outcome: in the metrics, the per-client counts, one log line, and the
        end of its trace, with the answer's last part and why its stream broke, if it did."""
        self.traces.pop(flow.id).end(result, status, spent or (), answer, broke)
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
            model=model,
            **spend_fields(spent or []),
        )


def spend_fields(spent: list[Spend]) -> dict[str, object]:
    """The log line's tokens and cost: those of every part of the answer, added up (a
    resumed stream's parts may come from several endpoints). None of them when no part
    reported usage; `cost_usd` is left out when no part has a price."""
    if not spent:
        return {}
    costs = [spend.cost for spend in spent if spend.cost is not None]
    total = {
        kind: sum(getattr(spend.tokens, kind) for spend in spent)
        for kind in ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
    }
    return {
        "input_tokens": total["input"],
        "output_tokens": total["output"],
        "cache_read_tokens": total["cache_read"],
        "cache_write_tokens": total["cache_write_5m"] + total["cache_write_1h"],
        "cache_write_5m_tokens": total["cache_write_5m"],
        "cache_write_1h_tokens": total["cache_write_1h"],
        "cost_usd": round(sum(costs), 8) if costs else None,
        "billed": any(spend.billed for spend in spent),
    }
