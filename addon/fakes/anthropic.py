"""A fake Anthropic Messages API on loopback that can misbehave on demand.

Tests, the demo and the benchmark point the proxy at one or more `FakeAnthropic`
servers. The server under it, `fakes.server.FakeServer`, reads requests with h11 and
records them (`requests`), and runs in its own daemon thread (`start_in_thread`) for
synchronous tests or inside a running loop (`start`). Responses are written as raw
bytes so a `Behavior` can break HTTP on purpose: error statuses with the real error
bodies, SSE streams that carry an error, stop, stall or get cut, connections that hang
or close, garbage, bad chunking, truncated gzip and oversized headers. Each server also
records when a client went away mid-answer (`disconnects`), and
`python -m claude_code_fallback.fakes.anthropic` runs one in the foreground. Routes match on the
path suffix, so a base URL with a provider prefix (`<url>/api/anthropic`) works too.
With an `account` set it plays a Claude subscription: each Messages request uses up its
usage windows, answers carry the `anthropic-ratelimit-unified-*` headers, and a spent
window means a 429, or a 200 billed as overage when the account allows it. With a
`prompt_cache` (`fakes.caching.PromptCache`) it plays the API's prompt cache: answers report
the cache reads and writes of each prompt in their `usage`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import math
import re
import select
import socket
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from .caching import PromptCache, with_usage
from .server import (
    EVENT_STREAM,
    JSON,
    LAST_CHUNK,
    READ_SIZE,
    Exchange,
    FakeServer,
    SeenRequest,
    chunk,
    reason,
    response_head,
    serve_in_foreground,
)

KINDS = frozenset(
    {
        "ok",
        "status",
        "sse_error_first",
        "sse_error_after_preamble",
        "sse_error_after",
        "cut",
        "close_mid_stream",
        "stall",
        "hang",
        "close",
        "garbage",
        "bad_chunked",
        "truncated_gzip",
        "short_body",
        "huge_headers",
        "large",
    }
)
"""Every `Behavior.kind` the server understands."""

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
"""Anthropic error `type` per HTTP status; any other status is an `api_error`."""

_ERROR_MESSAGES = {
    400: "Invalid request (fake).",
    401: "invalid x-api-key",
    403: "Your API key does not have permission to use the specified resource.",
    404: "Not found (fake).",
    413: "Request exceeds the maximum allowed number of bytes.",
    429: "Number of request tokens has exceeded your rate limit (fake).",
    500: "Internal server error",
    529: "Overloaded",
}

_USAGE = '{"input_tokens":10,"output_tokens":%d,"cache_creation_input_tokens":0,"cache_read_input_tokens":0}'
_MESSAGE = (
    '{"id":"%s","type":"message","role":"assistant","model":%s,'
    '"content":[{"type":"text","text":%s}],"stop_reason":"end_turn","stop_sequence":null,'
    '"usage":' + _USAGE + "}"
)
_MESSAGE_START = (
    'event: message_start\ndata: {"type":"message_start","message":{"id":"%s","type":"message",'
    '"role":"assistant","model":%s,"content":[],"stop_reason":null,"stop_sequence":null,'
    '"usage":' + (_USAGE % 1) + "}}\n\n"
)
_BLOCK_START = (
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
)
_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_DELTA = (
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    '"delta":{"type":"text_delta","text":%s}}\n\n'
)
_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_MESSAGE_DELTA = (
    'event: message_delta\ndata: {"type":"message_delta",'
    '"delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":%d}}\n\n'
)
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_SSE_OVERLOADED = (
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
)
_MODELS = json.dumps(
    {
        "data": [
            {
                "type": "model",
                "id": "claude-sonnet-4-6",
                "display_name": "Claude Sonnet 4.6",
                "created_at": "2026-02-17T00:00:00Z",
            },
            {
                "type": "model",
                "id": "claude-haiku-4-5-20251001",
                "display_name": "Claude Haiku 4.5",
                "created_at": "2025-10-01T00:00:00Z",
            },
        ],
        "has_more": False,
        "first_id": "claude-sonnet-4-6",
        "last_id": "claude-haiku-4-5-20251001",
    },
    separators=(",", ":"),
).encode()
_COUNT_TOKENS = b'{"input_tokens":42}'
PREFILL_REFUSED = (
    "This model does not support assistant message prefill. The conversation must end with a user message."
)
_MODEL_VERSION = re.compile(r"claude-(?:opus|sonnet|haiku)-(\d+)(?:-(\d{1,2}))?(?!\d)")
_JSON_PIECE = 7  # characters of a tool call's input per input_json_delta
_HUGE_HEADER = b"x-fake-padding: " + b"a" * (200 * 1024) + b"\r\n"
_GARBAGE = b"NOT-HTTP garbage\r\n\r\n"
_BAD_CHUNK = b"zz\r\nxx\r\n"
_SSE_PIECE = 16 * 1024  # longest text_delta when a padded ("large") text is streamed
_WORDS = re.compile(r"^\s+|\S+\s*")
_WINDOW_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_UNIFIED = "anthropic-ratelimit-unified-"
_CLAIMS = {
    "5h": "five_hour",
    "7d": "seven_day",
    "7d_oi": "seven_day_oi",
    "7d-sonnet": "seven_day_sonnet",
    "7d-opus": "seven_day_opus",
}


@dataclass(frozen=True)
class Behavior:
    """How the server answers one request; `kind` picks the (mis)behaviour.

    `ok` answers like the API (SSE when the body asks for `"stream": true`); `status`
    sends `status` with the matching Anthropic error body; `large` is `ok` padded to
    `body_size` bytes (the JSON body, or the streamed text). The stream kinds
    (`sse_error_first`, `sse_error_after_preamble`, `sse_error_after`, `cut` (a TCP
    reset), `close_mid_stream` (a FIN without the last chunk), `stall`) always answer
    POST .../v1/messages with a 200 SSE stream and leave other routes alone.
    `hang`, `close`, `garbage`, `bad_chunked`, `truncated_gzip` (half a gzip body behind an
    honest content-length), `short_body` (half the body behind the full content-length,
    then close) and `huge_headers` (one 200 KB header line) break HTTP on any route.
    `thinking` puts a signed thinking block before the text, `tool_input` (a JSON object's
    text) a `tool_use` block after it, streamed as the API streams them.
    `cache_read`, `cache_write_5m` and `cache_write_1h` are the prompt-cache tokens an
    answer's `usage` reports (`cache_creation` splits the writes by lifetime).
    `headers` are added to every response that has headers. Frozen, so it can be shared
    between threads and scripts; build a new one to change it.
    """

    kind: str = "ok"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    text: str = "Hello from the fake."
    event_delay: float = 0.0
    after_events: int = 0
    gzip: bool = False
    body_size: int = 0
    delay: float = 0.0
    thinking: str = ""
    tool_input: str = ""
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0

    def __post_init__(self) -> None:
        # Accept any pairs (a list, say) but keep the value hashable for the header cache.
        object.__setattr__(self, "headers", tuple((str(n), str(v)) for n, v in self.headers))
        if self.kind not in KINDS:
            raise ValueError(f"unknown fake behavior kind {self.kind!r}; use one of {sorted(KINDS)}")


@dataclass
class Window:
    """One usage window of a fake subscription account.

    `name` appears in the header names (`5h`, `7d`, `7d-sonnet`, ...). Every Messages
    request the account serves adds `per_request` to `utilization`; once `resets_at`
    (epoch seconds, 0: `length` from construction) has passed, utilization is back to 0
    and `resets_at` moves on by as many `length`s as it takes to be in the future.
    """

    name: str
    utilization: float = 0.0
    per_request: float = 0.01
    length: float = 18000.0
    resets_at: float = 0.0

    def __post_init__(self) -> None:
        if not _WINDOW_NAME.fullmatch(self.name):
            raise ValueError(f"window name {self.name!r} must be letters, digits, '_', '.' or '-'")
        if not (self.length > 0 and self.utilization >= 0 and self.per_request >= 0):
            raise ValueError(f"window {self.name!r}: length must be > 0, utilization and use >= 0")
        if not self.resets_at:
            self.resets_at = time.time() + self.length

    def _roll(self, now: float) -> None:
        if now >= self.resets_at:
            self.utilization = 0.0
            self.resets_at += self.length * (math.floor((now - self.resets_at) / self.length) + 1)

    def _status(self, warning_at: float) -> str:
        if self.utilization >= 1.0:
            return "rejected"
        return "allowed_warning" if self.utilization >= warning_at else "allowed"


class Account:
    """A fake subscription account: usage windows that every Messages request uses up.

    A window at utilization 1.0 or more is rejected: the request gets a 429 with a
    `retry-after` until the window reopens, or, with `overage`, a 200 that reports
    `overage-in-use: true`. Headers describe the account as it was when it admitted the
    request, before that request's use is added. Thread-safe: tests change it while the
    server thread reads it.
    """

    def __init__(self, *windows: Window, overage: bool = False, warning_at: float = 0.8) -> None:
        if not windows:
            raise ValueError("an account needs at least one window")
        self._windows = {w.name: replace(w) for w in windows}
        if len(self._windows) != len(windows):
            raise ValueError(f"duplicate window names in {[w.name for w in windows]}")
        self.overage = overage
        self.warning_at = warning_at
        self._lock = threading.Lock()

    def set(self, name: str, utilization: float | None = None, resets_at: float | None = None) -> None:
        """Change window `name`'s utilization and/or reset time."""
        with self._lock:
            if name not in self._windows:
                raise KeyError(f"no window {name!r}; the account has {list(self._windows)}")
            window = self._windows[name]
            if utilization is not None:
                window.utilization = utilization
            if resets_at is not None:
                window.resets_at = resets_at

    def snapshot(self) -> dict[str, Window]:
        """Copies of the windows, after applying resets."""
        with self._lock:
            now = time.time()
            for window in self._windows.values():
                window._roll(now)
            return {name: replace(w) for name, w in self._windows.items()}

    def admit(self) -> tuple[list[tuple[str, str]], int | None]:
        """Take one Messages request: the unified headers, and a retry-after if it is refused."""
        with self._lock:
            now = time.time()
            windows = list(self._windows.values())
            for window in windows:
                window._roll(now)
            statuses = [w._status(self.warning_at) for w in windows]
            rejected = [w for w, status in zip(windows, statuses, strict=True) if status == "rejected"]
            if rejected:
                binding, status = max(rejected, key=lambda w: w.resets_at), "rejected"
            else:
                binding = max(windows, key=lambda w: w.utilization)
                status = "allowed_warning" if "allowed_warning" in statuses else "allowed"
            # Whole seconds rounded up: waiting until the reset shown finds the window open.
            reset = str(math.ceil(binding.resets_at))
            headers = [
                (_UNIFIED + "status", status),
                (_UNIFIED + "reset", reset),
                (_UNIFIED + "representative-claim", _CLAIMS.get(binding.name, binding.name)),
            ]
            for w, window_status in zip(windows, statuses, strict=True):
                headers += [
                    (f"{_UNIFIED}{w.name}-utilization", str(round(min(w.utilization, 1.0), 4))),
                    (f"{_UNIFIED}{w.name}-reset", str(math.ceil(w.resets_at))),
                    (f"{_UNIFIED}{w.name}-status", window_status),
                ]
            headers += [
                (_UNIFIED + "overage-status", "allowed" if self.overage else "rejected"),
                (_UNIFIED + "overage-in-use", "true" if rejected and self.overage else "false"),
                (_UNIFIED + "overage-reset", reset),
            ]
            if rejected and not self.overage:
                return headers, math.ceil(binding.resets_at - now)
            for window in windows:
                # Rounded so that 100 uses of 0.01 make exactly 1.0, not 0.9999999999999999.
                window.utilization = round(window.utilization + window.per_request, 9)
            return headers, None


def _is_messages(seen: SeenRequest) -> bool:
    return seen.method == "POST" and seen.path.split("?", 1)[0].endswith("/v1/messages")


def _lines(headers: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)


_header_lines = lru_cache(maxsize=256)(_lines)


@lru_cache(maxsize=64)
def _json_string(value: str) -> str:
    return json.dumps(value)


def _split_words(text: str) -> list[str]:
    """Words with their trailing spaces, so that joining them gives `text` back."""
    pieces: list[str] = []
    for word in _WORDS.findall(text):
        pieces.extend(word[i : i + _SSE_PIECE] for i in range(0, len(word), _SSE_PIECE))
    return pieces


def _deltas(text: str) -> tuple[bytes, ...]:
    return tuple((_DELTA % json.dumps(word)).encode() for word in _split_words(text))


_cached_deltas = lru_cache(maxsize=64)(_deltas)


def _message_body(msg_id: str, model: str, text: str, min_size: int = 0) -> bytes:
    """A non-streaming message; its text is padded with `x` until the body has min_size bytes."""
    words = len(_cached_deltas(text))
    body = (_MESSAGE % (msg_id, model, _json_string(text), words)).encode()
    if len(body) >= min_size:
        return body
    # Appending x's never splits a word, so only the token count's digits can move the size.
    pad = min_size - len(body)
    words = len(_split_words(text + "x"))
    for _ in range(2):
        body = (_MESSAGE % (msg_id, model, json.dumps(text + "x" * pad), words)).encode()
        pad = max(1, pad + min_size - len(body))
    return body


def _stream_events(msg_id: str, model: str, deltas: Sequence[bytes]) -> list[bytes]:
    return [
        (_MESSAGE_START % (msg_id, model)).encode(),
        _BLOCK_START,
        _PING,
        *deltas,
        _BLOCK_STOP,
        (_MESSAGE_DELTA % len(deltas)).encode(),
        _MESSAGE_STOP,
    ]


def refuses_prefill(model: str) -> bool:
    """Whether `model` (any platform's id) is Claude 4.6 or later, which refuse a prefill."""
    found = _MODEL_VERSION.search(model)
    return found is not None and (int(found[1]), int(found[2] or 0)) >= (4, 6)


def refusal(body: bytes, model: str) -> str | None:
    """What the API refuses in a Messages request's conversation, as its 400 message: a final
    assistant turn on a model without prefill, or a thinking block without its signature."""
    if b'"assistant"' not in body:
        return None
    try:
        messages = json.loads(body).get("messages")
    except (ValueError, AttributeError):
        return None
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if refuses_prefill(model) and isinstance(last, dict) and last.get("role") == "assistant":
        return PREFILL_REFUSED
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else []):
            if isinstance(block, dict) and block.get("type") == "thinking" and not block.get("signature"):
                return f"messages.{i}.content.{j}.thinking.signature: Field required"
    return None


def signature(thinking: str) -> str:
    """The fake's signature of a thinking block's text."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _event(name: str, payload: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _block(index: int, start: Mapping[str, object], deltas: Sequence[Mapping[str, object]]) -> list[bytes]:
    return [
        _event(
            "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
        ),
        *(
            _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
            for d in deltas
        ),
        _event("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


def _rich_stream_events(msg_id: str, model: str, b: Behavior) -> list[bytes]:
    """A stream with thinking before its text or a tool call after it, block by block."""
    blocks: list[list[bytes]] = []
    if b.thinking:
        thinking = [{"type": "thinking_delta", "thinking": w} for w in _split_words(b.thinking)]
        signed = {"type": "signature_delta", "signature": signature(b.thinking)}
        blocks.append(_block(0, {"type": "thinking", "thinking": "", "signature": ""}, [*thinking, signed]))
    if b.text:
        words = [{"type": "text_delta", "text": w} for w in _split_words(b.text)]
        blocks.append(_block(len(blocks), {"type": "text", "text": ""}, words))
    if b.tool_input:
        pieces = [b.tool_input[i : i + _JSON_PIECE] for i in range(0, len(b.tool_input), _JSON_PIECE)]
        start = {"type": "tool_use", "id": f"toolu_{msg_id}", "name": "read_file", "input": {}}
        blocks.append(
            _block(len(blocks), start, [{"type": "input_json_delta", "partial_json": p} for p in pieces])
        )
    first, *rest = blocks
    output = sum(len(block) - 2 for block in blocks)
    end = {"type": "message_delta", "delta": {"stop_reason": "tool_use" if b.tool_input else "end_turn"}}
    end["usage"] = {"output_tokens": output}
    return [
        (_MESSAGE_START % (msg_id, model)).encode(),
        first[0],
        _PING,
        *first[1:],
        *(event for block in rest for event in block),
        _event("message_delta", end),
        _MESSAGE_STOP,
    ]


def _cache_usage(b: Behavior) -> dict[str, object]:
    """The prompt-cache part of an answer's `usage`, as `b` says it."""
    return {
        "cache_read_input_tokens": b.cache_read,
        "cache_creation_input_tokens": b.cache_write_5m + b.cache_write_1h,
        "cache_creation": {
            "ephemeral_5m_input_tokens": b.cache_write_5m,
            "ephemeral_1h_input_tokens": b.cache_write_1h,
        },
    }


def error_body(status: int, message: str | None = None) -> bytes:
    """The Anthropic JSON error body the real API sends with `status`."""
    kind = ERROR_TYPES.get(status, "api_error")
    text = message or _ERROR_MESSAGES.get(status) or reason(status)
    return json.dumps({"type": "error", "error": {"type": kind, "message": text}}).encode()


def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=6, mtime=0)


async def _read_until_eof(reader: asyncio.StreamReader, sink: bytearray) -> None:
    """Keep pipelined bytes in `sink` and return once the client has gone away."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(READ_SIZE):
            sink += data


async def _forever() -> None:
    await asyncio.Event().wait()


class FakeAnthropic(FakeServer[Behavior]):
    """A loopback HTTP/1.1 server that speaks the Anthropic API and misbehaves on demand.

    `behavior`, `script`, `requests` and `keep` work as in `FakeServer`. With an `account`
    (settable from any thread at any time), POST .../v1/messages goes through it before
    `behavior`. A client that goes away mid-answer is counted in `disconnects`; a slow
    answer (a delay, a stall, a hang) watches for that and ends early.
    """

    stream_type = EVENT_STREAM  # the content-type of a streamed answer

    def __init__(self, name: str = "fake", port: int = 0) -> None:
        super().__init__(name, port, Behavior())
        self.account: Account | None = None
        self.prompt_cache: PromptCache | None = None  # set: answers report cache reads and writes
        self.disconnects: list[float] = []
        self.cut_gate: threading.Event | None = None  # `close_mid_stream` waits for it, if set
        self.events_sent = 0  # SSE events sent, to tell when a stream is under way
        self._name_line = f"x-fake-name: {name}\r\n".encode()

    # -- what tests read ------------------------------------------------------------------

    def reset(self) -> None:
        """Forget requests, disconnects, script, `keep`, `account`, `prompt_cache` and the
        connection faults; answer `ok` again."""
        with self._cond:
            super().reset()
            self.disconnects.clear()
            self.account = None
            self.prompt_cache = None
            self.cut_gate = None
            self.events_sent = 0

    def wait_for_disconnects(self, n: int, timeout: float = 5.0) -> list[float]:
        """Block until clients have gone away mid-answer `n` times."""
        self._wait(lambda: len(self.disconnects), n, timeout, "disconnect(s)")
        return list(self.disconnects)

    def _note_disconnect(self) -> None:
        with self._cond:
            self.disconnects.append(time.monotonic())
            self._cond.notify_all()

    # -- one request ----------------------------------------------------------------------

    async def _handle(self, x: Exchange, pending: bytearray) -> bool:
        reuse = await self._answer_aside(x)
        if reuse is not None:
            return reuse
        try:
            return await self._answer_recorded(x, pending)
        except ConnectionError:
            self._note_disconnect()
            return False

    async def _answer_recorded(self, x: Exchange, pending: bytearray) -> bool:
        """Record the request, then answer it as `script`, `behavior` and `account` say."""
        behavior = self._record(x.seen)
        account = self.account
        if account is not None and _is_messages(x.seen):
            headers, retry_after = account.admit()
            x.extra_headers = _lines(headers)
            if retry_after is not None:
                refusal = (*behavior.headers, ("retry-after", str(retry_after)))
                behavior = Behavior("status", 429, headers=refusal)
        slow = behavior.delay or behavior.event_delay or behavior.kind in ("hang", "stall")
        if slow:
            return await self._answer_watching(x, behavior, pending)
        return await self._answer(x, behavior)

    async def _answer_aside(self, x: Exchange) -> bool | None:
        """Answer a request that is no part of the API under test (None: there is none here).

        Such a request is neither recorded nor given a behaviour: a platform's token
        endpoint, say, must not use up the `script` meant for the API.
        """
        return None

    async def _answer_watching(self, x: Exchange, b: Behavior, pending: bytearray) -> bool:
        """Answer while watching for the client to leave, which ends the answer early."""
        answering = asyncio.ensure_future(self._answer(x, b))
        watching = asyncio.ensure_future(_read_until_eof(x.reader, pending))
        try:
            await asyncio.wait((answering, watching), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            answering.cancel()
            watching.cancel()
            raise
        if answering.done():
            # Wait for the cancellation to land: the next read() must not find this one.
            watching.cancel()
            await asyncio.wait((watching,))
            return answering.result()
        answering.cancel()
        await asyncio.wait((answering,))
        self._note_disconnect()
        return False

    # -- answers --------------------------------------------------------------------------

    def _head(
        self,
        x: Exchange,
        b: Behavior,
        status: int,
        content_type: bytes,
        length: int | None,
        gzipped: bool,
    ) -> bytes:
        lines = [b"content-encoding: gzip\r\n"] if gzipped else []
        lines += [b"request-id: req_fake_%d\r\n" % x.number, self._name_line, x.extra_headers]
        if b.headers:
            lines.append(_header_lines(b.headers))
        if b.kind == "huge_headers":
            lines.append(_HUGE_HEADER)
        return response_head(status, content_type, length, lines, x.keep_alive)

    async def _answer(self, x: Exchange, b: Behavior) -> bool:
        """Send the response `b` asks for; return whether the connection can be reused."""
        if b.delay:
            await asyncio.sleep(b.delay)
        kind = b.kind
        writer = x.writer
        if kind == "hang":
            await _forever()
        if kind == "close":
            return False
        if kind == "garbage":
            writer.write(_GARBAGE)
            return False
        if kind == "status":
            return await self._send_error(x, b, b.status)
        return await self._route(x, b)

    async def _route(self, x: Exchange, b: Behavior) -> bool:
        """Answer by route, once the behaviour has not broken or refused the request."""
        if _is_messages(x.seen):
            return await self._messages(x, b)
        path = x.seen.path.split("?", 1)[0]
        method = x.seen.method
        if method == "POST" and path.endswith("/v1/messages/count_tokens"):
            body = _COUNT_TOKENS
        elif method in ("GET", "HEAD") and path.endswith("/v1/models"):
            body = _MODELS
        else:
            body = json.dumps({"path": x.seen.path, "method": method}).encode()
        return await self._send_json(x, b, 200, body)

    async def _messages(self, x: Exchange, b: Behavior) -> bool:
        try:
            payload = json.loads(x.seen.body)
            model = json.dumps(payload.get("model", "claude-fake"))
            stream = payload.get("stream") is True
        except (ValueError, AttributeError):
            return await self._send_error(x, b, 400, "The request body is not a valid JSON object (fake).")
        return await self._reply(x, b, model, stream)

    async def _reply(self, x: Exchange, b: Behavior, model: str, stream: bool) -> bool:
        """Answer a Messages request for `model` (a JSON string) as a message or a stream."""
        msg_id = f"msg_fake_{x.number}"
        if (refused := refusal(x.seen.body, model)) is not None:
            return await self._send_error(x, b, 400, refused)
        cache = self.prompt_cache
        usage = cache.use(x.seen.json()) if cache is not None else None
        if usage is None and (b.cache_read or b.cache_write_5m or b.cache_write_1h):
            usage = _cache_usage(b)
        kind = b.kind
        if kind in ("bad_chunked", "truncated_gzip", "short_body") or (
            not stream and kind in ("ok", "large", "huge_headers")
        ):
            size = b.body_size if kind in ("ok", "large") else 0
            body = _message_body(msg_id, model, b.text, size)
            return await self._send_json(x, b, 200, body if usage is None else with_usage(body, usage, False))
        if b.thinking or b.tool_input:
            events = _rich_stream_events(msg_id, model, b)
        elif kind == "large" and len(b.text) < b.body_size:
            events = _stream_events(msg_id, model, _deltas(b.text + "x" * (b.body_size - len(b.text))))
        else:
            events = _stream_events(msg_id, model, _cached_deltas(b.text))
        if usage is not None:
            events[0] = with_usage(events[0], usage, True)
        after = b.after_events
        if kind == "sse_error_first":
            return await self._send_sse(x, b, [_SSE_OVERLOADED], "end")
        if kind == "sse_error_after_preamble":
            return await self._send_sse(x, b, [*events[:3], _SSE_OVERLOADED], "end")
        if kind == "sse_error_after":
            return await self._send_sse(x, b, [*events[:after], _SSE_OVERLOADED], "end")
        if kind == "cut":
            return await self._send_sse(x, b, events[:after], "abort")
        if kind == "close_mid_stream":
            return await self._send_sse(x, b, events[:after], "close")
        if kind == "stall":
            return await self._send_sse(x, b, events[:after], "stall")
        return await self._send_sse(x, b, events, "end")

    async def _send_error(self, x: Exchange, b: Behavior, status: int, message: str | None = None) -> bool:
        """Send the error the API sends with `status` (a platform sends its own shape)."""
        return await self._send_json(x, b, status, error_body(status, message))

    async def _send_json(self, x: Exchange, b: Behavior, status: int, body: bytes) -> bool:
        writer = x.writer
        kind = b.kind
        if kind == "bad_chunked":
            writer.write(self._head(x, b, status, JSON, None, False) + _BAD_CHUNK)
            return False
        if kind == "short_body":
            # Honest content-length, then the connection ends halfway through the body.
            writer.write(self._head(x, b, status, JSON, len(body), False) + body[: len(body) // 2])
            await writer.drain()
            return False
        gzipped = b.gzip or kind == "truncated_gzip"
        if gzipped:
            body = _gzip(body)
        if kind == "truncated_gzip":
            # Well-framed HTTP (content-length matches what is sent) around half a gzip
            # member: only a client that decodes the body notices.
            body = body[: len(body) // 2]
        head = self._head(x, b, status, JSON, len(body), gzipped)
        writer.write(head if x.head_only else head + body)
        await writer.drain()
        return x.keep_alive

    def _encode_events(self, x: Exchange, events: list[bytes]) -> list[bytes]:
        """The stream's events as written, one write each (a platform frames them its way)."""
        return events

    async def _send_sse(self, x: Exchange, b: Behavior, events: list[bytes], then: str) -> bool:
        """Send `events` as chunks, one write each, then end, abort or stall the stream."""
        writer = x.writer
        writer.write(self._head(x, b, 200, self.stream_type, None, b.gzip))
        await writer.drain()
        events = self._encode_events(x, events)
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if b.gzip else None
        for i, event in enumerate(events):
            if i and b.event_delay:
                await asyncio.sleep(b.event_delay)
            if compressor is not None:
                event = compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)
            # Counted before it is written: a client that has read it finds it counted, and
            # a test that resets the fake then cannot be caught up by a late count.
            self.events_sent += 1
            writer.write(chunk(event))
            await writer.drain()
        if then == "abort":
            # A TCP reset: the receiver's kernel may drop what its reader has not read yet.
            writer.transport.abort()
            return False
        if then == "close":
            # A FIN without the terminating chunk. A client library may drop what it had not
            # read yet when it sees the close, so a test can hold the close back (`cut_gate`)
            # until it has seen the last event arrive: then the cut comes after it, for sure.
            if self.cut_gate is not None:
                await asyncio.to_thread(self.cut_gate.wait, 30)
            writer.close()
            return False
        if then == "stall":
            await _forever()
        tail = LAST_CHUNK
        if compressor is not None:
            tail = chunk(compressor.flush()) + tail
        writer.write(tail)
        await writer.drain()
        return x.keep_alive


class _BlackholeSocket(socket.socket):
    """A listening socket that owns the connections filling its accept queue."""

    def __init__(self) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.fillers: list[socket.socket] = []

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.fillers.clear()
        super().close()


def blackhole_listener(settle: float = 0.1) -> tuple[socket.socket, int]:
    """A loopback port where connect() hangs: a listener whose accept queue is full.

    Linux drops a SYN while the listener's accept queue is full (`backlog=0` leaves room
    for one connection), so further connects retransmit SYNs and time out on the client
    side instead of being refused. The queue is filled with connections that nobody
    accepts until one no longer completes within `settle` seconds; closing the returned
    socket closes them too.
    """
    listener = _BlackholeSocket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(64):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(address)
            _, writable, _ = select.select([], [filler], [], settle)
            if not writable:
                filler.close()  # its SYN was dropped: the queue is full
                return listener, address[1]
            listener.fillers.append(filler)
            if error := filler.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError(error, f"filling the accept queue of port {address[1]} failed")
        raise RuntimeError(f"64 connections to port {address[1]} all completed; nothing blocks")
    except BaseException:
        listener.close()
        raise


# -- command line -------------------------------------------------------------------------


def _parse_header(spec: str) -> tuple[str, str]:
    name, sep, value = spec.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'name: value', got {spec!r}")
    return name.strip().lower(), value.strip()


def _parse_window(spec: str) -> Window:
    name, _, rest = spec.partition("=")
    util, _, reset_in = rest.partition(":")
    # A window named like "7d" or "5h" lasts that long; any other lasts the default 5 hours.
    span = re.match(r"(\d+)([hd])", name)
    length = int(span[1]) * (3600 if span[2] == "h" else 86400) if span else Window.length
    try:
        resets_in = float(reset_in) if reset_in else length
        if not resets_in > 0:
            raise ValueError("RESET_IN_SECONDS must be > 0")
        return Window(name, float(util), length=length, resets_at=time.time() + resets_in)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected NAME=UTILIZATION[:RESET_IN_SECONDS] such as 5h=0.5:3600, got {spec!r} ({e})"
        ) from e


def serve_options() -> argparse.ArgumentParser:
    """The options every fake's command line has (where to listen, how to answer), as a parent
    parser; `behavior_from` turns them into a `Behavior`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    parser.add_argument("--name", default="fake", help="sent back in the x-fake-name header")
    parser.add_argument("--kind", choices=sorted(KINDS), default="ok", help="how to answer")
    parser.add_argument("--status", type=int, help="HTTP status for --kind status")
    parser.add_argument(
        "--header",
        action="append",
        type=_parse_header,
        default=[],
        help="extra response header 'name: value' (repeatable)",
    )
    parser.add_argument("--text", default=Behavior.text, help="reply text")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before the headers")
    parser.add_argument("--event-delay", type=float, default=0.0, help="seconds between events")
    parser.add_argument("--after-events", type=int, default=0, help="events before misbehaving")
    parser.add_argument("--body-size", type=int, default=0, help="minimum JSON body size")
    parser.add_argument("--gzip", action="store_true", help="gzip response bodies")
    return parser


def behavior_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Behavior:
    """The `Behavior` that the `serve_options` in `args` describe."""
    if args.kind == "status" and args.status is None:
        parser.error("--kind status needs --status")
    return Behavior(
        kind=args.kind,
        status=args.status or 200,
        headers=tuple(args.header),
        text=args.text,
        event_delay=args.event_delay,
        after_events=args.after_events,
        gzip=args.gzip,
        body_size=args.body_size,
        delay=args.delay,
    )


def _arguments(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Behavior, Account | None]:
    parser = argparse.ArgumentParser(
        prog="python -m claude_code_fallback.fakes.anthropic",
        description="Run a fake Anthropic API on 127.0.0.1 in the foreground.",
        parents=[serve_options()],
    )
    parser.add_argument(
        "--window",
        action="append",
        type=_parse_window,
        default=[],
        metavar="NAME=UTIL[:RESET_IN_SECONDS]",
        help="play a subscription account with this usage window (repeatable), e.g. 5h=0.5:3600;"
        " a window named 5h or 7d... lasts 5 hours or 7 days, others 5 hours",
    )
    parser.add_argument("--per-request", type=float, help="utilization each request uses (0.01)")
    parser.add_argument("--overage", action="store_true", help="serve past a spent window as overage")
    args = parser.parse_args(argv)
    behavior = behavior_from(parser, args)
    account = None
    if args.window:
        use = Window.per_request if args.per_request is None else args.per_request
        try:
            account = Account(*(replace(w, per_request=use) for w in args.window), overage=args.overage)
        except ValueError as e:
            parser.error(f"--window: {e}")
    elif args.overage or args.per_request is not None:
        parser.error("--overage and --per-request need at least one --window")
    return args, behavior, account


def main(argv: Sequence[str] | None = None) -> int:
    args, behavior, account = _arguments(argv)
    fake = FakeAnthropic(args.name, args.port)
    fake.behavior = behavior
    fake.account = account
    return serve_in_foreground(fake, "fakeapi")


if __name__ == "__main__":
    sys.exit(main())
