"""The loopback bridge: how a response the addon fetched itself reaches mitmproxy as a stream.

mitmproxy only streams bytes that arrive from a server connection, so once the addon has
chosen an upstream response it parks it here under a one-time token and points the flow
at this server. mitmproxy connects (and keeps the connection for the next request), asks
with the token, and gets the response relayed chunk by chunk. Listening on 127.0.0.1
only, and answering nothing without a valid token, keeps it out of anyone else's reach.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import h11

TOKEN_HEADER = "x-ccf-bridge-token"
CHUNKED = b"\r\ntransfer-encoding: chunked\r\n"

log = logging.getLogger(__name__)


class Relayable(Protocol):
    """A response the bridge can relay: its status, reason, headers and body's chunks."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...]

    def chunks(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...


@dataclass
class Parked:
    """A response waiting at the bridge for mitmproxy to fetch it with its token, and who to tell
    when it has been relayed."""

    response: Relayable
    on_done: Callable[[BaseException | None], None]


@dataclass
class Whole:
    """A response known whole in advance (a refusal), relayed like any other."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    reason: str = ""

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.body

    def close(self) -> None:
        pass


class Bridge:
    """The loopback HTTP/1.1 server through which an answer the addon chose reaches mitmproxy as a
    server's answer, so that it streams (see the module's docstring)."""

    def __init__(self) -> None:
        self.parked: dict[str, Parked] = {}
        self.standing: dict[str, Callable[[], Parked]] = {}
        self.relays: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        # Bound and listening from the start, so that a flow can be pointed here before the
        # server serves (`start`): a connection made earlier waits in the backlog.
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.setblocking(False)
        self.port: int = self.socket.getsockname()[1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _BridgeConnection(self), sock=self.socket)

    async def stop(self) -> None:
        if self.server:
            self.server.close()
        else:
            self.socket.close()
        for token in list(self.parked):
            self.discard(token)

    def park(self, response: Relayable, on_done: Callable[[BaseException | None], None]) -> str:
        """Parks a response; `on_done` gets None after a clean end, else what broke the relay."""
        token = secrets.token_urlsafe(18)
        self.parked[token] = Parked(response, on_done)
        return token

    def stand(self, answer: Callable[[], Parked]) -> str:
        """A token answered every time it comes, with a fresh `answer()`.

        For requests refused before their body is read: mitmproxy streams such a body
        here rather than keep it, and the bridge reads it and drops it before answering.
        """
        token = secrets.token_urlsafe(18)
        self.standing[token] = answer
        return token

    def discard(self, token: str) -> None:
        """Drops a parked response that will never be fetched (the flow died first)."""
        if parked := self.parked.pop(token, None):
            parked.response.close()
            parked.on_done(ConnectionAbortedError("flow ended before the response was relayed"))


class _BridgeConnection(asyncio.Protocol):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.conn = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.relay: asyncio.Task[None] | None = None
        self.busy = False  # a response is being relayed; the next request waits in h11's buffer
        self.parked: Parked | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.conn.receive_data(data)
            self._next_events()
        except h11.RemoteProtocolError:
            self._abort()

    def eof_received(self) -> bool | None:
        self._abort()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        if self.relay and not self.relay.done():
            self.relay.cancel()
        elif self.parked and not self.busy:  # a relay that has yet to start finds out itself
            self._finish(ConnectionAbortedError("client went away"))

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def _next_events(self) -> None:
        while not self.busy:
            event = self.conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                token = dict(event.headers).get(TOKEN_HEADER.encode(), b"").decode("latin-1")
                self.parked = self.bridge.parked.pop(token, None)
                if self.parked is None and (answer := self.bridge.standing.get(token)):
                    self.parked = answer()
            elif isinstance(event, h11.EndOfMessage):
                if self.parked is None:
                    self._refuse()
                    return
                self.busy = True
                # The task registers itself: under an eager task factory (mitmproxy 12) it may
                # run to completion before ensure_future even returns.
                task = asyncio.ensure_future(self._relay(self.parked))
                self.bridge.relays.add(task)
                task.add_done_callback(self.bridge.relays.discard)
            elif isinstance(event, h11.ConnectionClosed):
                self._abort()
                return

    def _refuse(self) -> None:
        body = b'{"type":"error","error":{"type":"permission_error","message":"not a valid bridge token"}}'
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        self._write(h11.Response(status_code=403, headers=headers))
        self._write(h11.Data(data=body))
        self._write(h11.EndOfMessage())
        if self.transport:
            self.transport.close()

    def _write(self, event: h11._events.Event) -> bytes:
        data = self.conn.send(event) or b""
        if data and self.transport:
            self.transport.write(data)
        return data

    async def _relay(self, parked: Parked) -> None:
        self.relay = asyncio.current_task()
        response = parked.response
        error: BaseException | None = None
        try:
            if self.transport is None or self.transport.is_closing():
                raise ConnectionAbortedError("client went away")
            head = self._write(
                h11.Response(
                    status_code=response.status,
                    reason=response.reason.encode("latin-1", "replace"),
                    headers=list(response.headers),
                )
            )
            # A stream's chunks are framed here rather than by h11 one event at a time;
            # h11 still writes the head and the closing chunk, and frames any other body.
            chunked = CHUNKED in head.lower()
            async for chunk in response.chunks():
                if not chunked:
                    self._write(h11.Data(data=chunk))
                elif chunk and self.transport:
                    self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if not self.writable.is_set():
                    await self.writable.wait()
                if self.transport is None or self.transport.is_closing():
                    raise ConnectionAbortedError("client went away")
            self._write(h11.EndOfMessage())
        except asyncio.CancelledError:
            error = ConnectionAbortedError("client went away")
        except Exception as e:
            error = e
        finally:
            response.close()
        self._finish(error, parked)
        if error is not None:
            self._abort()
            return
        self.relay = None
        self.busy = False
        self.parked = None
        try:
            self.conn.start_next_cycle()
        except h11.LocalProtocolError:
            self._abort()
            return
        self._next_events()

    def _finish(self, error: BaseException | None, parked: Parked | None = None) -> None:
        parked = parked or self.parked
        self.parked = None
        if parked is not None:
            try:
                parked.on_done(error)
            except Exception:
                log.exception("bridge completion callback failed")

    def _abort(self) -> None:
        """Ends the connection without a clean end of body, so a cut is seen as a cut."""
        if self.transport:
            self.transport.abort()
