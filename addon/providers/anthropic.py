"""Anthropic's API, or any API that speaks it: the client's request goes as it came.

The endpoint's key, when it has one, replaces the client's (as `x-api-key`, as a bearer
token, or as a subscription's OAuth token with its beta); without one, the client's own
credentials pass through. The body goes byte for byte unless the endpoint maps the model
or the history holds thinking that no Claude signed, and the answer comes back untouched.
Bedrock Mantle and the clouds' shaping (cloud.py) reuse the header and history helpers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import Endpoint, mask_secret
from ..platforms import OAUTH_BETA
from . import NOT_FORWARDED, Outgoing, Provider, compact_json

if TYPE_CHECKING:
    from ..request import ClientRequest


class AnthropicProvider(Provider):
    """Anthropic's API itself: the client's request as it came, the answer as it comes."""

    name = "anthropic"

    @property
    def own_credentials(self) -> bool:
        """When the endpoint has a key; without one, the client's goes."""
        return bool(self.endpoint.api_key)

    def outgoing(self, request: ClientRequest) -> Outgoing:
        return Outgoing(
            request.method,
            self.endpoint.base_url + request.path,
            anthropic_headers(self.endpoint, request),
            anthropic_body(self.endpoint, request),
        )

    async def prepare(self) -> str:
        return mask_secret(self.endpoint.api_key) if self.endpoint.api_key else "client key passed through"


def provider(endpoint: Endpoint) -> Provider:
    return AnthropicProvider(endpoint)


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
