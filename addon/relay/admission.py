"""What the proxy refuses before it chooses an endpoint, and the outcome each refusal counts as.

New work while the process stops (no one will take the port over), a client without its
access key, a client or a proxy whose budget is spent, a body over `server.maxBodyBytes`.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from ..cost.budgets import Budgets
from ..metrics import Metrics
from ..request import Failure, error_failure
from ..state.access import UNAUTHENTICATED
from .bodylimit import BodyLimit

NO_KEY = error_failure(401, "authentication_error", "This proxy needs its access key.")


class Admission:
    """Refuses a request the proxy will not serve, in the order a client would want to hear why."""

    def __init__(
        self,
        stopping: Callable[[], Failure | None],
        budgets: Budgets,
        body_limit: BodyLimit,
        metrics: Metrics,
    ) -> None:
        self.stopping = stopping
        self.budgets = budgets
        self.body_limit = body_limit
        self.metrics = metrics

    def refusal(self, flow: http.HTTPFlow, client: str, body: bytes) -> tuple[Failure, str] | None:
        if (stopping := self.stopping()) is not None:
            return stopping, "draining"
        if client == UNAUTHENTICATED:
            return NO_KEY, "rejected"
        if over := self.budgets.refusal(client, flow.request.method, flow.request.path):
            self.metrics.budget_refusals.labels(over.scope, over.window).inc()
            return over.failure(), "over_budget"
        if self.body_limit.exceeded(body):
            return self.body_limit.failure(), "rejected"
        return None
