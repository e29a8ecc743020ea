"""The platforms behind the endpoints: how a request reaches each, and how its answer comes back.

A provider is a few small steps on one interface, `Provider`: which requests it takes
(`declines`), how a request is addressed and shaped (`outgoing`) and signed
(`authenticate`), how a successful answer becomes Anthropic's bytes (`reply`), and how a
failed one is read (`error`). Each platform is a module of this package (`anthropic`,
`bedrock`, `vertex`, `openai`) and an entry of `platforms.PLATFORMS`, which says what the
configuration knows of it. Everything above this package (failover, the preamble hold,
resume, usage, mitmweb's view) sees Anthropic requests and events only, whichever platform
answered. A platform's module is imported only when an endpoint names it, so that its
libraries cost nothing otherwise. This module holds the interface and what the platforms
share.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .. import config
from ..platforms import PLATFORMS
from ..request import retry_after_seconds

if TYPE_CHECKING:
    from ..config import Endpoint
    from ..request import ClientRequest

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length"}

Headers = tuple[tuple[bytes, bytes], ...]
T = TypeVar("T")


class Translator(Protocol):
    """Turns a platform's answer body into Anthropic's, as it arrives."""

    def feed(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


@dataclass(frozen=True)
class Outgoing:
    """One request as it goes to the platform."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Reply:
    """How a successful answer reaches the client: its headers, and the translation of its body
    (None: the bytes pass as they came)."""

    headers: Headers
    translator: Translator | None = None


@dataclass(frozen=True)
class PlatformError:
    """A platform's error answer, Anthropic-shaped with its status kept.

    `recoverable` None leaves the verdict to `retry.statuses`, as for Anthropic's own errors.
    """

    status: int
    headers: Headers
    body: bytes
    recoverable: bool | None = None
    retry_after: float | None = None
    credentials: bool = False  # the platform says that it refused the credentials, whatever the status


class CredentialsError(Exception):
    """No usable credentials for an endpoint; the message says what was looked for."""


class Untranslatable(ValueError):
    """The client's request has no form on this platform; the message is for the client."""


class InThread(Generic[T]):
    """Blocking work (finding credentials, refreshing a token) run in a thread, one run at a
    time: a caller that comes while it runs waits for that run's result, and a failed run
    is tried again by the next caller."""

    def __init__(self, work: Callable[[], T]) -> None:
        self.work = work
        self.running: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self.running is None or self.running.done():
            self.running = asyncio.ensure_future(asyncio.to_thread(self.work))
        return await asyncio.shield(self.running)


class Provider:
    """One endpoint's platform, as the proxy asks it: each step below, in a request's order.

    A platform that speaks Anthropic's API over its own transport overrides `outgoing`,
    `authenticate` and `prepare`; one that speaks another format overrides `reply` and
    `error` as well, so that the client gets Anthropic's bytes either way.
    """

    name = ""  # an endpoint's `provider`
    reads_errors = False  # whether `error` reads every answer >= 400, not only those of `retry.statuses`

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    @property
    def own_credentials(self) -> bool:
        """Whether the endpoint gets credentials the proxy chose (from the config or the
        environment) rather than the client's own: a 401 or 403 is then the endpoint's failure."""
        raise NotImplementedError

    def declines(self, request: ClientRequest) -> str | None:
        """Why this endpoint cannot take `request` at all (it is skipped); None when it can."""
        return None

    def outgoing(self, request: ClientRequest) -> Outgoing:
        """The request as the platform takes it, not yet signed; raises Untranslatable when
        it has no form there."""
        raise NotImplementedError

    async def authenticate(self, outgoing: Outgoing) -> Outgoing:
        """The request signed, or given the platform's credentials; raises CredentialsError."""
        return outgoing

    def reply(self, headers: Headers, request: ClientRequest) -> Reply:
        """How a successful answer reaches the client; by default as it came."""
        return Reply(headers)

    def error(self, status: int, headers: Headers, body: bytes) -> PlatformError:
        """An error answer as the client would get it; Anthropic's pass as they are."""
        return PlatformError(status, headers, body, retry_after=retry_after(headers))

    async def prepare(self) -> str:
        """Finds the endpoint's credentials ahead of the first request; says what it found.
        Raises CredentialsError when there are none to use."""
        raise NotImplementedError


def for_endpoint(endpoint: Endpoint) -> Provider:
    """The endpoint's provider; its platform's module is imported the first time one is named."""
    platform = PLATFORMS[endpoint.provider]
    try:
        module = importlib.import_module(f".{platform.module}", __package__)
    except ImportError as e:  # the platform's extra is missing, or one of its libraries lacks its own
        if platform.extra is None:
            raise
        cause = e.__cause__ if isinstance(e.__cause__, ImportError) else e
        missing = f"no module {cause.name!r}" if cause.name else str(cause).splitlines()[0]
        raise config.ConfigError(
            f"endpoint {endpoint.name}: {endpoint.provider} needs the {platform.extra[0]} extra ({missing}); "
            f"install it: {platform.install}"
        ) from e
    return module.provider(endpoint)  # type: ignore[no-any-return]


# -- shared by the platforms -----------------------------------------------------------------


def json_object(request: ClientRequest) -> dict[str, Any]:
    """The request's body, for a platform that must rewrite it; refused when it is not a JSON object."""
    if request.payload is None:
        raise Untranslatable("The request body is not a JSON object.")
    return request.payload


def compact_json(document: object) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def is_anthropic_error(body: bytes) -> bool:
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("type") == "error" and "error" in document


def json_headers(headers: Headers, content_type: bytes = b"application/json") -> Headers:
    """A platform's headers for a body the proxy rewrote: its own type, no length or encoding."""
    dropped = (b"content-type", b"content-length", b"content-encoding")
    kept = tuple((k, v) for k, v in headers if k.lower() not in dropped)
    return ((b"content-type", content_type), *kept)


def retry_after(headers: Headers) -> float | None:
    return retry_after_seconds({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers})


def header_value(headers: Headers, name: bytes) -> str | None:
    """The first value of header `name` (lower case), decoded; None when absent."""
    return next((v.decode("latin-1") for k, v in headers if k.lower() == name), None)


def content_type(headers: Headers) -> str:
    """The media type alone, lower case: `text/event-stream` of `text/event-stream; charset=utf-8`."""
    return (header_value(headers, b"content-type") or "").split(";", 1)[0].strip().lower()


MESSAGES = frozenset({"/v1/messages"})


def posted_to(request: ClientRequest, paths: frozenset[str]) -> bool:
    """Whether `request` is a POST to one of `paths`, whatever its query (`?beta=true`)."""
    return request.method == "POST" and request.path.split("?", 1)[0] in paths
