"""The Fallback addon: mitmproxy's hooks, telling each request's story in small steps.

Each request is sent by the addon itself to the first healthy endpoint, failing over
before a byte reaches the client. A short answer that is not a stream is then handed to
mitmproxy whole; any other is relayed through a loopback bridge so that it streams (see
bridge.py for why).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import command, connection, contentviews, ctx, exceptions, http
from mitmproxy.net.http import status_codes

from . import __version__, advice, gateway, workers
from .access import ACCESS_HEADER, AUTH_HEADERS, UNAUTHENTICATED, Access
from .bodylimit import BodyLimit
from .bridge import TOKEN_HEADER, Bridge
from .config import Config, ConfigError, Server, mask_secret
from .dashboard import Dashboard
from .departures import ClientLeft, Departures
from .direct import DirectRelays, installed
from .endpoints import EndpointPool
from .failover import Failover, Failure, Outcome, error_failure
from .flowcap import FlowCap
from .logs import EventLog
from .metrics import Metrics
from .modes import listen_address, named_config
from .policy import AttemptFailed, RetryBudget
from .providers import HOP_BY_HOP, Provider
from .resume import ResumingResponse, can_resume
from .routing import Router
from .service import Service
from .shared import LocalState, RedisState, shared_state
from .sseview import stream_view
from .timeline import Timeline
from .upstream import ClientRequest, StreamBroken, UpstreamClient, UpstreamResponse

META_KEY = "claude-code-fallback"
CLIENT_KEY = "claude-code-fallback-client"  # the name of the client's access key, on the flow

TOKEN_BYTES = TOKEN_HEADER.encode()
NOT_SENT = HOP_BY_HOP | {"content-length"}  # a whole response's headers that it gets anew
WHOLE_BODY_LIMIT = 1 << 20  # a non-streamed answer up to this size is sent whole, without the bridge

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """What the addon keeps about a flow while its response is relayed."""

    outcome: Outcome
    started: float
    token: str = ""
    saved_request: tuple[Any, bytes | None] | None = None
    endpoint_url: str = ""
    relay: UpstreamResponse | ResumingResponse | None = None


class Fallback:
    def __init__(self, inspected: bool = True, direct: bool = False) -> None:
        # Whether anyone looks at flows (mitmweb, mitmdump's output, saved flows). The lean
        # master has no such addon, so it skips the work that only serves their eyes.
        self.inspected = inspected
        # The lean master's streams take a body from the addon (direct.py): no bridge.
        assert not direct or installed(), "direct relays need direct.install() first"
        self.direct = DirectRelays() if direct else None
        self.addons = [FlowCap()] if inspected else []  # mitmproxy loads an addon's `addons` too
        self.config: Config | None = None
        self.pool = EndpointPool()
        self.metrics = Metrics(lambda: self.pool, lambda: self.shared.up)
        self.events = EventLog()
        self.bridge = Bridge()
        self.client: UpstreamClient | None = None
        self.failover: Failover | None = None
        self.departures = Departures()
        self.budget = RetryBudget(0.2, 10)
        self.router: Router | None = None
        self.shared: LocalState = LocalState()
        self.access = Access(Server())
        self.address = ""
        self.inflight: dict[str, InFlight] = {}
        self.started_at = time.time()
        self.draining = False
        self.ready = asyncio.Event()  # set once `running` has started everything
        self.choosing = 0  # requests still failing over, not yet in `inflight`
        self.config_mtime: float | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.metrics_server: Any = None
        self.view = stream_view()
        self.body_limit = BodyLimit(self.bridge, self.refused_body)
        self.timeline = Timeline(shared=workers.incidents_dir(), worker=workers.log_context().get("worker"))
        self.dashboard = Dashboard(self, self.timeline)
        self.service = Service(self, self.dashboard.allowed)

    # -- mitmproxy hooks ------------------------------------------------------------

    def load(self, loader: Any) -> None:
        contentviews.add(self.view)
        loader.add_option(
            "fallback_config",
            str,
            "",
            """
            Path of the claude-code-fallback config file. Empty means
            $CLAUDE_FALLBACK_HOME/config.yaml or ~/.claude-code-fallback/config.yaml when it
            exists, else one endpoint: the reverse-proxy target.
            """,
        )
        loader.add_option(
            "fallback_log_level",
            str,
            "",
            "Overrides logging.level of the config (trace, debug, info, warn, error).",
        )
        loader.add_option(
            "fallback_flow_body_limit",
            int,
            1 << 20,
            """
            Bytes of each relayed response body kept on the flow for inspection (mitmweb,
            saved flows). 0 keeps none.
            """,
        )
        loader.add_option(
            "fallback_shutdown_grace",
            int,
            30,
            "Seconds that in-flight responses get to finish after SIGTERM before the proxy exits.",
        )
        loader.add_option(
            "fallback_watch_config",
            bool,
            True,
            "Reload the config file when it changes on disk.",
        )

    def configure(self, updated: set[str]) -> None:
        if updated & {"fallback_config", "fallback_log_level", "mode"}:
            try:
                self.apply(self.read_config())
            except ConfigError as e:
                if not self.ready.is_set():
                    # before listening: refuse to start, like any tool given a bad config
                    print(f"claude-code-fallback: invalid config\n{e}", file=sys.stderr)
                    raise SystemExit(2) from None
                raise exceptions.OptionsError(str(e)) from None
        if "fallback_flow_body_limit" in updated and self.client:
            self.client.copy_limit = self.flow_body_limit()

    async def running(self) -> None:
        # The addon opens upstream connections itself; mitmproxy must not open its own.
        ctx.options.update(connection_strategy="lazy")
        await self.bridge.start()
        if self.direct:
            self.direct.connections = ctx.master.addons.get("proxyserver").connections
        await self.start_shared()
        await self.start_client()
        self.body_limit.stream_past_limit()
        self.started_at = time.time()
        self.start_metrics_server()
        self.watch()
        self.spawn(self.timeline.run(self.metrics))
        assert self.config is not None
        options = ctx.options
        self.warn(advice.at_start(self.config, self.access, options.mode, options.listen_host, os.environ))
        self.ready.set()
        self.events.event(
            "started",
            version=__version__,
            endpoints=",".join(s.name for s in self.pool),
            config=self.config.source,
        )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.config is None:
            return
        request = flow.request
        length = request.headers.get("content-length")
        http1 = not (request.is_http2 or request.is_http3)
        if length is None and http1 and "transfer-encoding" not in request.headers:
            return  # no body
        self.body_limit.guard(flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.config is None:
            return
        if flow.request.stream:
            return  # a body past server.maxBodyBytes, on its way to the bridge's refusal
        self.body_limit.unguard(flow)
        try:
            await self.serve(flow)
        except Exception as e:
            # One request's bug must not become everyone's outage: answer it and carry on.
            log.exception("claude-code-fallback: internal error while serving a request")
            self.events.event("internal_error", logging.ERROR, error=f"{type(e).__name__}: {e}")
            self.count(flow, "internal_error")
            if flow.response is None and flow.live:
                self.respond(flow, error_failure(500, "api_error", "Internal error in claude-code-fallback."))

    async def serve(self, flow: http.HTTPFlow) -> None:
        # mitmproxy listens before every addon's `running` hook has run
        await self.ready.wait()
        assert self.config is not None
        if await self.service.serve(flow) or self.dashboard.serve(flow) or gateway.hello(flow):
            if self.inspected:
                self.mask_flow_keys(flow)  # a key sent for /health or /metrics, on the flow mitmweb shows
            return
        body = flow.request.raw_content or b""
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in flow.request.headers.fields]
        client = flow.metadata[CLIENT_KEY] = self.access.client(headers) or UNAUTHENTICATED
        refusal = None
        if client == UNAUTHENTICATED:
            refusal = error_failure(401, "authentication_error", "This proxy needs its access key.")
        elif self.body_limit.exceeded(body):
            refusal = self.body_limit.failure()
        if refusal is not None:
            self.respond(flow, refusal)
            self.count(flow, "rejected")
            return
        request = ClientRequest.parse(
            flow.request.method, flow.request.path, self.access.strip(headers), body
        )
        if self.inspected:
            self.mask_flow_keys(flow)
        started = time.monotonic()
        self.choosing += 1
        try:
            outcome, whole = await self.departures.run(flow.client_conn.id, self.choose(request))
        except ClientLeft:
            self.client_left(flow, started)
            return
        finally:
            self.choosing -= 1
        state = InFlight(outcome, started)
        if self.inspected:
            self.annotate(flow, outcome)
        if outcome.response is None:
            assert outcome.failure is not None
            self.respond(flow, outcome.failure)
            failed = "all_failed" if outcome.attempts else "unavailable"
            result = "success" if outcome.failure.status < 400 else failed  # a list the proxy made
            self.finish(flow, state, result, outcome.failure.status)
            return
        if not flow.live or flow.error:  # the client left while we were failing over
            outcome.response.close()
            self.finish(flow, state, "client_cancel", 499, outcome.response.endpoint.name)
            return
        state.endpoint_url = outcome.response.url  # what mitmweb shows: where the request went
        if whole is not None:
            self.answer_whole(flow, state, whole)
            return
        self.inflight[flow.id] = state
        self.metrics.active_streams.inc()
        state.relay = outcome.response
        if self.config.streaming.resume and can_resume(outcome.response, request):
            state.relay = ResumingResponse(outcome.response, request, self.resume_stream, len(self.pool))
        self.relay(flow, state)

    async def choose(self, request: ClientRequest) -> tuple[Outcome, bytes | None]:
        """The failover's outcome, with the whole body when the answer is short and not a stream.

        Such a body needs no bridge: mitmproxy sends it as an answer set by the addon,
        which spares it a second HTTP exchange. Streams, and bodies too large to hold,
        are relayed through the bridge as they arrive.
        """
        assert self.failover is not None
        outcome = await self.failover.run(request)
        response = outcome.response
        if response is None or response.is_event_stream:
            return outcome, None
        response.copy_limit = 0  # the flow gets the body itself
        return outcome, await response.read_whole(WHOLE_BODY_LIMIT)

    def answer_whole(self, flow: http.HTTPFlow, state: InFlight, body: bytes) -> None:
        response = state.outcome.response
        assert response is not None
        reason = response.reason.encode("latin-1", "replace")
        flow.response = whole_response(response.status, response.headers, body, reason)
        response.close()
        if self.inspected:
            flow.request.url = state.endpoint_url
        self.settle(flow, state, None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self.inflight.get(flow.id)
        if state is None or flow.response is None:
            return
        flow.response.stream = True
        self.restore_request(flow, state)

    def response(self, flow: http.HTTPFlow) -> None:
        state = self.inflight.pop(flow.id, None)
        if state is None or flow.response is None or state.relay is None:
            return
        relay = state.relay
        if relay.copy and relay.complete and len(relay.copy) < relay.copy_limit:
            flow.response.raw_content = bytes(relay.copy)

    def error(self, flow: http.HTTPFlow) -> None:
        state = self.inflight.pop(flow.id, None)
        if state is None:
            return
        self.restore_request(flow, state)
        self.bridge.discard(state.token)
        if self.direct:
            self.direct.discard(flow)
        if flow.response is not None and state.relay is not None and state.relay.copy:
            flow.response.raw_content = bytes(state.relay.copy)  # what the client got before the cut

    def client_disconnected(self, client: connection.Client) -> None:
        # stops the upstream attempt of a request still waiting for its answer to be chosen
        self.departures.left(client.id)
        if self.direct:
            self.direct.left(client.id)

    async def done(self) -> None:
        contentviews.remove(self.view)
        for task in list(self.tasks):
            task.cancel()
        await self.bridge.stop()
        if self.direct:
            self.direct.stop()
        await self.shared.stop()
        if self.client:
            await self.client.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()

    # -- commands -------------------------------------------------------------------

    @command.command("fallback.reload")
    def reload(self) -> bool:
        """Reload the claude-code-fallback config file; a bad file keeps the running config.
        With `server.workers`, every worker reloads."""
        config = self.reread()
        if config is None:
            return False
        if not workers.reload_all():  # a worker's supervisor tells every worker, this one too
            self.reloaded(config)
        return True

    def reload_here(self) -> None:
        """SIGHUP or an edited file: this process reloads (a supervisor tells each worker)."""
        if (config := self.reread()) is not None:
            self.reloaded(config)

    def reread(self) -> Config | None:
        try:
            return self.read_config()
        except ConfigError as e:
            self.metrics.reloads.labels("error").inc()
            self.events.event("config_reload_failed", logging.ERROR, error=str(e))
            return None

    def reloaded(self, config: Config) -> None:
        self.apply(config)
        self.metrics.reloads.labels("success").inc()
        self.events.event("config_reloaded", endpoints=",".join(s.name for s in self.pool))

    @command.command("fallback.status")
    def status(self) -> str:
        """The health document served on /health, as JSON."""
        return json.dumps(self.health()[1], indent=2)

    def health(self) -> tuple[int, dict[str, Any]]:
        return self.service.health()

    # -- config ---------------------------------------------------------------------

    def read_config(self) -> Config:
        options = ctx.options
        return named_config(options.fallback_config, options.fallback_log_level, options.mode)

    def apply(self, config: Config) -> None:
        self.config = config
        self.pool = EndpointPool.build(config.endpoints, previous=self.pool)
        # credentials refused or missing may have been fixed: a reload is the sign to look again
        renew = self.pool.forgive("credentials")
        secrets = [e.api_key or "" for e in config.endpoints] + [config.server.access_key or ""]
        secrets += [key for _, key in config.server.access_keys] + [config.state.redis.url or ""]
        secrets.append(urlsplit(config.state.redis.url or "").password or "")
        self.events = EventLog(config.logging.level, config.logging.format, secrets, workers.log_context())
        self.events.mask = config.logging.redact_keys
        self.events.listeners.append(self.timeline.record)
        self.budget.ratio = config.retry.budget_ratio
        self.budget.min_retries = config.retry.budget_min_retries
        self.access = Access(config.server)
        self.body_limit.limit = config.server.max_body_bytes
        if self.ready.is_set():  # before that, `running` sets mitmproxy's streaming option
            # once the option being handled is set: a config may come as `set fallback_config`
            asyncio.get_running_loop().call_soon(self.body_limit.stream_past_limit)
        # sessions stay where they are across reloads
        self.router = Router(config.routing, self.router.sessions if self.router else None)
        self.config_mtime = _mtime(config.source)
        self.warn(advice.config_readable(config))
        if self.client is not None:
            added = self.client.configure(config, renew)
            self.build_failover()
            self.prepare(added)

    async def start_shared(self) -> None:
        """The fleet's shared state (Redis), or none; a Redis that is away is no reason to wait."""
        assert self.config is not None
        state, timeouts = self.config.state, self.config.timeouts
        probe_ttl = timeouts.connect + timeouts.first_byte
        self.shared = shared_state(
            state.backend, state.redis, lambda: self.events, probe_ttl, os.environ.get(workers.ENV_STATE)
        )
        self.budget.elsewhere = self.shared.budget_elsewhere
        self.address = listen_address(ctx.options.mode, ctx.options.listen_host)
        await self.shared.start(lambda: self.pool, self.describe)
        if isinstance(self.shared, RedisState):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shared.connected.wait(), 1.0)

    def describe(self) -> dict[str, Any]:
        """This instance, as the fleet sees it in its heartbeat."""
        return {
            "address": self.address,
            "version": __version__,
            "uptimeSeconds": round(time.time() - self.started_at, 1),
            "activeStreams": len(self.inflight),
            "budget": list(self.budget.counts(time.monotonic())),
            "endpoints": {
                s.name: {
                    "status": s.status,
                    "cooldownSecondsLeft": round(s.cooldown_left(), 1),
                    "reason": s.cooling_reason or None,
                }
                for s in self.pool
            },
        }

    async def start_client(self) -> None:
        assert self.config is not None
        self.client = UpstreamClient(
            self.config,
            self.flow_body_limit(),
            lambda endpoint: self.metrics.stale_retries.labels(endpoint).inc(),
        )
        await self.client.start()
        self.build_failover()
        self.prepare(self.client.configure(self.config))

    def prepare(self, providers: Iterable[Provider]) -> None:
        """Each new endpoint's credentials, looked for in the background: the proxy serves meanwhile."""
        assert self.failover is not None
        for provider in providers:
            self.spawn(self.failover.prepare(provider))

    def flow_body_limit(self) -> int:
        """How much of each relayed body to keep on the flow: nothing when no one looks."""
        return ctx.options.fallback_flow_body_limit if self.inspected else 0

    def build_failover(self) -> None:
        assert self.config is not None and self.client is not None and self.router is not None
        self.failover = Failover(
            self.config,
            self.pool,
            self.client,
            self.metrics,
            self.events,
            self.budget,
            self.router,
            self.shared,
        )

    def watch(self) -> None:
        loop = asyncio.get_running_loop()
        # Replaces mitmproxy's own SIGTERM handler: streams in flight get to finish first.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.reload_here)
            loop.add_signal_handler(signal.SIGTERM, self.drain)
        self.spawn(self.watch_file())

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def drain(self) -> None:
        """First SIGTERM: let in-flight responses finish (up to the grace period), then exit.
        A second SIGTERM exits at once."""
        if self.draining:
            ctx.master.shutdown()
            return
        self.draining = True
        grace = ctx.options.fallback_shutdown_grace
        # A stop that waits on answers is worth a line at the default level: it says why
        # the process is still there.
        self.events.event(
            "draining",
            logging.WARNING if self.busy() else logging.INFO,
            active_streams=len(self.inflight),
            choosing=self.choosing,
            grace_seconds=grace,
        )
        self.spawn(self.shutdown_when_idle(time.monotonic() + grace))

    def busy(self) -> bool:
        return bool(self.inflight or self.choosing)

    async def shutdown_when_idle(self, deadline: float) -> None:
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.events.event(
            "stopping",
            logging.WARNING if self.busy() else logging.INFO,
            cut_streams=len(self.inflight),
            cut_requests=self.choosing,
        )
        ctx.master.shutdown()

    async def watch_file(self) -> None:
        while True:
            await asyncio.sleep(1)
            if not ctx.options.fallback_watch_config or self.config is None or not self.config.source:
                continue
            mtime = _mtime(self.config.source)
            if mtime != self.config_mtime:
                self.config_mtime = mtime
                self.reload_here()

    def warn(self, advices: Iterable[advice.Advice]) -> None:
        for event, fields in advices:
            self.events.event(event, logging.WARNING, **fields)

    def start_metrics_server(self) -> None:
        assert self.config is not None
        port = self.config.server.metrics_port
        if port is None or self.metrics_server is not None or workers.this_worker()["index"]:
            return  # of a proxy's workers, the first serves every worker's metrics there
        from prometheus_client import start_http_server

        server = start_http_server(port, addr=self.config.server.host, registry=self.metrics.exposition)
        self.metrics_server = server[0] if isinstance(server, tuple) else None

    # -- the request's story, in small steps -----------------------------------------

    def refused_body(self) -> None:
        self.metrics.requests.labels("rejected", UNAUTHENTICATED).inc()

    def mask_flow_keys(self, flow: http.HTTPFlow) -> None:
        assert self.config is not None
        if not self.config.logging.redact_keys:
            return
        for name in (*AUTH_HEADERS, ACCESS_HEADER):
            if value := flow.request.headers.get(name):
                scheme, _, secret = value.rpartition(" ")
                masked = mask_secret(secret)
                flow.request.headers[name] = f"{scheme} {masked}" if scheme else masked

    def respond(self, flow: http.HTTPFlow, failure: Failure) -> None:
        flow.response = whole_response(failure.status, failure.headers, failure.body)

    def relay(self, flow: http.HTTPFlow, state: InFlight) -> None:
        """Streams the chosen answer to the client: injected directly into the lean master's
        stream when the flow allows, else through the bridge."""
        assert state.relay is not None
        on_done = functools.partial(self.relayed, flow, state)
        if self.direct and self.direct.can_carry(flow):
            self.direct.hand(flow, state.relay, on_done)
            return
        state.token = self.bridge.park(state.relay, on_done)
        self.point_at_bridge(flow, state)

    def point_at_bridge(self, flow: http.HTTPFlow, state: InFlight) -> None:
        request = flow.request
        if self.inspected:
            state.saved_request = (request.headers, request.raw_content)
        # The bridge needs the token, not the client's body and headers again. `connection`
        # stays: mitmproxy reads a client's wish to close from the request it forwarded.
        headers = [(b"host", b""), (b"content-length", b"0"), (TOKEN_BYTES, state.token.encode())]
        headers += [(b"connection", v.encode()) for v in request.headers.get_all("connection")]
        request.headers = http.Headers(headers)
        request.raw_content = b""
        request.scheme, request.host, request.port = "http", "127.0.0.1", self.bridge.port

    def restore_request(self, flow: http.HTTPFlow, state: InFlight) -> None:
        """Puts back what inspection should show: the endpoint's URL and the original body."""
        if state.saved_request is None:
            return
        headers, body = state.saved_request
        state.saved_request = None
        flow.request.headers = headers
        flow.request.url = state.endpoint_url  # after the headers: it sets Host to the endpoint's
        flow.request.raw_content = body

    def annotate(self, flow: http.HTTPFlow, outcome: Outcome) -> None:
        attempts = [
            {
                "endpoint": a.endpoint,
                "outcome": a.outcome,
                "durationMs": round(a.duration * 1000, 1),
                "detail": a.detail,
            }
            for a in outcome.attempts
        ]
        flow.metadata[META_KEY] = {"attempts": attempts}
        flow.comment = " → ".join(
            f"{a.endpoint}: {a.outcome} ({a.duration * 1000:.0f} ms)" for a in outcome.attempts
        )

    def relayed(self, flow: http.HTTPFlow, state: InFlight, error: BaseException | None) -> None:
        """The bridge or a direct relay finished relaying a response."""
        self.metrics.active_streams.dec()
        if not state.token:  # a direct relay: the flow may end with no hook to say so
            self.inflight.pop(flow.id, None)
        self.settle(flow, state, error)

    def settle(self, flow: http.HTTPFlow, state: InFlight, error: BaseException | None) -> None:
        """An answer has reached the client, whole or cut: count it and log its outcome."""
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
        self.finish(flow, state, result, upstream.status, name)

    async def resume_stream(
        self, request: ClientRequest, broken: str, reason: str
    ) -> UpstreamResponse | None:
        """Continues a stream that broke mid-answer on the next endpoint that answers."""
        assert self.failover is not None
        if state := self.pool.get(broken):
            self.failover.endpoint_failed(state, AttemptFailed(broken, reason, "stream broke mid-answer"))
        outcome = await self.failover.run(request)
        response = outcome.response
        if response is None or response.status != 200:
            self.events.event("stream_resume_failed", logging.WARNING, from_endpoint=broken, reason=reason)
            return response
        self.metrics.resumes.labels(broken, response.endpoint.name).inc()
        self.events.event(
            "stream_resumed",
            logging.WARNING,
            from_endpoint=broken,
            to_endpoint=response.endpoint.name,
            reason=reason,
        )
        return response

    def client_left(self, flow: http.HTTPFlow, started: float) -> None:
        """The client went away before its answer was chosen, and its attempt was cancelled."""
        self.count(flow, "client_cancel", started, status=499)  # nginx's "client closed request"

    def finish(
        self,
        flow: http.HTTPFlow,
        state: InFlight,
        result: str,
        status: int,
        endpoint: str | None = None,
    ) -> None:
        self.count(flow, result, state.started, status, endpoint, len(state.outcome.attempts))

    def count(
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


def whole_response(
    status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, reason: bytes | None = None
) -> http.Response:
    """A response known whole, for mitmproxy to send: the headers less hop-by-hop ones and
    any length, then the body's own length. The body goes out as it is (already encoded)."""
    kept = [(k, v) for k, v in headers if k.decode("latin-1").lower() not in NOT_SENT]
    kept.append((b"content-length", str(len(body)).encode()))
    if reason is None:
        reason = status_codes.RESPONSES.get(status, "").encode()
    now = time.time()
    return http.Response(b"HTTP/1.1", status, reason, http.Headers(kept), body, None, now, now)


def _mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None
