"""`server.maxBodyBytes`: a request body past it gets a 413, and is never held whole.

mitmproxy reads a request's body before the `request` hook, and streams it to the flow's
server once it outgrows `stream_large_bodies`. So a request whose body is, or may grow,
too large is pointed at the bridge's refusal while its headers are in: streamed there, a
body past the limit is read and dropped, and the client gets the 413 on a connection
left intact. A body whose size was not announced and stays within the limit is kept as
usual, and `unguard` puts its destination back before the request is served.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import ctx, http

from ..config import Server
from ..request import Failure, error_failure
from .bridge import TOKEN_HEADER, Bridge, Parked, Whole

GUARD_KEY = "claude-code-fallback-guarded"  # where a guarded request was going, to put back


class BodyLimit:
    """Refuses a request body over `server.maxBodyBytes` with Anthropic's 413 without keeping it:
    past the limit mitmproxy streams it to the bridge, which reads and drops it."""

    def __init__(self, bridge: Bridge, refused: Callable[[], None]) -> None:
        self.bridge = bridge
        self.refused = refused  # called for each body refused at the bridge
        self.limit = Server().max_body_bytes  # the config's, once applied
        self.token = bridge.stand(self.refusal)

    def stream_past_limit(self) -> None:
        """mitmproxy streams a body past the limit instead of keeping it (see `guard`)."""
        ctx.options.update(stream_large_bodies=str(self.limit))

    def exceeded(self, body: bytes) -> bool:
        return len(body) > self.limit

    def failure(self) -> Failure:
        return error_failure(
            413,
            "request_too_large",
            f"Request body exceeds the proxy's limit of {self.limit} bytes (server.maxBodyBytes).",
        )

    def guard(self, flow: http.HTTPFlow) -> None:
        """At the request's headers: aims a body that is, or may grow, too large at the refusal."""
        request = flow.request
        length = request.headers.get("content-length")
        too_large = length is not None and length.isdigit() and int(length) > self.limit
        if not too_large and length is not None:
            return
        flow.metadata[GUARD_KEY] = (request.url, request.headers.copy())
        request.scheme, request.host, request.port = "http", "127.0.0.1", self.bridge.port
        request.headers[TOKEN_HEADER] = self.token
        if too_large:
            request.stream = True

    def unguard(self, flow: http.HTTPFlow) -> None:
        if guarded := flow.metadata.pop(GUARD_KEY, None):
            flow.request.url, flow.request.headers = guarded

    def refusal(self) -> Parked:
        failure = self.failure()
        headers = (*failure.headers, (b"content-length", str(len(failure.body)).encode()))
        return Parked(Whole(failure.status, headers, failure.body), self.refused_at_bridge)

    def refused_at_bridge(self, error: BaseException | None) -> None:
        if error is None:
            self.refused()
