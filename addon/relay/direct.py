"""Streams the lean master's answers straight into the client's connection, with no bridge.

mitmproxy streams only bytes that arrive from a server connection, so under `mitmdump -s`
and mitmweb an answer the addon fetched goes through the loopback bridge (bridge.py): a
second HTTP exchange inside the process, which costs about as much CPU as mitmproxy's
whole client side. The lean master is ours, so it gives mitmproxy an HTTP stream that
takes the body from the addon instead: the `request` hook sets the answer's head and
hands its body to a `DirectRelay`; the stream sends the head, and the relay injects the
body piece by piece as it arrives (mitmproxy's own way to inject messages into a live
connection). A body that breaks off ends as a protocol error, which closes the client's
connection without a clean end, so a cut is seen as a cut, as through the bridge.

The HTTP layer hands each piece to the stream of its flow, and drops a piece whose stream
has ended (the client left between two pieces). HTTP/1 clients only, for now: HTTP/2 and
HTTP/3 answers still go through the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mitmproxy import http
from mitmproxy.addons import next_layer
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import events, layers
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import (
    HttpLayer,
    HttpStream,
    RequestProtocolError,
    ResponseData,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)

from .bridge import Relayable

try:  # mitmproxy 12 names the kind of a protocol error; 11 takes an HTTP status
    from mitmproxy.proxy.layers.http import ErrorCode  # type: ignore[attr-defined]

    CUT: Any = ErrorCode.GENERIC_SERVER_ERROR
except ImportError:
    CUT = 502

RELAY_KEY = "claude-code-fallback-relay"  # the flow's DirectRelay, until its stream starts it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """A part of a relayed body, injected into the flow's stream."""

    data: bytes = b""
    end: bool = False
    cut: str = ""  # why the body broke off; the client's connection is closed


class DirectStream(HttpStream):
    """mitmproxy's HTTP stream, able to stream an answer whose body an addon injects."""

    def send_response(self, already_streamed: bool = False) -> Any:
        relay = None if already_streamed else self.flow.metadata.pop(RELAY_KEY, None)
        if relay is None:
            yield from super().send_response(already_streamed)
            return
        assert self.flow.response
        yield SendHttp(ResponseHeaders(self.stream_id, self.flow.response, False), self.context.client)
        self.server_state = self.state_relay
        relay.start()

    def _handle_event(self, event: events.Event) -> Any:
        if isinstance(event, events.MessageInjected) and isinstance(event.message, Piece):
            if self.server_state == self.state_relay:
                yield from self.state_relay(event.message)
            return
        yield from super()._handle_event(event)

    def state_relay(self, piece: Piece) -> Any:
        if piece.data:
            yield SendHttp(ResponseData(self.stream_id, piece.data), self.context.client)
        if piece.end:
            yield from super().send_response(already_streamed=True)
        elif piece.cut:
            yield from self.handle_protocol_error(ResponseProtocolError(self.stream_id, piece.cut, CUT))

    def handle_protocol_error(self, event: RequestProtocolError | ResponseProtocolError) -> Any:
        if self.server_state == self.state_relay and isinstance(event, RequestProtocolError):
            # The client broke off mid-answer. mitmproxy would tell the server; there is none,
            # and the relay finds out by itself.
            self.server_state = self.state_errored
        yield from super().handle_protocol_error(event)


class DirectLayer(HttpLayer):
    """mitmproxy's HTTP layer, handing a relay's pieces to the stream of their flow, and
    dropping those whose stream has ended (the client left between two pieces)."""

    def _handle_event(self, event: events.Event) -> Any:
        if isinstance(event, events.MessageInjected) and isinstance(event.message, Piece):
            stream = next((s for s in self.streams.values() if getattr(s, "flow", None) is event.flow), None)
            if stream is not None:
                yield from self.event_to_child(stream, event)
            return
        yield from super()._handle_event(event)


def install() -> None:
    """Makes mitmproxy open `DirectLayer`s and `DirectStream`s: for the lean master only,
    whose process runs no one else's addons."""
    http_layers.HttpStream = DirectStream  # type: ignore[misc]
    layers.HttpLayer = next_layer.HttpLayer = DirectLayer  # type: ignore[misc]


def installed() -> bool:
    return http_layers.HttpStream is DirectStream and next_layer.HttpLayer is DirectLayer


class DirectRelay:
    """Relays one answer's body into its flow's client connection, as it arrives."""

    def __init__(
        self,
        flow: http.HTTPFlow,
        response: Relayable,
        on_done: Callable[[BaseException | None], None],
        relays: DirectRelays,
    ) -> None:
        self.flow = flow
        self.response = response
        self.on_done = on_done
        self.relays = relays
        self.task: asyncio.Task[None] | None = None
        self.done = False

    def start(self) -> None:
        # Called by the stream while mitmproxy handles an event for this connection; the
        # relay's own injections wait for that to finish.
        if self.done:  # the client left before its head was sent
            return
        self.task = asyncio.ensure_future(self.pump())
        self.task.add_done_callback(self.ended)

    def ended(self, _: asyncio.Task[None]) -> None:
        if not self.done:  # cancelled before it began, or while it sent the cut
            self.response.close()
            self.finish(ConnectionAbortedError("client went away"))

    async def pump(self) -> None:
        error: BaseException | None = None
        try:
            async for chunk in self.response.chunks():
                if chunk:
                    await self.send(Piece(data=chunk))
            await self.send(Piece(end=True))
        except asyncio.CancelledError:
            error = ConnectionAbortedError("client went away")
        except Exception as e:
            error = e
        finally:
            self.response.close()
        if error is not None and not isinstance(error, ConnectionAbortedError):
            with contextlib.suppress(Exception):  # unless the client is gone already
                await self.send(Piece(cut=f"{type(error).__name__}: {error}"))
        self.finish(error)

    async def send(self, piece: Piece) -> None:
        client = self.flow.client_conn
        handler = self.relays.connections.get(client.id)
        if handler is None:
            raise ConnectionAbortedError("client went away")
        await handler.server_event(events.MessageInjected(self.flow, piece))
        transport = handler.transports.get(client)
        writer = transport.writer if transport else None
        if writer is None or writer.is_closing():
            if not piece.end:
                raise ConnectionAbortedError("client went away")
            return
        await writer.drain()  # a slow client slows the relay, not the proxy's memory

    def finish(self, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        running = self.relays.running
        if running.get(self.flow.client_conn.id) is self:
            del running[self.flow.client_conn.id]
        try:
            self.on_done(error)
        except Exception:
            log.exception("relay completion callback failed")

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
        else:  # never started: the flow died before its head was sent
            self.response.close()
            self.finish(ConnectionAbortedError("client went away"))


class DirectRelays:
    """The lean master's direct relays, by client connection."""

    def __init__(self) -> None:
        self.connections: Mapping[str, Any] = {}  # proxyserver's live connection handlers
        self.running: dict[str, DirectRelay] = {}

    @staticmethod
    def can_carry(flow: http.HTTPFlow) -> bool:
        """Whether this flow's answer can be injected: an HTTP/1 client (HTTP/2 and 3 untried)."""
        return not (flow.request.is_http2 or flow.request.is_http3)

    def hand(
        self,
        flow: http.HTTPFlow,
        response: Relayable,
        on_done: Callable[[BaseException | None], None],
    ) -> None:
        """Sets the answer's head on the flow; its body follows once mitmproxy sends the head."""
        flow.response = streamed_head(response)
        relay = DirectRelay(flow, response, on_done, self)
        flow.metadata[RELAY_KEY] = relay
        self.running[flow.client_conn.id] = relay

    def discard(self, flow: http.HTTPFlow) -> None:
        """A flow that died before its head was sent: its relay will never start."""
        if relay := flow.metadata.pop(RELAY_KEY, None):
            relay.cancel()

    def left(self, client: str) -> None:
        if relay := self.running.pop(client, None):
            relay.cancel()

    def stop(self) -> None:
        for relay in list(self.running.values()):
            relay.cancel()


def streamed_head(response: Relayable) -> http.Response:
    """The head mitmproxy sends for a relayed body: the upstream's headers (hop-by-hop ones
    are gone already), framed by the upstream's length when it gave one, else chunked."""
    headers = list(response.headers)
    if not any(k.lower() == b"content-length" for k, _ in headers):
        headers.append((b"transfer-encoding", b"chunked"))
    reason = (
        response.reason.encode("latin-1", "replace")
        or status_codes.RESPONSES.get(response.status, "").encode()
    )
    return http.Response(
        b"HTTP/1.1", response.status, reason, http.Headers(headers), b"", None, time.time(), None
    )
