"""The loopback HTTP/1.1 server under the fake upstreams (`fakes.anthropic`, `fakes.cloud`, `fakes.openai`).

`FakeServer` owns what a fake needs besides its API: listening on 127.0.0.1 inside a
running loop (`start`) or from a daemon thread of its own (`start_in_thread`, `with`),
reading requests with h11 (keep-alive, pipelining, `Expect: 100-continue`, multi-MB
bodies), recording them (`requests`, `request_count`, `keep`, `wait_for_requests`) and
one connection fault, `idle_close`. A fake implements `_answer`, which writes raw bytes
to the connection, so that it can break HTTP on purpose; `_handle` is there for a fake
that answers some requests aside or watches the client while it answers. It imports
nothing from the proxy: a fake that shared the proxy's logic would prove nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus
from typing import Any, Generic, Self, TypeVar

import h11

READ_SIZE = 256 * 1024
_MAX_HEAD = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream; charset=utf-8"
LAST_CHUNK = b"0\r\n\r\n"

B = TypeVar("B")


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Overloaded" if status == 529 else "Unknown"


@lru_cache(maxsize=64)
def status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {reason(status)}\r\n".encode()


def response_head(
    status: int, content_type: bytes, length: int | None, lines: list[bytes], keep_alive: bool
) -> bytes:
    """A response's head: a chunked body when `length` is None; `lines` are whole header lines."""
    parts = [status_line(status), b"content-type: ", content_type, b"\r\n"]
    if length is None:
        parts.append(b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n")
    else:
        parts.append(b"content-length: %d\r\n" % length)
    parts += lines
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(frozen=True)
class SeenRequest:
    """One request as the fake received it (header names lower-cased, in order).

    `connection` numbers the TCP connections from 1, so tests can tell reuse apart.
    """

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    time: float
    connection: int = 0

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        name = name.lower()
        return next((v for n, v in self.headers if n == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class Exchange:
    """One request being answered on one connection; `number` counts requests from 1."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    seen: SeenRequest
    keep_alive: bool
    number: int
    extra_headers: bytes = b""  # header lines the fake adds to this answer

    @property
    def head_only(self) -> bool:
        return self.seen.method == "HEAD"


class FakeServer(Generic[B]):
    """A loopback HTTP/1.1 server that records each request and answers it with a behaviour `B`.

    `behavior` answers every request unless `script` holds behaviours, which are then used
    one per request, in order. Set either from any thread at any time. Every request is
    counted in `request_count` and recorded in `requests` once fully read and before it is
    answered; set `keep` to remember only the latest few (long load runs).
    """

    def __init__(self, name: str, port: int, behavior: B) -> None:
        self.name = name
        self.port = port
        self.behavior = behavior
        self.script: list[B] = []
        self.requests: list[SeenRequest] = []
        self.request_count = 0
        self.keep: int | None = None
        self.open_connections = 0
        # A keep-alive connection idle for longer than this is closed (with a reset) when
        # the next request arrives on it: the server's idle timer fired while that
        # request was on its way, so the client had already picked the connection.
        self.idle_close: float | None = None
        self.idle_closes = 0
        self._plain = behavior
        self._cond = threading.Condition()
        self._numbers = itertools.count(1)
        self._connections = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.url})"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening in the running event loop."""
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, limit=READ_SIZE, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is None:
            return
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def start_in_thread(self) -> Self:
        """Serve from a daemon thread with its own loop; return once listening."""
        loop = asyncio.new_event_loop()
        started: list[BaseException | None] = []
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:
                started.append(e)
                ready.set()
                loop.close()
                return
            started.append(None)
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"{type(self).__name__}-{self.name}", daemon=True)
        self._thread.start()
        ready.wait()
        if started[0] is not None:
            raise started[0]
        return self

    def stop_thread(self) -> None:
        """Undo `start_in_thread`."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_thread()

    # -- what tests read ------------------------------------------------------------------

    def reset(self) -> None:
        """Forget requests, script, `keep` and `idle_close`; answer as when new."""
        with self._cond:
            self.requests.clear()
            self.request_count = 0
            self.script = []
            self.behavior = self._plain
            self.keep = None
            self.idle_close = None
            self.idle_closes = 0

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[SeenRequest]:
        """Block until `n` requests have been seen (from another thread than the server's)."""
        self._wait(lambda: self.request_count, n, timeout, "request(s)")
        return list(self.requests)

    async def wait_for_requests_async(self, n: int, timeout: float = 5.0) -> list[SeenRequest]:
        """`wait_for_requests` for coroutines, safe also when the server shares their loop."""
        return await asyncio.to_thread(self.wait_for_requests, n, timeout)

    def _wait(self, count: Callable[[], int], n: int, timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: count() >= n, timeout):
                raise AssertionError(
                    f"fake {self.name!r}: expected {n} {what} within {timeout} s, got {count()}"
                )

    def _record(self, seen: SeenRequest) -> B:
        """Count and remember `seen`, and take the behaviour that answers it."""
        with self._cond:
            self.request_count += 1
            self.requests.append(seen)
            if self.keep is not None and len(self.requests) > self.keep:
                del self.requests[: len(self.requests) - self.keep]
            behavior = self.script.pop(0) if self.script else self.behavior
            self._cond.notify_all()
        return behavior

    # -- what a fake implements -------------------------------------------------------------

    async def _handle(self, x: Exchange, pending: bytearray) -> bool:
        """Record the request `x` and answer it; return whether the connection can be reused.

        `pending` holds what the client sent after the request (pipelined bytes), for a fake
        that reads from the connection while it answers.
        """
        return await self._answer(x, self._record(x.seen))

    async def _answer(self, x: Exchange, b: B) -> bool:
        """Send the response `b` asks for; return whether the connection can be reused."""
        raise NotImplementedError

    # -- one connection -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        # A drain() that waits for an empty buffer makes every write a real flush: each
        # write leaves as it was cut, and what came before a reset left before it.
        transport.set_write_buffer_limits(0)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.open_connections += 1
        connection = next(self._connections)
        pending = bytearray()
        idle_since: float | None = None
        try:
            while exchange := await self._read_request(reader, writer, pending, connection, idle_since):
                if not await self._handle(exchange, pending):
                    return
                idle_since = time.monotonic()
        except h11.RemoteProtocolError:
            if not transport.is_closing():
                writer.write(_BAD_REQUEST)
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            # Only stop() cancels; ending normally keeps asyncio 3.11 from logging the
            # cancellation as an unhandled client_connected_cb error.
            pass
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            transport.close()

    async def _read_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: bytearray,
        connection: int,
        idle_since: float | None,
    ) -> Exchange | None:
        if idle_since is not None and self.idle_close is not None and not pending:
            pending += await reader.read(READ_SIZE)
            if pending and time.monotonic() - idle_since > self.idle_close:
                self.idle_closes += 1
                writer.transport.abort()
                return None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        if pending:
            conn.receive_data(bytes(pending))
            pending.clear()
        request: h11.Request | None = None
        body: list[bytes] = []
        continued = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if not continued and conn.they_are_waiting_for_100_continue:
                    writer.write(_CONTINUE)
                    continued = True
                conn.receive_data(await reader.read(READ_SIZE))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # the client closed between requests
                return None
        assert request is not None
        pending += conn.trailing_data[0]
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers]
        keep_alive = request.http_version == b"1.1" and not any(
            n == "connection" and "close" in v.lower() for n, v in headers
        )
        seen = SeenRequest(
            request.method.decode("ascii"),
            request.target.decode("latin-1"),
            headers,
            b"".join(body),
            time.monotonic(),
            connection,
        )
        return Exchange(reader, writer, seen, keep_alive, next(self._numbers))


def serve_in_foreground(
    fake: FakeServer[Any], program: str, notes: Callable[[], Sequence[str]] = tuple
) -> int:
    """A fake's command line: serve `fake` until SIGINT or SIGTERM; once listening, print its
    URL, then `notes()`. The exit status: 0, or 1 when it cannot listen (`program` says so)."""
    fake.keep = 0  # nobody can read them here; count only, so memory stays flat under load
    try:
        asyncio.run(_serve_until_signal(fake, notes))
    except OSError as e:
        print(f"{program}: cannot listen on 127.0.0.1:{fake.port}: {e}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signal(fake: FakeServer[Any], notes: Callable[[], Sequence[str]]) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await fake.start()
    print(f"listening on {fake.url}", *notes(), sep="\n", flush=True)
    await stopping.wait()
    await fake.stop()
