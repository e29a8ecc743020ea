"""One attempt at one endpoint: rewrite the request, send it, judge the answer.

An attempt ends in one of three ways: `AttemptFailed` (another endpoint may do better),
an `UpstreamResponse` the client should get (a success, or a 4xx that is the request's
own fault), or, for a stream, the same after its preamble has been held until content.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import Counter
from yarl import URL

from .. import providers, sse
from ..config import Config, Endpoint
from ..providers import HOP_BY_HOP, Outgoing, Provider, content_type, header_value
from ..request import AttemptFailed, ClientRequest, ErrorResponse, Kind, StreamBroken

ERROR_BODY_LIMIT = 1 << 20
REFUSED = frozenset({401, 403})  # the credentials a request carried, refused
READ_SIZE = 1 << 16


def _response_headers(resp: aiohttp.ClientResponse) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((k, v) for k, v in resp.raw_headers if k.decode("latin-1").lower() not in HOP_BY_HOP)


class BodyCheck:
    """Inflates a gzip or deflate body on the side, to tell a truncated body from a whole one.

    The framing of such a body can be valid while the compressed stream inside it is cut
    short; passing it on with a clean end would hand the client a broken answer as whole.
    """

    def __init__(self, encoding: str) -> None:
        self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)

    @classmethod
    def for_encoding(cls, content_encoding: str | None) -> BodyCheck | None:
        encoding = (content_encoding or "").strip().lower()
        return cls(encoding) if encoding in ("gzip", "x-gzip", "deflate") else None

    def feed(self, chunk: bytes) -> None:
        try:
            self.inflater.decompress(chunk, 1 << 16)
            while self.inflater.unconsumed_tail:
                self.inflater.decompress(self.inflater.unconsumed_tail, 1 << 16)
        except zlib.error as e:
            raise StreamBroken(Kind.MALFORMED, f"corrupt compressed body: {e}") from None

    def whole(self) -> bool:
        return self.inflater.eof


@dataclass
class UpstreamResponse:
    """A response chosen for the client: headers received, maybe a held preamble, the rest to come."""

    endpoint: Endpoint
    response: aiohttp.ClientResponse
    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...]
    time_to_headers: float
    idle_timeout: float
    held: list[bytes] = field(default_factory=list)
    events: sse.EventReader | None = None
    decoder: sse.Decoder | None = None
    usage: list[sse.Usage] = field(default_factory=list)
    copy: bytearray = field(default_factory=bytearray)
    copy_limit: int = 0
    complete: bool = False
    body_check: BodyCheck | None = None
    rest: AsyncIterator[bytes] | None = None  # the relay's own reader, when `read_whole` stopped early
    broken: StreamBroken | None = None  # what `read_whole` met, for the relay to meet again
    translator: providers.Translator | None = None  # a platform's body into Anthropic's
    url: str = ""  # where the request went, as the platform addresses it
    model: str | None = None  # the model the endpoint was asked for (after the endpoint's `models`)
    answered_model: str | None = None  # the model the answer names (`message_start`'s, a body's)
    stop_reason: str | None = None  # why the answer stopped, once it says (`message_delta`'s, a body's)

    @property
    def is_event_stream(self) -> bool:
        return self.events is not None

    def take(self, raw: bytes) -> bytes:
        """What the client gets of bytes from the endpoint: the same bytes, or their translation.

        Raises StreamBroken when the body is corrupt (a bad compressed stream, a bad frame).
        """
        if self.body_check is not None:
            self.body_check.feed(raw)
        if self.translator is None:
            return raw
        return self._translated(self.translator.feed, raw)

    @staticmethod
    def _translated(step: Callable[..., bytes], *data: bytes) -> bytes:
        try:
            return step(*data)
        except Exception as e:
            raise StreamBroken(Kind.MALFORMED, f"cannot decode the platform's answer: {e}") from None

    def observe(self, chunk: bytes, only: tuple[bytes, ...] = ()) -> list[sse.Event]:
        """Keeps the bounded copy and reads the events in a chunk (usage, errors); see EventReader.feed."""
        if len(self.copy) < self.copy_limit:
            self.copy += chunk[: self.copy_limit - len(self.copy)]
        if self.events is None or self.decoder is None:
            return []
        try:
            events = self.events.feed(self.decoder(chunk), only)
        except Exception:  # a corrupt compressed stream: stop reading, keep passing bytes
            self.events = None
            return []
        for event in events:
            if (note := sse.note_of(event)) is not None:
                self.noted(note)
        return events

    def noted(self, note: sse.Note) -> None:
        """Keeps what the answer says of itself: its usage, the model that answered, why it stopped."""
        self.usage.append(note.usage)
        self.answered_model = note.model or self.answered_model
        self.stop_reason = note.stop_reason or self.stop_reason

    async def read_whole(self, limit: int) -> bytes | None:
        """The body, when it ends cleanly within `limit` bytes.

        Otherwise None: what was read is held, and the relay through the bridge goes on from
        there exactly as if it had read it itself (a cut body still reaches the client cut).
        """
        body = bytearray()
        rest = self.chunks()
        try:
            async for chunk in rest:
                body += chunk
                if len(body) > limit:
                    break
            else:
                self.read_usage(body)
                return bytes(body)
        except StreamBroken as e:
            self.broken = e
        except BaseException:
            self.close()  # cancelled (the client left): the endpoint must stop too
            raise
        self.held = [bytes(body)]
        self.rest = rest
        return None

    def read_usage(self, body: bytearray) -> None:
        """A whole message's usage, from its JSON body (a translated one's too)."""
        if self.status != 200 or content_type(self.headers) != "application/json":
            return
        decode = sse.decoder_for(header_value(self.headers, b"content-encoding"))
        try:
            note = sse.message_note(decode(bytes(body))) if decode else None
        except Exception:  # a body whose encoding lies: relayed as it is, its usage unknown
            note = None
        if note is not None:
            self.noted(note)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The held bytes, then the rest as it arrives; raises StreamBroken if the upstream fails."""
        if self.held:  # in one piece: one write to the client instead of one per event held
            held, self.held = b"".join(self.held), []
            yield held
        if self.complete:  # a platform's error, read whole and rewritten
            return
        if self.broken is not None:
            raise self.broken
        if self.rest is not None:
            async for chunk in self.rest:
                yield chunk
            return
        content = self.response.content
        # With a content-length, the last chunk ends the client's response cleanly; a body
        # that must pass its integrity check is therefore relayed one chunk behind.
        lag = self.body_check is not None and self.response.content_length is not None
        behind = b""
        watch = IdleWatch(self.idle_timeout)
        try:
            while True:
                try:
                    chunk = await watch.read(content)
                except TimeoutError:
                    raise StreamBroken(Kind.IDLE_TIMEOUT, f"no bytes for {self.idle_timeout:g} s") from None
                except (aiohttp.ClientError, OSError) as e:
                    raise StreamBroken(Kind.UPSTREAM_CUT, type(e).__name__) from None
                if not chunk:
                    break
                chunk = self.take(chunk)
                self.observe(chunk, sse.USAGE_EVENTS)  # past the preamble, only usage is read
                if lag:
                    chunk, behind = behind, chunk
                if chunk:
                    yield chunk
        finally:
            watch.stop()
        # a body cut short of its framing raises ClientPayloadError above; EOF here is a clean end
        if self.body_check is not None and not self.body_check.whole():
            raise StreamBroken(Kind.MALFORMED, "compressed body ended before its end marker")
        if self.translator is not None and (tail := self._translated(self.translator.end)):
            self.observe(tail, sse.USAGE_EVENTS)
            behind += tail
        if behind:
            yield behind
        self.complete = True

    def close(self) -> None:
        """Returns the connection to the pool after a clean end; otherwise closes it."""
        if self.complete:
            self.response.release()
        else:
            self.response.close()


class IdleWatch:
    """One timer for a whole stream: a read that waits longer than `idle` seconds times out.

    An `asyncio.timeout` around every read would arm and disarm a timer per chunk; this one
    fires at most once per `idle` seconds and only cancels a read that is still waiting.
    """

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.loop = asyncio.get_running_loop()
        self.reader: asyncio.Task[Any] | None = None  # the task waiting in a read, if any
        self.since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.fired = False

    async def read(self, content: aiohttp.StreamReader) -> bytes:
        self.reader, self.since = asyncio.current_task(), self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(self.since + self.idle, self._check)
        try:
            return await content.readany()
        except asyncio.CancelledError:
            if self.fired and self.reader is not None and self.reader.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            self.reader = None

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        self.timer = None
        if self.reader is None:
            return  # not reading now: the next read arms the timer again
        due = self.since + self.idle
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self._check)
            return
        self.fired = True
        self.reader.cancel()


def classify_client_error(endpoint: str, error: BaseException) -> AttemptFailed:
    """Maps a connection-level exception from aiohttp to a failure kind."""
    kind = Kind.RESET
    if isinstance(error, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError | ssl.SSLError):
        kind = Kind.TLS
    elif isinstance(error, aiohttp.ConnectionTimeoutError):
        kind = Kind.CONNECT_TIMEOUT
    elif isinstance(error, aiohttp.ClientConnectorError):
        os_error = error.os_error
        if isinstance(os_error, socket.gaierror) or _is_dns_error(error):
            kind = Kind.DNS
        elif isinstance(os_error, ConnectionRefusedError):
            kind = Kind.REFUSED
        elif isinstance(os_error, TimeoutError):
            kind = Kind.CONNECT_TIMEOUT
    elif isinstance(error, aiohttp.ServerDisconnectedError):
        kind = Kind.CLOSED
    elif isinstance(error, aiohttp.ClientResponseError):
        kind = Kind.MALFORMED
    return AttemptFailed(endpoint, kind, f"{FAILURE_TEXT[kind]} ({type(error).__name__})")


FAILURE_TEXT = {
    Kind.RESET: "connection reset before response headers",
    Kind.TLS: "TLS handshake failed",
    Kind.CONNECT_TIMEOUT: "connect timed out",
    Kind.DNS: "host name does not resolve",
    Kind.REFUSED: "connection refused",
    Kind.CLOSED: "connection closed before response headers",
    Kind.MALFORMED: "malformed response",
}


def _is_dns_error(error: aiohttp.ClientConnectorError) -> bool:
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", None)
    return dns_error is not None and isinstance(error, dns_error)


class PooledConnection:
    """Whether the connection a request went out on came from the pool (aiohttp's trace says)."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False

    @staticmethod
    def trace() -> aiohttp.TraceConfig:
        async def reused(session: Any, context: Any, params: Any) -> None:
            if isinstance(context.trace_request_ctx, PooledConnection):
                context.trace_request_ctx.reused = True

        async def created(session: Any, context: Any, params: Any) -> None:
            if isinstance(context.trace_request_ctx, PooledConnection):
                context.trace_request_ctx.reused = False

        trace = aiohttp.TraceConfig()
        trace.on_connection_reuseconn.append(reused)
        trace.on_connection_create_end.append(created)
        return trace

    def went_stale(self, error: BaseException) -> bool:
        """The endpoint closed this pooled connection while it sat idle; the request crossed the close.

        Only a connection that failed before any byte of a response qualifies: aiohttp
        raises these before it returns the response headers.
        """
        return (
            self.reused
            and isinstance(error, aiohttp.ServerDisconnectedError | OSError)
            and not isinstance(error, TimeoutError)
        )


class UpstreamClient:
    """The pooled HTTP client that talks to every endpoint."""

    def __init__(self, config: Config, copy_limit: int = 0, stale_retries: Counter | None = None) -> None:
        self.config = config
        self.copy_limit = copy_limit
        self.stale_retries = stale_retries  # counts, by endpoint, stale pooled connections retried
        self.session: aiohttp.ClientSession | None = None
        self.fresh: aiohttp.ClientSession | None = None  # never reuses a connection
        self.providers: dict[Endpoint, Provider] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=30, keepalive_timeout=15)
        self.session = self._session(connector, [PooledConnection.trace()])
        self.fresh = self._session(aiohttp.TCPConnector(limit=0, force_close=True), [])

    @staticmethod
    def _session(connector: aiohttp.TCPConnector, traces: list[aiohttp.TraceConfig]) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes reach the client as the endpoint encoded them
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=traces,
        )

    async def stop(self) -> None:
        for session in (self.session, self.fresh):
            if session:
                await session.close()

    async def send(
        self,
        endpoint: Endpoint,
        request: ClientRequest,
        deadline: float,
        judge: Callable[[UpstreamResponse], None] | None = None,
    ) -> UpstreamResponse:
        """Sends one attempt. `judge` sees an acceptable answer's headers before a stream's
        preamble is held, and may still refuse it by raising AttemptFailed."""
        provider = self.provider(endpoint)
        outgoing = await self._outgoing(provider, request)
        timeouts = self.config.timeouts
        header_wait = timeouts.first_byte if request.streaming else timeouts.response
        header_wait = min(header_wait, max(0.0, deadline - time.monotonic()))
        started = time.monotonic()
        resp = await self._headers(endpoint, outgoing, header_wait)
        answer = UpstreamResponse(
            endpoint=endpoint,
            response=resp,
            status=resp.status,
            reason=resp.reason or "",
            headers=_response_headers(resp),
            time_to_headers=time.monotonic() - started,
            idle_timeout=timeouts.idle,
            copy_limit=self.copy_limit,
            body_check=BodyCheck.for_encoding(resp.headers.get("content-encoding")),
            url=outgoing.url,
            model=endpoint.map_model(request.model) if request.model else None,
        )
        if resp.status >= 400 and (
            provider.reads_errors
            or resp.status in self.config.retry.statuses
            or self._refuses_own(provider, resp.status)
        ):
            return await self._platform_error(provider, answer)
        if judge is not None:
            try:
                judge(answer)
            except AttemptFailed:
                resp.close()
                raise
        if resp.status < 300:
            reply = provider.reply(answer.headers, request)
            answer.headers, answer.translator = reply.headers, reply.translator
        if resp.status == 200 and content_type(answer.headers) == "text/event-stream":
            await self._read_events(answer, deadline)
        return answer

    async def _headers(self, endpoint: Endpoint, outgoing: Outgoing, wait: float) -> aiohttp.ClientResponse:
        """The endpoint's response headers within `wait`; a failure to get them as AttemptFailed."""
        assert self.session is not None
        pooled = PooledConnection()
        try:
            async with asyncio.timeout(wait):
                try:
                    return await self._request(self.session, outgoing, pooled)
                except (aiohttp.ClientError, OSError) as e:
                    if not pooled.went_stale(e):
                        raise
                    # Not the endpoint's fault: once more, on a new connection, at no cost.
                    if self.stale_retries is not None:
                        self.stale_retries.labels(endpoint.name).inc()
                    return await self._request(self.fresh, outgoing, None)
        except (aiohttp.ClientError, OSError) as e:
            if isinstance(e, TimeoutError) and not isinstance(e, aiohttp.ConnectionTimeoutError):
                raise AttemptFailed(
                    endpoint.name, Kind.FIRST_BYTE_TIMEOUT, f"no response headers within {wait:g} s"
                ) from None
            raise classify_client_error(endpoint.name, e) from None

    async def _read_events(self, answer: UpstreamResponse, deadline: float) -> None:
        """A stream's answer is read as events, and its preamble held until content."""
        answer.decoder = sse.decoder_for(header_value(answer.headers, b"content-encoding"))
        if answer.decoder is None:
            return  # an encoding we cannot read: passed on unread
        answer.events = sse.EventReader()
        try:
            await self._hold_preamble(answer, deadline)
        except BaseException:
            answer.close()  # cancelled too (the client left): the endpoint must stop
            raise

    def provider(self, endpoint: Endpoint) -> Provider:
        """The endpoint's provider, kept across reloads while the endpoint stays the same."""
        if (provider := self.providers.get(endpoint)) is None:
            provider = self.providers[endpoint] = providers.for_endpoint(endpoint)
        return provider

    def configure(self, config: Config, renew: Iterable[Endpoint] = ()) -> list[Provider]:
        """Takes a new config; returns the providers it brings that were not there before, and
        new ones for the endpoints to `renew` (their credentials are looked for again)."""
        self.config = config
        renewed = set(renew)
        kept = {e: p for e, p in self.providers.items() if e in config.endpoints and e not in renewed}
        self.providers = kept
        return [self.provider(e) for e in config.active_endpoints if e not in kept]

    async def _outgoing(self, provider: Provider, request: ClientRequest) -> Outgoing:
        """The request as the endpoint's platform takes it, signed; or why it cannot be sent."""
        name = provider.endpoint.name
        try:
            return await provider.authenticate(provider.outgoing(request))
        except providers.Untranslatable as e:
            # Not the endpoint's fault: nothing cools, and the client hears why if no other can.
            body = sse.error_body("invalid_request_error", str(e))
            refusal = ErrorResponse(400, ((b"content-type", b"application/json"),), body)
            raise AttemptFailed(
                name, Kind.UNTRANSLATABLE, str(e), status=400, response=refusal, final=True
            ) from None
        except providers.CredentialsError as e:
            raise AttemptFailed(name, Kind.CREDENTIALS, str(e), final=True) from None

    async def _request(
        self,
        session: aiohttp.ClientSession | None,
        outgoing: Outgoing,
        pooled: PooledConnection | None,
    ) -> aiohttp.ClientResponse:
        assert session is not None
        return await session.request(
            outgoing.method,
            URL(outgoing.url, encoded=True),
            headers=outgoing.headers,
            data=outgoing.body or None,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.timeouts.connect),
            trace_request_ctx=pooled,
        )

    async def _error_body(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            async with asyncio.timeout(self.config.timeouts.idle):
                return await resp.content.read(ERROR_BODY_LIMIT)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return b""
        finally:
            resp.close()  # an error body is small; a fresh connection is cheaper than reading it out

    async def _platform_error(self, provider: Provider, answer: UpstreamResponse) -> UpstreamResponse:
        """An error answer, read whole and made Anthropic's: failed over, or the client's answer."""
        error = provider.error(answer.status, answer.headers, await self._error_body(answer.response))
        name = answer.endpoint.name
        response = ErrorResponse(error.status, error.headers, error.body)
        detail = f"HTTP {answer.status}"
        if self._refuses_own(provider, answer.status, error.credentials):
            # No response to relay: to the client a 401 would mean that its own login is bad.
            refused = f"{detail}: the endpoint refused the proxy's credentials"
            raise AttemptFailed(name, Kind.CREDENTIALS, refused, status=answer.status, final=True)
        recoverable = error.recoverable
        if recoverable is None:
            recoverable = answer.status in self.config.retry.statuses
        if recoverable:
            raise AttemptFailed(
                name,
                Kind.STATUS,
                detail,
                status=answer.status,
                retry_after=error.retry_after,
                response=response,
            )
        answer.status, answer.headers = error.status, error.headers
        answer.held, answer.complete = [error.body], True
        return answer

    def _refuses_own(self, provider: Provider, status: int, says_so: bool = False) -> bool:
        """Whether an error answer refuses credentials the proxy chose, not the client's: then
        the endpoint cannot serve, and another should (unless `retry.credentialsFailover` is off)."""
        if not (provider.own_credentials and self.config.retry.credentials_failover):
            return False
        return status in REFUSED or says_so

    async def _hold_preamble(self, answer: UpstreamResponse, deadline: float) -> None:
        """Holds the stream's opening events until content arrives; fails the attempt if it never does."""
        streaming = self.config.streaming
        name = answer.endpoint.name
        # Past the request's deadline a live stream is better given to the client than held.
        hold_until = min(time.monotonic() + streaming.hold_max, deadline)
        held_bytes = 0
        content = answer.response.content
        while held_bytes <= streaming.hold_max_bytes:
            hold_left = hold_until - time.monotonic()
            if hold_left <= 0:
                return
            wait = min(answer.idle_timeout, hold_left)
            try:
                async with asyncio.timeout(wait):
                    chunk = await content.readany()
            except TimeoutError:
                if wait < answer.idle_timeout:
                    return  # held long enough: let the client see the stream
                answer.close()
                raise AttemptFailed(
                    name, Kind.IDLE_TIMEOUT, f"stream silent for {wait:g} s before content"
                ) from None
            except (aiohttp.ClientError, OSError) as e:
                answer.close()
                raise AttemptFailed(
                    name, Kind.CLOSED, f"stream broke before content: {type(e).__name__}"
                ) from None
            if not chunk:
                answer.close()
                raise AttemptFailed(name, Kind.CLOSED, "stream ended before content")
            held_bytes += len(chunk)
            started = False
            try:
                chunk = answer.take(chunk)
            except StreamBroken as e:
                answer.close()
                raise AttemptFailed(name, Kind.MALFORMED, str(e)) from None
            answer.held.append(chunk)
            events = answer.observe(chunk)
            for event in events:
                if event.name == "error" and not started:
                    answer.close()
                    status = sse.error_status(event)
                    raise AttemptFailed(
                        name,
                        Kind.SSE_ERROR,
                        f"stream error event before content ({status})",
                        status=status,
                    )
                started = started or not sse.is_preamble(event)
            if started or answer.events is None:
                return
