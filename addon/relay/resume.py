"""Mid-stream continuation (`streaming.resume`): finish a cut answer on another endpoint.

Claude 4.6 and later refuse a prefill (a conversation that ends with an assistant turn),
so a continuation takes the form every model accepts: the original conversation, the
answer so far as an assistant turn (its text, and its thinking blocks that are complete
and signed), then a short user turn asking to go on exactly where it stopped. The
answer that comes back is spliced into the client's stream: its `message_start` is
dropped, the client's open block is extended (text after text) or closed, block indexes
follow on, a stretch the model repeats at the seam is dropped, and the final usage adds
up both parts. The client sees one message.

A cut inside or after a `tool_use` block (or any block other than text and thinking) is
not continued: the client holds part of a call that another model cannot finish, and a
call made again would follow half of one in the same message. Such a stream, and one
whose continuation cannot be had, ends at once with an Anthropic `error` event, which
the client takes as a failed turn and retries.

Only complete events are passed on while resuming is possible, so that a cut can never
leave half an event in front of the continuation.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import sse
from ..request import ClientRequest, Kind, StreamBroken
from ..upstream.client import UpstreamResponse

# (continuation request, the endpoint whose stream broke, why) -> the continuing stream, if any
Continue = Callable[[ClientRequest, str, Kind], Awaitable[UpstreamResponse | None]]

CONTINUE_PROMPT = (
    "Your previous answer was cut off. Continue it from exactly where it stopped, even in the "
    "middle of a word or sentence. Do not repeat anything already written, and do not mention "
    "the interruption."
)
CONTINUABLE = frozenset({"text", "thinking", "redacted_thinking"})
SEAM_CHARS = 120  # how much of a continuation is held to find a repeat of the text before it
MIN_REPEAT = 8  # a shorter match at the seam is as likely chance as a repeat


def resumable_request(request: ClientRequest) -> bool:
    payload = request.payload
    return bool(payload and request.streaming and isinstance(payload.get("messages"), list))


@dataclass
class _Block:
    kind: str
    parts: list[str] = field(default_factory=list)  # text or thinking deltas
    signature: str = ""
    data: str = ""  # a redacted_thinking block's
    open: bool = True

    def as_content(self) -> dict[str, Any] | None:
        """The block as a continuation sends it back; None when it cannot be sent."""
        if self.kind == "text":
            return {"type": "text", "text": "".join(self.parts)} if any(self.parts) else None
        if self.open:
            return None  # thinking cut before its signature: the API refuses it unsigned
        if self.kind == "redacted_thinking":
            return {"type": "redacted_thinking", "data": self.data}
        return {"type": "thinking", "thinking": "".join(self.parts), "signature": self.signature}


@dataclass
class _Message:
    """What the client has been sent so far, in the terms a continuation needs."""

    blocks: list[_Block] = field(default_factory=list)
    output_tokens: int = 0
    stopped: bool = False

    def track(self, name: str, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        block = self.open_block()
        if name == "content_block_start":
            start = payload.get("content_block") or {}
            self.blocks.append(_Block(str(start.get("type", "?")), data=str(start.get("data", ""))))
            if start.get("text"):
                self.blocks[-1].parts.append(start["text"])
        elif name == "content_block_delta" and block is not None:
            delta = payload.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta":
                block.parts.append(str(delta.get("text", "")))
            elif kind == "thinking_delta":
                block.parts.append(str(delta.get("thinking", "")))
            elif kind == "signature_delta":
                block.signature += str(delta.get("signature", ""))
        elif name == "content_block_stop" and block is not None:
            block.open = False
        elif name == "message_stop":
            self.stopped = True
        elif name == "message_delta":
            usage = payload.get("usage") or {}
            self.output_tokens = max(self.output_tokens, sse.int_or_zero(usage.get("output_tokens")))
        elif name == "message_start":
            usage = (payload.get("message") or {}).get("usage") or {}
            self.output_tokens = max(self.output_tokens, sse.int_or_zero(usage.get("output_tokens")))

    def open_block(self) -> _Block | None:
        return self.blocks[-1] if self.blocks and self.blocks[-1].open else None

    def continuable(self) -> bool:
        return not self.stopped and all(block.kind in CONTINUABLE for block in self.blocks)

    def answer_so_far(self) -> list[dict[str, Any]]:
        """The assistant content a continuation sends; empty when there is no text to go on from."""
        content = [c for block in self.blocks if (c := block.as_content()) is not None]
        return content if any(c["type"] == "text" for c in content) else []

    def last_text(self) -> str:
        return next(("".join(b.parts) for b in reversed(self.blocks) if b.kind == "text"), "")


def continuation(request: ClientRequest, answer: list[dict[str, Any]]) -> ClientRequest:
    """The request that finishes an answer cut after `answer`, ending with a user turn.

    Without text to go on from, it is the request itself: the next endpoint answers anew.
    """
    assert request.payload is not None
    messages = list(request.payload["messages"])
    if answer:
        if messages and messages[-1].get("role") == "assistant":  # the client's own prefill
            answer = [*_as_blocks(messages.pop().get("content")), *answer]
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": [{"type": "text", "text": CONTINUE_PROMPT}]},
        ]
    payload = dict(request.payload, messages=messages)
    headers = tuple((k, v) for k, v in request.headers if k.lower() != "accept-encoding")
    return ClientRequest(
        method=request.method,
        path=request.path,
        headers=(*headers, ("accept-encoding", "identity")),
        body=json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(),
        streaming=True,
        model=request.model,
        payload=payload,
        trace=request.trace,
    )


def _as_blocks(content: Any) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content) if isinstance(content, list) else []


def join_seam(before: str, after: str) -> str:
    """`after` as it follows on from `before`: without a repeat of the end of `before`,
    and without leading whitespace where `before` already ends in some."""
    for size in range(min(len(before), len(after)), MIN_REPEAT - 1, -1):
        if before.endswith(after[:size]):
            after = after[size:]
            break
    return after.lstrip() if before[-1:].isspace() else after


class _Splice:
    """Rewrites a continuation's events so they follow on from what the client already has."""

    def __init__(self, message: _Message) -> None:
        self.message = message
        self.earlier_output = message.output_tokens
        self.indexes: dict[int, int] = {}
        self.started = False  # the continuation has begun a block
        self.seam_block: int | None = None  # the continuation's first text block, held at the seam
        self.seam_before = message.last_text()
        self.held = ""

    def rewrite(self, name: str, payload: Any) -> list[tuple[str, Any]]:
        """The events to send for one event of the continuation."""
        if name == "message_start" or not isinstance(payload, dict):
            return []
        if name == "content_block_start":
            return self._start(payload)
        index = payload.get("index")
        if isinstance(index, int):
            if index == self.seam_block:
                return self._at_seam(name, payload)
            payload["index"] = self.indexes.get(index, index)
        if name == "message_delta":
            usage = payload.get("usage")
            if isinstance(usage, dict):
                usage["output_tokens"] = sse.int_or_zero(usage.get("output_tokens")) + self.earlier_output
            return [*self._close_open(), (name, payload)]
        return [(name, payload)]

    def _start(self, payload: dict[str, Any]) -> list[tuple[str, Any]]:
        index = payload.get("index")
        kind = (payload.get("content_block") or {}).get("type")
        first, self.started = not self.started, True
        if not isinstance(index, int):
            return []
        seam = kind == "text" and self.seam_block is None
        if seam:
            self.seam_block = index
        open_block = self.message.open_block()
        if first and seam and open_block is not None and open_block.kind == "text":
            self.indexes[index] = len(self.message.blocks) - 1  # the text goes on in the open block
            return []
        closing = self._close_open()
        self.indexes[index] = payload["index"] = len(self.message.blocks)
        return [*closing, ("content_block_start", payload)]

    def _at_seam(self, name: str, payload: dict[str, Any]) -> list[tuple[str, Any]]:
        """Holds the first text until a repeat of the text before it can be told and dropped."""
        payload["index"] = self.indexes[self.seam_block]  # type: ignore[index]
        delta = payload.get("delta") or {}
        if name == "content_block_delta" and delta.get("type") == "text_delta":
            self.held += str(delta.get("text", ""))
            if len(self.held) < SEAM_CHARS:
                return []
            delta["text"] = self._release()
            return [(name, payload)] if delta["text"] else []
        released = self._release()
        if not released:
            return [(name, payload)]
        text = {"type": "content_block_delta", "index": payload["index"], "delta": _text_delta(released)}
        return [("content_block_delta", text), (name, payload)]

    def _release(self) -> str:
        text, self.held = join_seam(self.seam_before, self.held), ""
        self.seam_block = -1  # the seam is passed: later deltas of the block go straight on
        return text

    def _close_open(self) -> list[tuple[str, Any]]:
        if self.message.open_block() is None:
            return []
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.message.blocks) - 1})]


def _text_delta(text: str) -> dict[str, str]:
    return {"type": "text_delta", "text": text}


def encode(name: str, payload: Any) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {data}\n\n".encode()


class ResumingResponse:
    """Relays a stream and, if it breaks mid-answer, continues it on another endpoint."""

    def __init__(
        self, first: UpstreamResponse, request: ClientRequest, resume: Continue, attempts: int
    ) -> None:
        self.first = first
        self.current = first
        self.request = request
        self.resume = resume
        self.attempts_left = attempts
        self.status = first.status
        self.reason = first.reason
        self.headers = first.headers
        self.message = _Message()
        self.parts = [first]
        self.copy = bytearray()
        self.copy_limit = first.copy_limit
        self.complete = False
        self.broken: StreamBroken | None = None  # why a stream that ended with an error event broke

    async def chunks(self) -> AsyncIterator[bytes]:
        splice: _Splice | None = None
        while True:
            try:
                async for block in self._events(self.current, splice):
                    yield self._copied(block)
                self.complete = True
                return
            except StreamBroken as broken:
                try:
                    splice = await self._continue(broken)
                except StreamBroken as final:
                    self.broken, self.complete = final, True
                    yield self._copied(encode("error", _error(final)))
                    return

    def _copied(self, block: bytes) -> bytes:
        if len(self.copy) < self.copy_limit:
            self.copy += block[: self.copy_limit - len(self.copy)]
        return block

    async def _events(self, response: UpstreamResponse, splice: _Splice | None) -> AsyncIterator[bytes]:
        """Whole events only; an `error` event after content counts as a break."""
        pending = b""
        async for chunk in response.chunks():
            blocks, pending = sse.split_blocks(pending, chunk)
            out = bytearray()
            for raw in blocks:
                event = sse.parse_event(raw)
                if event is None:
                    continue
                if event.name == "error":
                    if out:
                        yield bytes(out)
                    if self._may_resume():
                        raise StreamBroken(Kind.SSE_ERROR, "error event mid-stream")
                    # the endpoint's own error goes to the client as it came, and ends the stream
                    self.broken = StreamBroken(Kind.SSE_ERROR, "error event mid-stream")
                    yield raw + b"\n\n"
                    return
                payload = event.json()
                if splice is None:
                    self.message.track(event.name, payload)
                    out += raw + b"\n\n"
                    continue
                for name, rewritten in splice.rewrite(event.name, payload):
                    self.message.track(name, rewritten)
                    out += encode(name, rewritten)
            if out:
                yield bytes(out)
        if not self.message.stopped:
            raise StreamBroken(Kind.UPSTREAM_CUT, "stream ended without message_stop")

    def _may_resume(self) -> bool:
        return self.attempts_left > 0 and self.message.continuable()

    async def _continue(self, broken: StreamBroken) -> _Splice:
        self.current.close()
        if not self._may_resume():
            raise StreamBroken(broken.reason, f"{broken}; {self._why_not()}")
        self.attempts_left -= 1
        request = continuation(self.request, self.message.answer_so_far())
        response = await self.resume(request, self.current.endpoint.name, broken.reason)
        if response is None or response.status != 200 or not response.is_event_stream or _encoded(response):
            if response is not None:
                response.close()
            raise StreamBroken(broken.reason, f"{broken}; no endpoint could continue the answer")
        self.parts.append(response)
        self.current = response
        return _Splice(self.message)

    def _why_not(self) -> str:
        if not self.message.continuable():
            return "a tool call was cut, which only the client can ask for again"
        return "no endpoint was left to continue the answer"

    def close(self) -> None:
        self.current.close()


def _error(broken: StreamBroken) -> dict[str, Any]:
    message = f"The answer was cut off ({broken}). Please try again."
    return {"type": "error", "error": {"type": "api_error", "message": message}}


def _encoded(response: UpstreamResponse) -> bool:
    encoding = next((v for k, v in response.headers if k.lower() == b"content-encoding"), b"identity")
    return encoding.strip().lower() not in (b"", b"identity")


def can_resume(response: UpstreamResponse, request: ClientRequest) -> bool:
    return (
        response.status == 200
        and response.is_event_stream
        and not _encoded(response)
        and resumable_request(request)
    )
