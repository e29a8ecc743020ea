"""The proxy's own answers to what Claude Code asks of any gateway and no endpoint answers.

Claude Code probes its gateway with `HEAD /api/hello`, best effort. The probe asks
about the proxy, not an endpoint, so it is answered here at once: sent upstream, it would
wait on a slow or failing endpoint, or fail over. Model listing (`GET /v1/models`, which
Claude Code waits 3 s for) and token counting go to the first endpoint that serves them.
When every endpoint declines (the runtimes of the clouds and Chat Completions serve
Messages only), the answer is the proxy's: the models its endpoints' `models` maps name,
in Anthropic's list shape (a platform's own ids are not names a client may send), or for
token counting the `501 not_supported` that Claude Code's gateway protocol asks for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from mitmproxy import http

from .. import sse
from ..config import Endpoint

if TYPE_CHECKING:
    from ..request import ClientRequest

HELLO = "/api/hello"
MODELS = "/v1/models"
COUNT_TOKENS = "/v1/messages/count_tokens"
CREATED = "1970-01-01T00:00:00Z"  # a model's `created_at`: the config does not say
JSON_TYPE = (b"content-type", b"application/json")
NO_RETRY = (b"x-should-retry", b"false")  # the SDKs retry a 5xx; this one will not change


class Answer(NamedTuple):
    """A whole answer: status, headers, body, and a line that says what it is."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    reason: str


def hello(flow: http.HTTPFlow) -> bool:
    """Answers Claude Code's `HEAD /api/hello` probe; False for anything else."""
    request = flow.request
    if request.method != "HEAD" or request.path.split("?", 1)[0] != HELLO:
        return False
    flow.response = http.Response.make(200)
    return True


def unserved(request: ClientRequest, declined: dict[str, str], endpoints: Iterable[Endpoint]) -> Answer:
    """The answer to a request that every endpoint declines (`declined`: endpoint → why)."""
    path = request.path.split("?", 1)[0]
    reasons = "; ".join(f"{name}: {why}" for name, why in declined.items())
    if request.method == "GET" and path == MODELS:
        body = model_list(endpoints)
        return Answer(200, (JSON_TYPE,), body, "models named by the endpoints' `models` maps")
    if request.method == "POST" and path == COUNT_TOKENS:
        message = f"No endpoint counts tokens: {reasons}"
        return Answer(501, (JSON_TYPE, NO_RETRY), sse.error_body("not_supported", message), message)
    message = f"No endpoint serves this request: {reasons}"
    return Answer(404, (JSON_TYPE,), sse.error_body("not_found_error", message), message)


def model_list(endpoints: Iterable[Endpoint]) -> bytes:
    """Anthropic's model list of the client names the endpoints' `models` maps take, in config order."""
    ids = list(dict.fromkeys(name for e in endpoints for name, _ in e.models if name != "*"))
    models = [{"type": "model", "id": i, "display_name": i, "created_at": CREATED} for i in ids]
    document = {
        "data": models,
        "has_more": False,
        "first_id": ids[0] if ids else None,
        "last_id": ids[-1] if ids else None,
    }
    return json.dumps(document).encode()
