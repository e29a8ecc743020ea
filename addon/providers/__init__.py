"""The platforms behind the endpoints: how a request reaches each, and how its answer comes back.

A provider is a few small steps on one interface, `Provider`: which requests it takes
(`declines`), how a request is addressed and shaped (`outgoing`) and signed
(`authenticate`), how a successful answer becomes Anthropic's bytes (`reply`), and how a
failed one is read (`error`). Anthropic's own API is the first provider: its requests go
as they came and its answers come back untouched. Everything above this package
(failover, the preamble hold, resume, usage, mitmweb's view) sees Anthropic requests and
events only, whichever platform answered. A platform's module is imported only when an
endpoint names it, so that its libraries cost nothing otherwise.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ..config import OAUTH_BETA, PROVIDER_EXTRAS, ConfigError, Endpoint, mask_secret
from ..policy import retry_after_seconds

if TYPE_CHECKING:
    from ..upstream import ClientRequest

# provider name -> its module in this package; `anthropic` is `Provider` itself
MODULES = {"bedrock": "bedrock", "bedrock-mantle": "bedrock", "vertex": "vertex", "openai": "openai"}
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


class Untranslatable(Exception):
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
    """Anthropic's API itself: the client's request as it came, the answer as it comes."""

    name = "anthropic"
    reads_errors = False  # whether `error` reads every answer >= 400, not only those of `retry.statuses`

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    @property
    def own_credentials(self) -> bool:
        """Whether the endpoint gets credentials the proxy chose (from the config or the
        environment) rather than the client's own: a 401 or 403 is then the endpoint's failure.
        Here, when the endpoint has a key; without one, the client's goes."""
        return bool(self.endpoint.api_key)

    def declines(self, request: ClientRequest) -> str | None:
        """Why this endpoint cannot take `request` at all (it is skipped); None when it can."""
        return None

    def outgoing(self, request: ClientRequest) -> Outgoing:
        return Outgoing(
            request.method,
            self.endpoint.base_url + request.path,
            anthropic_headers(self.endpoint, request),
            anthropic_body(self.endpoint, request),
        )

    async def authenticate(self, outgoing: Outgoing) -> Outgoing:
        return outgoing

    def reply(self, headers: Headers, request: ClientRequest) -> Reply:
        return Reply(headers)

    def error(self, status: int, headers: Headers, body: bytes) -> PlatformError:
        """An error answer as the client would get it; Anthropic's pass as they are."""
        return PlatformError(status, headers, body, retry_after=retry_after(headers))

    async def prepare(self) -> str:
        """Finds the endpoint's credentials ahead of the first request; says what it found.
        Raises CredentialsError when there are none to use."""
        return mask_secret(self.endpoint.api_key) if self.endpoint.api_key else "client key passed through"


def json_object(request: ClientRequest) -> dict[str, Any]:
    """The request's body, for a platform that must rewrite it; refused when it is not a JSON object."""
    if request.payload is None:
        raise Untranslatable("The request body is not a JSON object.")
    return request.payload


def for_endpoint(endpoint: Endpoint) -> Provider:
    if (module := MODULES.get(endpoint.provider)) is None:
        return Provider(endpoint)
    try:
        platform = importlib.import_module(f".{module}", __package__)
    except ImportError as e:  # the platform's extra is missing, or one of its libraries lacks its own
        if (extra := PROVIDER_EXTRAS.get(endpoint.provider)) is None:
            raise
        cause = e.__cause__ if isinstance(e.__cause__, ImportError) else e
        missing = f"no module {cause.name!r}" if cause.name else str(cause).splitlines()[0]
        install = f"pip install 'claude-code-fallback[{extra[0]}]'"
        raise ConfigError(
            f"endpoint {endpoint.name}: {endpoint.provider} needs the {extra[0]} extra ({missing}); "
            f"install it: {install}"
        ) from e
    return platform.provider(endpoint)  # type: ignore[no-any-return]


# -- Anthropic's request ---------------------------------------------------------------------


def anthropic_headers(endpoint: Endpoint, request: ClientRequest) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones, with the endpoint's auth and extras.

    An endpoint with a key of its own gets the client's betas merged into one
    `anthropic-beta` header, with the OAuth beta added for a subscription token and taken
    out for an API key (a client logged in to a subscription sends it).
    """
    headers = client_headers(request, endpoint, own_auth=bool(endpoint.api_key))
    if endpoint.api_key:
        auth = endpoint.auth
        if auth == "x-api-key":
            headers.append(("x-api-key", endpoint.api_key))
        else:
            headers.append(("authorization", f"Bearer {endpoint.api_key}"))
        betas = [b for b in client_betas(request, endpoint) if b != OAUTH_BETA]
        betas += [OAUTH_BETA] if auth == "oauth" else []
        if betas:
            headers.append(("anthropic-beta", ",".join(betas)))
    headers.extend(
        (n, v) for n, v in endpoint.headers if not (endpoint.api_key and n.lower() == "anthropic-beta")
    )
    return headers


def client_headers(request: ClientRequest, endpoint: Endpoint, own_auth: bool) -> list[tuple[str, str]]:
    """The client's headers that go on: not hop-by-hop ones (nor those its `Connection` names),
    nor those the endpoint sets itself, nor its key and betas when the endpoint has its own auth."""
    connection_tokens = {
        token.strip().lower()
        for name, value in request.headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    skip = NOT_FORWARDED | connection_tokens | {name.lower() for name, _ in endpoint.headers}
    if own_auth:
        skip |= {"x-api-key", "authorization", "anthropic-beta"}
    return [(n, v) for n, v in request.headers if n.lower() not in skip]


def client_betas(request: ClientRequest, endpoint: Endpoint) -> list[str]:
    """Every `anthropic-beta` value of the client and the endpoint's own headers, in order, once each."""
    return list(dict.fromkeys(beta_values((*request.headers, *endpoint.headers))))


def beta_values(headers: tuple[tuple[str, str], ...]) -> list[str]:
    """The betas named in `headers`' `anthropic-beta` values, in order."""
    values = (v for n, v in headers if n.lower() == "anthropic-beta")
    return [b.strip() for value in values for b in value.split(",") if b.strip()]


def anthropic_body(endpoint: Endpoint, request: ClientRequest) -> bytes:
    """The body byte for byte, unless the endpoint maps the model to a name of its own, or
    the history holds thinking that no Claude signed."""
    payload = request.payload
    if payload is None:
        return request.body
    changes: dict[str, Any] = {}
    if endpoint.models and request.model and (mapped := endpoint.map_model(request.model)) != request.model:
        changes["model"] = mapped
    if UNSIGNED in request.body and isinstance(payload.get("messages"), list):
        changes["messages"] = [signed_only(m) for m in payload["messages"]]
    return compact_json({**payload, **changes}) if changes else request.body


UNSIGNED = b'"signature":""'  # as an OpenAI-format endpoint's reasoning comes back


def signed_only(message: Any) -> Any:
    """A turn without thinking blocks that carry no signature: Claude refuses those, and a
    session that an OpenAI-format endpoint answered has them."""
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return message
    content = message.get("content")
    if not isinstance(content, list):
        return message
    kept = [
        b
        for b in content
        if not (isinstance(b, dict) and b.get("type") == "thinking" and not b.get("signature"))
    ]
    return {**message, "content": kept} if len(kept) != len(content) else message


def compact_json(document: object) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


# -- shared by the platforms -----------------------------------------------------------------


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
