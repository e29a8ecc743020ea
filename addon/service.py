"""The proxy's own answers on its port: `/health` and `/metrics`.

`/health` is for load balancers, `ccf status` and people; `/metrics` for Prometheus. With
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
from collections.abc import Callable
from typing import Any, Protocol

from mitmproxy import http

from . import __version__, sse, workers
from .config import Config
from .endpoints import COOLING, EndpointPool
from .metrics import Metrics
from .routing import Router
from .shared import LocalState

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Host(Protocol):
    """What the answers read from the addon (the `Fallback` instance)."""

    config: Config | None
    pool: EndpointPool
    metrics: Metrics
    router: Router | None
    shared: LocalState
    started_at: float


class Service:
    def __init__(self, host: Host, allowed: Callable[[http.Request], bool]) -> None:
        self.host = host
        self.allowed = allowed  # whether a request presents the proxy's key (see dashboard.py)

    async def serve(self, flow: http.HTTPFlow) -> bool:
        """Answers `GET /health` and `GET /metrics`; False for anything else."""
        request = flow.request
        if request.method != "GET":
            return False
        path = request.path.split("?", 1)[0]
        if path not in (HEALTH_PATH, METRICS_PATH):
            return False
        allowed = self.allowed(request)
        if path == HEALTH_PATH:
            status, document = self.health()
            if not allowed:
                document = {"status": document["status"]}
            elif request.query.get("fleet") == "1":
                document["fleet"] = await self.host.shared.fleet()
            flow.response = http.Response.make(
                status, json.dumps(document, indent=2), {"content-type": "application/json"}
            )
        elif allowed:
            metrics = self.host.metrics.render()
            flow.response = http.Response.make(200, metrics, {"content-type": METRICS_TYPE})
        else:
            message = "/metrics needs the proxy's access key: send it as a bearer token (see the README)."
            body = sse.error_body("authentication_error", message)
            flow.response = http.Response.make(401, body, {"content-type": "application/json"})
        return True

    def health(self) -> tuple[int, dict[str, Any]]:
        """The health document, and its status code: 200 while an endpoint is usable, else 503."""
        host = self.host
        assert host.config is not None and host.router is not None
        routing = host.config.routing
        endpoints = [state.snapshot(routing.step_aside_at) for state in host.pool]
        usable = sum(1 for e in endpoints if e["status"] != COOLING)
        status = "ok" if usable == len(endpoints) else "degraded" if usable else "unavailable"
        document = {
            "status": status,
            "version": __version__,
            "uptimeSeconds": round(time.time() - host.started_at, 3),
            "activeStreams": host.metrics.streams_now(),
            "state": host.shared.mode,
            "workers": workers.this_worker(),
            "clients": host.metrics.requests_by_client(),
            "routing": {
                "strategy": routing.strategy,
                "sessionAffinity": host.router.affinity,
                "stepAsideAt": routing.step_aside_at,
                "sessions": len(host.router.sessions),
            },
            "endpoints": endpoints,
        }
        return (200 if usable else 503), document
