"""The values every layer passes around: the client's request, and why an attempt failed.

An attempt that another endpoint may do better becomes one `AttemptFailed` with a `kind`
from one fixed set (`Kind`); a stream that breaks after its first byte, a `StreamBroken`;
what the client gets when nothing was worth relaying, a `Failure`. The plan, the metrics
and the logs all read these. A request carries its trace (`tracing`), which each layer tells
what it did. Nothing here imports another module of the proxy but `sse` and `tracing`.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from . import sse
from .tracing import NO_TRACE, Trace


@dataclass(frozen=True)
class ClientRequest:
    """The client's request as the proxy received it, decoded once."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    streaming: bool
    model: str | None
    payload: dict[str, Any] | None
    trace: Trace = field(default=NO_TRACE, compare=False, repr=False)  # told what each layer did

    @classmethod
    def parse(
        cls,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        trace: Trace = NO_TRACE,
    ) -> ClientRequest:
        payload = None
        content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
        if body and "json" in content_type.lower():
            try:
                decoded = json.loads(body)
            except ValueError:
                decoded = None  # not JSON: the endpoint decides what to make of it
            payload = decoded if isinstance(decoded, dict) else None
        model = payload.get("model") if payload else None
        return cls(
            method=method,
            path=path,
            headers=tuple(headers),
            body=body,
            streaming=bool(payload and payload.get("stream") is True),
            model=model if isinstance(model, str) else None,
            payload=payload,
            trace=trace,
        )


class StreamBroken(Exception):
    """The upstream failed after the response was committed to the client."""

    def __init__(self, reason: Kind, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Kind(StrEnum):
    """Why an attempt failed or a stream broke: one fixed set, read by the plan, the metrics
    (their `outcome` and `reason` labels) and the logs."""

    STATUS = "status"  # an error status that fails over (`retry.statuses`)
    REFUSED = "refused"  # connection refused
    RESET = "reset"
    DNS = "dns"
    TLS = "tls"
    CONNECT_TIMEOUT = "connect_timeout"
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    CLOSED = "closed"  # closed before the response headers, or a stream before its content
    MALFORMED = "malformed"
    SSE_ERROR = "sse_error"  # an `error` event
    IDLE_TIMEOUT = "idle_timeout"  # a stream silent past `timeouts.idle`
    UPSTREAM_CUT = "upstream_cut"  # a stream that ended without its end
    WINDOW_REJECTED = "window_rejected"  # a subscription's usage window refused the request
    CREDENTIALS = "credentials"  # none to use, or the endpoint refused the proxy's own
    UNTRANSLATABLE = "untranslatable"  # the request has no form on the endpoint's platform


TIMEOUT_KINDS = frozenset({Kind.CONNECT_TIMEOUT, Kind.FIRST_BYTE_TIMEOUT, Kind.IDLE_TIMEOUT})


@dataclass(frozen=True)
class ErrorResponse:
    """An upstream error response kept whole, to hand to the client when nothing better exists."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class AttemptFailed(Exception):
    """One attempt at one endpoint failed in a way another attempt may fix.

    `kind` says why (for refused credentials, `status` is the refusal's). `cool_until`,
    when the endpoint said when it reopens, is how long it cools, whatever
    `cooldownSeconds` says. A `final` failure will not change on another attempt: the
    request does not come back to that endpoint.
    """

    def __init__(
        self,
        endpoint: str,
        kind: Kind,
        detail: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        response: ErrorResponse | None = None,
        cool_until: float | None = None,
        final: bool = False,
    ) -> None:
        super().__init__(f"{endpoint}: {detail}")
        self.endpoint = endpoint
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retry_after = retry_after
        self.response = response
        self.cool_until = cool_until
        self.final = final

    @property
    def cools(self) -> bool:
        """Whether the endpoint is to blame: a request it cannot express is not its failure."""
        return self.kind != Kind.UNTRANSLATABLE

    @property
    def refused_credentials(self) -> bool:
        """The endpoint answered 401 or 403 to credentials the proxy chose (not: it found none)."""
        return self.kind == Kind.CREDENTIALS and self.status is not None


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """`retry-after-ms`, else `retry-after` in seconds or as an HTTP-date; None when absent."""
    if ms := headers.get("retry-after-ms"):
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class Failure:
    """What the client gets when no endpoint gave a usable answer."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    reason: str


def error_failure(status: int, error_type: str, message: str) -> Failure:
    """A failure the proxy words itself, in Anthropic's error shape."""
    return Failure(
        status, ((b"content-type", b"application/json"),), sse.error_body(error_type, message), message
    )
