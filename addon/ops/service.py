"""The proxy's own answers on its port: `/health`, `/readyz`, `/livez` and `/metrics`.

`/health` is for load balancers, `ccf status` and people; `/metrics` for Prometheus.
`/readyz` says whether this process takes new work (503 while it starts or drains) and
`/livez` whether it runs at all, for Kubernetes' probes; neither needs a key. With
`server.accessKey` or `server.accessKeys` set, a gateway listens beyond loopback, so both
tell only a client that presents a key (as a header, a bearer token, or the status page's
cookie) what they know: endpoints, their errors, the team's key names and request counts.
Without a key, `/health` still answers its status code and `{"status": …}`, all a load
balancer's check needs, and `/metrics` is refused; Prometheus sends the key as a bearer
token. `server.metricsPort` stays open, for scrapers on a port that is not exposed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from mitmproxy import http

from .. import __version__, sse
from ..config import Config
from ..cost.budgets import Budgets
from ..cost.store import UsageStore
from ..fleet import workers
from ..fleet.shared_state import LocalState
from ..metrics import Metrics
from ..state.access import Access
from ..state.endpoints import COOLING, EndpointPool, iso_time
from ..state.policy import RetryBudget
from ..state.routing import Router

HEALTH_PATH = "/health"
READY_PATH, LIVE_PATH = "/readyz", "/livez"
METRICS_PATH = "/metrics"
JSON = {"content-type": "application/json"}
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RuntimeView(Protocol):
    """What the answers read of the runtime in force (runtime.py)."""

    @property
    def config(self) -> Config: ...

    @property
    def router(self) -> Router: ...

    @property
    def access(self) -> Access: ...


class LastingView(Protocol):
    """What the answers read of the state a process keeps across reloads (runtime.py)."""

    @property
    def pool(self) -> EndpointPool: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def shared(self) -> LocalState: ...

    @property
    def budget(self) -> RetryBudget: ...

    @property
    def budgets(self) -> Budgets: ...

    @property
    def usage(self) -> UsageStore: ...


class Host(Protocol):
    """What the answers read from the addon (the `Fallback` instance)."""

    @property
    def runtime(self) -> RuntimeView | None: ...

    @property
    def lasting(self) -> LastingView: ...

    @property
    def started_at(self) -> float: ...

    @property
    def address(self) -> str: ...

    @property
    def inflight(self) -> Mapping[str, object]: ...

    def health(self) -> tuple[int, dict[str, Any]]: ...


class Service:
    """The proxy's own answers on its port, `/health` and `/metrics`, and this instance's heartbeat
    document for the fleet."""

    def __init__(
        self, host: Host, allowed: Callable[[http.Request], bool], standing: Callable[[], dict[str, Any]]
    ) -> None:
        self.host = host
        self.allowed = allowed  # whether a request presents the proxy's key (see dashboard.py)
        self.standing = standing  # whether the process serves or drains (lifecycle.py)

    async def serve(self, flow: http.HTTPFlow) -> bool:
        """Answers `GET /health`, `/readyz`, `/livez` and `/metrics`; False for anything else."""
        request = flow.request
        if request.method != "GET":
            return False
        path = request.path.split("?", 1)[0]
        if path not in (HEALTH_PATH, READY_PATH, LIVE_PATH, METRICS_PATH):
            return False
        allowed = self.allowed(request)
        if path == LIVE_PATH:
            flow.response = http.Response.make(200, '{"status": "alive"}', JSON)
        elif path == READY_PATH:
            ready = self.standing()["state"] == "serving"
            flow.response = http.Response.make(
                200 if ready else 503, '{"status": "%s"}' % ("ready" if ready else "draining"), JSON
            )
        elif path == HEALTH_PATH:
            status, document = self.health()
            if not allowed:
                document = {"status": document["status"]}
            elif request.query.get("fleet") == "1":
                document["fleet"] = await self.host.lasting.shared.fleet()
            flow.response = http.Response.make(
                status, json.dumps(document, indent=2), {"content-type": "application/json"}
            )
        elif allowed:
            metrics = self.host.lasting.metrics.render()
            flow.response = http.Response.make(200, metrics, {"content-type": METRICS_TYPE})
        else:
            message = "/metrics needs the proxy's access key: send it as a bearer token (see the README)."
            body = sse.error_body("authentication_error", message)
            flow.response = http.Response.make(401, body, {"content-type": "application/json"})
        return True

    def health(self) -> tuple[int, dict[str, Any]]:
        """The health document, and its status code: 200 while an endpoint is usable, else 503."""
        runtime, lasting = self.host.runtime, self.host.lasting
        assert runtime is not None
        routing, router, metrics = runtime.config.routing, runtime.router, lasting.metrics
        endpoints = [state.snapshot(routing.step_aside_at) for state in lasting.pool]
        usable = sum(1 for e in endpoints if e["status"] != COOLING)
        status = "ok" if usable == len(endpoints) else "degraded" if usable else "unavailable"
        standing = self.standing()
        draining = standing["state"] != "serving"
        document = {
            "status": "draining" if draining else status,
            "version": __version__,
            "uptimeSeconds": round(time.time() - self.host.started_at, 3),
            "activeStreams": metrics.streams_now(),
            "state": lasting.shared.mode,
            "workers": workers.this_worker(),
            "clients": metrics.requests_by_client(),
            "budgets": lasting.budgets.document(),
            "routing": {
                "strategy": routing.strategy,
                "sessionAffinity": router.affinity,
                "stepAsideAt": routing.step_aside_at,
                "sessions": len(router.sessions),
                "cacheAware": router.keeps_caches,
                "cacheTtlScale": routing.cache_ttl_scale,
            },
            "endpoints": endpoints,
        }
        if draining:
            document["drain"] = {"reason": standing["state"], "endsAt": iso_time(standing["drainDeadline"])}
        return (200 if usable and not draining else 503), document

    def describe(self) -> dict[str, Any]:
        """This instance, as the fleet sees it in its heartbeat."""
        host = self.host
        return {
            "address": host.address,
            "version": __version__,
            "uptimeSeconds": round(time.time() - host.started_at, 1),
            "activeStreams": len(host.inflight),
            "budget": list(host.lasting.budget.counts(time.monotonic())),
            "endpoints": {
                s.name: {
                    "status": s.status,
                    "cooldownSecondsLeft": round(s.cooldown_left(), 1),
                    "reason": s.cooling_reason or None,
                }
                for s in host.lasting.pool
            },
        }
