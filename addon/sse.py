"""Server-sent events, read as events rather than chunks.

The proxy never re-frames a stream: the client gets the upstream's bytes as they came.
What it reads here is a decoded copy, to know whether content has started, whether the
stream carried an error, and what the usage fields say (with the model that answered and why
it stopped, which a trace shows).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

Decoder = Callable[[bytes], bytes]


class Event(NamedTuple):
    """One server-sent event: its name and its data."""

    name: str
    data: str

    def json(self) -> Any:
        try:
            return json.loads(self.data)
        except ValueError:
            return None


class EventReader:
    """Splits a byte stream into complete SSE events, whatever the chunking."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes, only: tuple[bytes, ...] = ()) -> list[Event]:
        """The events completed by `data`; with `only`, just those whose text holds one of these."""
        blocks, self._buffer = split_blocks(self._buffer, data)
        if only:
            blocks = [block for block in blocks if any(word in block for word in only)]
        return [event for block in blocks if (event := parse_event(block)) is not None]


def split_blocks(pending: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """The event blocks that `data` completes after `pending`, and what is still unfinished.

    CRLF line ends become LF, also where a chunk ends between the CR and the LF.
    """
    buffer = pending + data if pending else data
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n")
    if b"\n\n" not in buffer:
        return [], buffer
    *blocks, rest = buffer.split(b"\n\n")
    return blocks, rest


def parse_event(block: bytes) -> Event | None:
    name = "message"
    data: list[str] = []
    for raw in block.decode("utf-8", "replace").split("\n"):
        field, _, value = raw.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    if not data and name == "message":
        return None
    return Event(name, "\n".join(data))


def is_preamble(event: Event) -> bool:
    """True for the events an Anthropic stream sends before any content.

    `message_start`, `ping`, and a `content_block_start` of an empty text or thinking
    block carry nothing the user reads; a `tool_use` block start does.
    """
    if event.name in ("message_start", "ping"):
        return True
    if event.name != "content_block_start":
        return False
    block = (event.json() or {}).get("content_block") or {}
    return block.get("type") in ("text", "thinking") and not (block.get("text") or block.get("thinking"))


ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


# Anthropic's error type for an HTTP status: what a platform's or a server's error becomes.
STATUS_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    if status in STATUS_ERRORS:
        return STATUS_ERRORS[status]
    return "api_error" if status >= 500 or status < 400 else "invalid_request_error"


def error_body(error_type: str, message: str) -> bytes:
    """Anthropic's error body: `{"type": "error", "error": {"type": ..., "message": ...}}`."""
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message}}).encode()


def error_status(event: Event) -> int:
    """The HTTP status an in-stream `error` event stands for (529 when unknown)."""
    error = (event.json() or {}).get("error") or {}
    return ERROR_STATUS.get(str(error.get("type")), 529)


class Usage(NamedTuple):
    """The token counts of an answer's `usage`; cache writes also split by how long they last."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_creation: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0


USAGE_EVENTS = (b"message_start", b"message_delta")  # the events `usage_of` reads


class Note(NamedTuple):
    """What an answer says of itself beside its content: its usage, and, where the event or
    body carries them, the model that answered and why it stopped (`stop_reason`)."""

    usage: Usage
    model: str | None = None
    stop_reason: str | None = None


def usage_of(event: Event) -> Usage | None:
    """Token usage from `message_start` (input side) or `message_delta` (output side)."""
    note = note_of(event)
    return note.usage if note is not None else None


def note_of(event: Event) -> Note | None:
    """The usage of `message_start` with its model, or of `message_delta` with its stop reason."""
    if event.name == "message_start":
        data = event.json()
        message = data.get("message") if isinstance(data, dict) else None
        if not isinstance(message, dict):
            return None
        return _note(message.get("usage"), message.get("model"), None)
    if event.name == "message_delta":
        data = event.json()
        if not isinstance(data, dict):
            return None
        delta = data.get("delta")
        return _note(data.get("usage"), None, delta.get("stop_reason") if isinstance(delta, dict) else None)
    return None


def message_usage(body: bytes) -> Usage | None:
    """Token usage of a whole (not streamed) message, as its JSON body says."""
    note = message_note(body)
    return note.usage if note is not None else None


def message_note(body: bytes) -> Note | None:
    """The usage of a whole (not streamed) message, its model and stop reason."""
    if b'"usage"' not in body:
        return None
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    return _note(message.get("usage"), message.get("model"), message.get("stop_reason"))


def _note(usage: Any, model: Any, stop_reason: Any) -> Note | None:
    if not isinstance(usage, dict):
        return None
    return Note(
        usage_from(usage),
        model if isinstance(model, str) else None,
        stop_reason if isinstance(stop_reason, str) else None,
    )


def usage_from(usage: dict[str, Any]) -> Usage:
    """A `usage` object's counts. Cache writes are split by `cache_creation`'s
    `ephemeral_5m_input_tokens` and `ephemeral_1h_input_tokens`; writes it does not account
    for (all of them, when an endpoint sends no split) count as 5-minute writes."""
    created = int_or_zero(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    five = hour = 0
    if isinstance(split, dict):
        five = int_or_zero(split.get("ephemeral_5m_input_tokens"))
        hour = int_or_zero(split.get("ephemeral_1h_input_tokens"))
    five += max(created - five - hour, 0)
    return Usage(
        input=int_or_zero(usage.get("input_tokens")),
        output=int_or_zero(usage.get("output_tokens")),
        cache_read=int_or_zero(usage.get("cache_read_input_tokens")),
        cache_creation=five + hour,
        cache_write_5m=five,
        cache_write_1h=hour,
    )


def combined(usages: list[Usage]) -> Usage:
    """One answer's usage from its events: `message_start` carries the input and cache
    counts, the last `message_delta` the output so far; each count only grows."""
    if len(usages) == 1:
        return usages[0]
    return Usage(*(max(counts) for counts in zip(*usages, strict=True)))


def int_or_zero(value: object) -> int:
    """A count from JSON: an int as it is, anything else (null, a string, a bool) 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """An incremental decoder for a compressed stream, identity when there is nothing to undo.

    Returns None for an encoding we cannot read; the stream is then passed on unread.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return lambda data: data
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    if encoding == "deflate":
        return zlib.decompressobj().decompress
    if encoding == "br":
        import brotli  # a mitmproxy dependency

        return brotli.Decompressor().process
    if encoding == "zstd":
        import zstandard  # a mitmproxy dependency

        return zstandard.ZstdDecompressor().decompressobj().decompress
    return None
