"""Models behind OpenAI's Chat Completions API: the last line of defence when no Claude answers.

`POST {baseUrl}/chat/completions` (OpenRouter, OpenAI, Gemini's and DeepSeek's compatible
APIs, Ollama, vLLM, LM Studio, llama.cpp). The request is translated by
`chat_completions.chat_request`, the answer back by its `StreamTranslator` (as chunks
arrive) or `anthropic_message`, and errors by `anthropic_error`, so everything above
this module sees Anthropic events as from any endpoint. Token counting has no OpenAI
form: such a request skips the endpoint. The client's own key never goes here: the
endpoint's `apiKey`, if any, is sent as a bearer token.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from .. import sse
from ..config import Endpoint
from . import (
    MESSAGES,
    Headers,
    Outgoing,
    PlatformError,
    Provider,
    Reply,
    chat_completions,
    compact_json,
    header_value,
    json_headers,
    json_object,
    posted_to,
    retry_after,
)

if TYPE_CHECKING:
    from ..request import ClientRequest

RESET = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?")


class OpenAI(Provider):
    """An OpenAI-format endpoint (Chat Completions): requests translated there and answers back
    (chat_completions.py)."""

    name = "openai"
    reads_errors = True

    @property
    def own_credentials(self) -> bool:
        return True  # its apiKey or none: the client's never goes here

    def declines(self, request: ClientRequest) -> str | None:
        return None if posted_to(request, MESSAGES) else "Chat Completions serves Messages only"

    def outgoing(self, request: ClientRequest) -> Outgoing:
        document = json_object(request)
        model = self.endpoint.map_model(request.model or "")
        body = chat_completions.chat_request(
            document, model, streaming=request.streaming, max_tokens_field=self.endpoint.max_tokens_field
        )
        headers = [
            ("content-type", "application/json"),
            ("accept", "text/event-stream" if request.streaming else "application/json"),
            ("accept-encoding", "identity"),  # the answer is read and rewritten here, so plain
            *self.endpoint.headers,
        ]
        if self.endpoint.api_key:
            headers.append(("authorization", f"Bearer {self.endpoint.api_key}"))
        return Outgoing("POST", f"{self.endpoint.base_url}/chat/completions", headers, compact_json(body))

    def reply(self, headers: Headers, request: ClientRequest) -> Reply:
        model = request.model or ""
        names = chat_completions.long_tool_names(request.payload or {})
        encoding = header_value(headers, b"content-encoding")
        if request.streaming:
            sse_headers = (*json_headers(headers, b"text/event-stream"), (b"cache-control", b"no-cache"))
            return Reply(sse_headers, _Decoded(chat_completions.StreamTranslator(model, names), encoding))
        return Reply(json_headers(headers), _Decoded(WholeAnswer(model, names), encoding))

    def error(self, status: int, headers: Headers, body: bytes) -> PlatformError:
        wait = retry_after(headers)
        if status == 429 and wait is None:
            wait = reset_seconds(headers)
        return PlatformError(
            status, json_headers(headers), chat_completions.anthropic_error(status, body), None, wait
        )

    async def prepare(self) -> str:
        return "API key, sent as a bearer token" if self.endpoint.api_key else "no key (none sent)"


def provider(endpoint: Endpoint) -> Provider:
    return OpenAI(endpoint)


class WholeAnswer:
    """A non-streamed Chat Completions answer, read whole and made an Anthropic Message."""

    def __init__(self, model: str, names: dict[str, str]) -> None:
        self.model, self.names = model, names
        self.body = bytearray()

    def feed(self, data: bytes) -> bytes:
        self.body += data
        return b""

    def end(self) -> bytes:
        return compact_json(chat_completions.anthropic_message(json.loads(self.body), self.model, self.names))


class _Decoded:
    """A translator fed the body as the server encoded it: undone first, when compressed."""

    def __init__(
        self, translator: chat_completions.StreamTranslator | WholeAnswer, encoding: str | None
    ) -> None:
        self.translator = translator
        self.decode = sse.decoder_for(encoding) or (lambda data: data)  # unknown: read as it is

    def feed(self, data: bytes) -> bytes:
        return self.translator.feed(self.decode(data))

    def end(self) -> bytes:
        return self.translator.end()


def reset_seconds(headers: Headers) -> float | None:
    """The longest of OpenAI's `x-ratelimit-reset-requests` / `-tokens` (`1s`, `6m0s`, `20ms`)."""
    waits = []
    for key, value in headers:
        if key.lower() in (b"x-ratelimit-reset-requests", b"x-ratelimit-reset-tokens"):
            match = RESET.fullmatch(value.decode("latin-1").strip())
            if match and any(match.groups()):
                h, m, s, milli = (float(g or 0) for g in match.groups())
                waits.append(h * 3600 + m * 60 + s + milli / 1000)
    return max(waits, default=None)
