"""The Fallback addon: mitmproxy's hooks and each request's path, in small steps.

Each request is sent by the addon itself to the first healthy endpoint, failing over
before a byte reaches the client (upstream/failover.py). A short answer that is not a
stream is then handed to mitmproxy whole; any other is relayed so that it streams
(relay/handoff.py). What is built from the config is one `Runtime`, swapped whole on
reload; the config's reading, reloads and the metrics port are a sibling addon
(ops/lifecycle.py), and how the process ends (a stop, or a restart) another (ops/drain.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from mitmproxy import connection, contentviews, ctx, http

from .config import Config
from .fleet import workers
from .modes import listen_address
from .ops.dashboard import Dashboard
from .ops.drain import Drain
from .ops.flowcap import FlowCap
from .ops.inspection import annotate, mask_flow_keys
from .ops.lifecycle import Lifecycle
from .ops.service import Service
from .ops.timeline import Timeline
from .relay.accounting import CLIENT_KEY, Accounting
from .relay.admission import Admission
from .relay.bodylimit import BodyLimit
from .relay.departures import ClientLeft, Departures
from .relay.handoff import Handoff, InFlight, respond
from .relay.resume import ResumingResponse, can_resume
from .relay.sseview import stream_view
from .request import ClientRequest, error_failure
from .runtime import Lasting, Runtime
from .state.access import UNAUTHENTICATED
from .upstream import gateway
from .upstream.failover import Outcome

WHOLE_BODY_LIMIT = 1 << 20  # a non-streamed answer up to this size is sent whole, without the bridge

log = logging.getLogger(__name__)


class Fallback:
    """mitmproxy's hooks, and each request's path from the client to an endpoint and back.

    `inspected` says whether anyone looks at flows (mitmweb, mitmdump's output, saved
    flows): the lean master has no such addon, so it skips the work that only serves their
    eyes. `direct` hands streams straight to the lean master's connections (direct.py).
    """

    def __init__(self, inspected: bool = True, direct: bool = False) -> None:
        self.inspected = inspected
        self.lasting = Lasting()
        self.runtime: Runtime | None = None
        self.handoff = Handoff(inspected, direct)
        lasting = self.lasting
        self.accounting = Accounting(
            lasting.metrics, lasting.events, lasting.usage, lasting.budgets.spend, lasting.telemetry
        )
        self.departures = Departures()
        self.body_limit = BodyLimit(self.handoff.bridge, self.accounting.refused_body)
        self.lifecycle = Lifecycle(self, self.lasting.metrics, self.lasting.events)
        self.drain = Drain(self, self.lasting.events)
        self.admission = Admission(
            self.drain.refusal, self.lasting.budgets, self.body_limit, self.lasting.metrics
        )
        self.timeline = Timeline(shared=workers.incidents_dir(), worker=workers.log_context().get("worker"))
        self.lasting.events.listeners.append(self.timeline.record)
        self.dashboard = Dashboard(self, self.timeline, self.lifecycle.reload)
        self.service = Service(self, self.dashboard.allowed, self.drain.standing)
        # mitmproxy loads these too
        self.addons = [self.lifecycle, self.drain, *([FlowCap()] if inspected else [])]
        self.view = stream_view()
        self.inflight: dict[str, InFlight] = {}
        self.choosing = 0  # requests still failing over, not yet in `inflight`
        self.ready = asyncio.Event()  # set once `running` has started everything
        self.started_at = time.time()
        self.address = ""

    # -- mitmproxy hooks ------------------------------------------------------------

    def load(self, loader: Any) -> None:
        contentviews.add(self.view)
        loader.add_option(
            "fallback_flow_body_limit",
            int,
            1 << 20,
            """
            Bytes of each relayed response body kept on the flow for inspection (mitmweb,
            saved flows). 0 keeps none.
            """,
        )

    def configure(self, updated: set[str]) -> None:
        if "fallback_flow_body_limit" in updated:
            # how much of each relayed body to keep on the flow: nothing when no one looks
            self.lasting.client.copy_limit = ctx.options.fallback_flow_body_limit if self.inspected else 0

    async def running(self) -> None:
        # The addon opens upstream connections itself; mitmproxy must not open its own.
        ctx.options.update(connection_strategy="lazy")
        await self.handoff.start(ctx.master.addons.get("proxyserver").connections)
        assert self.runtime is not None
        self.address = listen_address(ctx.options.mode, ctx.options.listen_host)
        await self.lasting.share(self.runtime.config, self.service.describe)
        await self.lasting.client.start()
        self.install(self.runtime.config)  # again, with the fleet's shared state
        self.runtime.prepare(self.lasting.client.providers.values(), self.lasting)
        self.body_limit.stream_past_limit()
        self.started_at = time.time()
        self.spawn(self.timeline.run(self.lasting.metrics))
        self.ready.set()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.runtime is None:
            return
        request = flow.request
        length = request.headers.get("content-length")
        http1 = not (request.is_http2 or request.is_http3)
        if length is None and http1 and "transfer-encoding" not in request.headers:
            return  # no body
        self.body_limit.guard(flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.runtime is None:
            return
        if flow.request.stream:
            return  # a body past server.maxBodyBytes, on its way to the bridge's refusal
        self.body_limit.unguard(flow)
        try:
            await self.serve(flow)
        except Exception as e:
            # One request's bug must not become everyone's outage: answer it and carry on.
            log.exception("claude-code-fallback: internal error while serving a request")
            self.lasting.events.event("internal_error", logging.ERROR, error=f"{type(e).__name__}: {e}")
            self.accounting.account(flow, "internal_error")
            if flow.response is None and flow.live:
                respond(flow, error_failure(500, "api_error", "Internal error in claude-code-fallback."))
        self.drain.let_go(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self.inflight.get(flow.id)
        if state is None or flow.response is None:
            return
        flow.response.stream = True
        self.handoff.restore(flow, state)

    def response(self, flow: http.HTTPFlow) -> None:
        state = self.inflight.pop(flow.id, None)
        if state is None or flow.response is None or state.relay is None:
            return
        relay = state.relay
        if relay.copy and relay.complete and len(relay.copy) < relay.copy_limit:
            flow.response.raw_content = bytes(relay.copy)

    def error(self, flow: http.HTTPFlow) -> None:
        if (state := self.inflight.pop(flow.id, None)) is not None:
            self.handoff.discard(flow, state)

    def client_disconnected(self, client: connection.Client) -> None:
        # stops the upstream attempt of a request still waiting for its answer to be chosen
        self.departures.left(client.id)
        self.handoff.left(client.id)

    async def done(self) -> None:
        contentviews.remove(self.view)
        for task in list(self.lasting.tasks):
            task.cancel()
        await self.handoff.stop()
        await self.lasting.budgets.flush()  # spend not yet in the fleet's store
        await self.lasting.usage.stop()  # the last usage counts, before Redis's client closes
        await self.lasting.shared.stop()
        await self.lasting.client.stop()

    # -- the request's path ---------------------------------------------------------

    async def serve(self, flow: http.HTTPFlow) -> None:
        await self.ready.wait()  # mitmproxy listens before every addon's `running` hook has run
        runtime = self.runtime
        assert runtime is not None
        if await self.service.serve(flow) or self.dashboard.serve(flow) or gateway.hello(flow):
            if self.inspected and runtime.config.logging.redact_keys:
                mask_flow_keys(flow)  # a key sent for /health or /metrics, on the flow mitmweb shows
            return
        body = flow.request.raw_content or b""
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in flow.request.headers.fields]
        client = flow.metadata[CLIENT_KEY] = runtime.access.client(headers) or UNAUTHENTICATED
        trace = self.lasting.telemetry.begin(flow.id, flow.request.method, flow.request.path, headers, client)
        if (refused := self.admission.refusal(flow, client, body)) is not None:
            respond(flow, refused[0])
            self.accounting.account(flow, refused[1])
            return
        request = ClientRequest.parse(
            flow.request.method, flow.request.path, runtime.access.strip(headers), body, trace
        )
        if self.inspected and runtime.config.logging.redact_keys:
            mask_flow_keys(flow)
        await self.answer(flow, runtime, request)

    async def answer(self, flow: http.HTTPFlow, runtime: Runtime, request: ClientRequest) -> None:
        started = time.monotonic()
        self.choosing += 1
        try:
            outcome, whole = await self.departures.run(flow.client_conn.id, self.choose(runtime, request))
        except ClientLeft:
            self.accounting.account(
                flow, "client_cancel", started, status=499
            )  # nginx's "client closed request"
            return
        finally:
            self.choosing -= 1
        state = InFlight(outcome, started)
        if self.inspected:
            annotate(flow, outcome)
        if outcome.response is not None:  # what is left of a budget 80 % spent
            outcome.response.headers += self.lasting.budgets.headers(flow.metadata[CLIENT_KEY])
        if outcome.response is None:
            assert outcome.failure is not None
            respond(flow, outcome.failure)
            failed = "all_failed" if outcome.attempts else "unavailable"
            result = "success" if outcome.failure.status < 400 else failed  # a list the proxy made
            self.accounting.account(
                flow, result, started, outcome.failure.status, None, len(outcome.attempts)
            )
        elif not flow.live or flow.error:  # the client left while we were failing over
            outcome.response.close()
            name = outcome.response.endpoint.name
            self.accounting.account(flow, "client_cancel", started, 499, name, len(outcome.attempts))
        elif whole is not None:
            state.endpoint_url = outcome.response.url  # what mitmweb shows: where the request went
            self.handoff.whole(flow, state, whole)
            self.accounting.answered(flow, state, None)
        else:
            state.endpoint_url = outcome.response.url
            self.stream(flow, state, runtime, request)

    async def choose(self, runtime: Runtime, request: ClientRequest) -> tuple[Outcome, bytes | None]:
        """The failover's outcome, with the whole body when the answer is short and not a stream.

        Such a body needs no bridge: mitmproxy sends it as an answer set by the addon,
        which spares it a second HTTP exchange. Streams, and bodies too large to hold,
        are relayed as they arrive.
        """
        outcome = await runtime.failover.run(request)
        response = outcome.response
        if response is None or response.is_event_stream:
            return outcome, None
        response.copy_limit = 0  # the flow gets the body itself
        return outcome, await response.read_whole(WHOLE_BODY_LIMIT)

    def stream(self, flow: http.HTTPFlow, state: InFlight, runtime: Runtime, request: ClientRequest) -> None:
        assert state.outcome.response is not None
        self.inflight[flow.id] = state
        self.lasting.metrics.active_streams.inc()
        state.relay = state.outcome.response
        if runtime.config.streaming.resume and can_resume(state.relay, request):
            state.relay = ResumingResponse(
                state.relay, request, runtime.failover.resume, len(self.lasting.pool)
            )
        self.handoff.relay(flow, state, functools.partial(self.relayed, flow, state))

    def relayed(self, flow: http.HTTPFlow, state: InFlight, error: BaseException | None) -> None:
        """The bridge or a direct relay finished relaying a response."""
        self.lasting.metrics.active_streams.dec()
        if not state.token:  # a direct relay: the flow may end with no hook to say so
            self.inflight.pop(flow.id, None)
        self.accounting.answered(flow, state, error)

    # -- the runtime ----------------------------------------------------------------

    def install(self, config: Config) -> None:
        """Swaps in what `config` makes; the endpoints' states and sessions carry over."""
        self.runtime = Runtime.build(config, self.runtime, self.lasting, workers.log_context())
        self.body_limit.limit = config.server.max_body_bytes
        self.accounting.prices = self.runtime.prices
        if self.ready.is_set():  # before that, `running` sets mitmproxy's streaming option
            # once the option being handled is set: a config may come as `set fallback_config`
            asyncio.get_running_loop().call_soon(self.body_limit.stream_past_limit)

    def current(self) -> Config | None:
        return self.runtime.config if self.runtime else None

    def health(self) -> tuple[int, dict[str, Any]]:
        return self.service.health()

    def busy(self) -> dict[str, int]:
        return {"streams": len(self.inflight), "choosing": self.choosing}

    def spawn(self, coroutine: Any) -> None:
        self.lasting.spawn(coroutine)
