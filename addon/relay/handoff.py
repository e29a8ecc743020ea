"""Handing a chosen answer to mitmproxy, which owns the client's connection.

mitmproxy streams only bytes that arrive from a server connection, and sends an answer
that an addon sets in one piece (see bridge.py). So a short answer that is not a stream
is set on the flow whole; any other goes through the loopback bridge, the flow's upstream
pointed at it with a one-time token, or, in the lean master, straight into the client's
connection (direct.py). For inspection, the flow is given back the endpoint's URL and the
client's own request once the answer is on its way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import status_codes

from ..providers import HOP_BY_HOP
from ..request import Failure
from ..upstream.client import UpstreamResponse
from ..upstream.failover import Outcome
from .bridge import TOKEN_HEADER, Bridge
from .direct import DirectRelays, installed
from .resume import ResumingResponse

TOKEN_BYTES = TOKEN_HEADER.encode()
NOT_SENT = HOP_BY_HOP | {"content-length"}  # a whole response's headers that it gets anew

Relayed = Callable[[BaseException | None], None]


@dataclass
class InFlight:
    """What the addon keeps about a flow while its response is relayed."""

    outcome: Outcome
    started: float
    token: str = ""
    saved_request: tuple[Any, bytes | None] | None = None
    endpoint_url: str = ""
    relay: UpstreamResponse | ResumingResponse | None = None


class Handoff:
    """Puts chosen answers on their flows: whole, through the bridge, or direct."""

    def __init__(self, inspected: bool, direct: bool) -> None:
        self.inspected = inspected  # whether anyone looks at flows: then they show the real request
        assert not direct or installed(), "direct relays need direct.install() first"
        self.direct = DirectRelays() if direct else None
        self.bridge = Bridge()

    async def start(self, connections: Any) -> None:
        await self.bridge.start()
        if self.direct:
            self.direct.connections = connections

    def whole(self, flow: http.HTTPFlow, state: InFlight, body: bytes) -> None:
        response = state.outcome.response
        assert response is not None
        reason = response.reason.encode("latin-1", "replace")
        flow.response = whole_response(response.status, response.headers, body, reason)
        response.close()
        if self.inspected:
            flow.request.url = state.endpoint_url

    def relay(self, flow: http.HTTPFlow, state: InFlight, done: Relayed) -> None:
        """Streams the chosen answer to the client: injected directly into the lean master's
        stream when the flow allows, else through the bridge."""
        assert state.relay is not None
        if self.direct and self.direct.can_carry(flow):
            self.direct.hand(flow, state.relay, done)
            return
        state.token = self.bridge.park(state.relay, done)
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

    def restore(self, flow: http.HTTPFlow, state: InFlight) -> None:
        """Puts back what inspection should show: the endpoint's URL and the original body."""
        if state.saved_request is None:
            return
        headers, body = state.saved_request
        state.saved_request = None
        flow.request.headers = headers
        flow.request.url = state.endpoint_url  # after the headers: it sets Host to the endpoint's
        flow.request.raw_content = body

    def discard(self, flow: http.HTTPFlow, state: InFlight) -> None:
        """The flow failed: its parked answer, if any, is closed."""
        self.restore(flow, state)
        self.bridge.discard(state.token)
        if self.direct:
            self.direct.discard(flow)
        if flow.response is not None and state.relay is not None and state.relay.copy:
            flow.response.raw_content = bytes(state.relay.copy)  # what the client got before the cut

    def left(self, client: str) -> None:
        if self.direct:
            self.direct.left(client)

    async def stop(self) -> None:
        await self.bridge.stop()
        if self.direct:
            self.direct.stop()


def respond(flow: http.HTTPFlow, failure: Failure) -> None:
    flow.response = whole_response(failure.status, failure.headers, failure.body)


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
