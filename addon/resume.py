"""Mid-stream continuation (`streaming.resume`): finish a cut answer on another endpoint.

When a text-only stream breaks after content reached the client, the same request goes
to the next endpoint with the text received so far as an assistant prefill, and that
endpoint's events are spliced into the client's stream: its `message_start`, `ping` and
the continued block's `content_block_start` are dropped, block indexes are shifted to
follow on, and the final usage adds up both parts. The client sees one message.

Only complete events are passed on while resuming is possible, so that a cut can never
leave half an event in front of the continuation.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from . import sse
from .upstream import ClientRequest, StreamBroken, UpstreamResponse

# (continuation request, the endpoint whose stream broke, why) -> the continuing stream, if any
Continue = Callable[[ClientRequest, str, str], Awaitable[UpstreamResponse | None]]


def resumable_request(request: ClientRequest) -> bool:
    """Continuation is safe only for plain text generation: no extended thinking."""
    payload = request.payload
    if not payload or not request.streaming or not isinstance(payload.get("messages"), list):
        return False
    thinking = payload.get("thinking")
    return not (isinstance(thinking, dict) and thinking.get("type") == "enabled")


def continuation(request: ClientRequest, text: str) -> ClientRequest:
    """The same request with the partial answer appended as an assistant prefill."""
    assert request.payload is not None
    # The API refuses a final assistant turn that ends in whitespace.
    prefill = text.rstrip()
    messages = list(request.payload["messages"])
    if messages and messages[-1].get("role") == "assistant":
        earlier = messages[-1].get("content")
        earlier_text = earlier if isinstance(earlier, str) else ""
        messages[-1] = {"role": "assistant", "content": (earlier_text + prefill).rstrip()}
    else:
        messages.append({"role": "assistant", "content": prefill})
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
    )


@dataclass
class _Message:
    """What the client has been sent so far, in the terms a continuation needs."""

    blocks: list[str] = field(default_factory=list)  # block types by index
    text: list[str] = field(default_factory=list)
    open_block: int | None = None
    output_tokens: int = 0
    stopped: bool = False

    def track(self, event: sse.Event) -> None:
        payload = event.json() or {}
        if event.name == "content_block_start":
            self.blocks.append((payload.get("content_block") or {}).get("type", "?"))
            self.open_block = len(self.blocks) - 1
        elif event.name == "content_block_delta":
            delta = payload.get("delta") or {}
            if delta.get("type") == "text_delta":
                self.text.append(delta.get("text", ""))
        elif event.name == "content_block_stop":
            self.open_block = None
        elif event.name == "message_stop":
            self.stopped = True
        if (usage := sse.usage_of(event)) is not None:
            self.output_tokens = max(self.output_tokens, usage.output)

    def text_only(self) -> bool:
        return bool(self.text) and all(kind == "text" for kind in self.blocks)


@dataclass
class _Splice:
    """Rewrites a continuation's events so they follow on from what the client already has."""

    merge_into: int | None  # the block the continuation's first block extends, if still open
    offset: int
    earlier_output: int
    # The prefill lost its trailing whitespace, which the client already has: the
    # continuation's own leading whitespace would double it.
    trim_leading_space: bool = False

    def rewrite(self, event: sse.Event) -> bytes | None:
        if event.name in ("message_start", "ping"):
            return None
        payload = event.json()
        if not isinstance(payload, dict):
            return None
        if "index" in payload:
            index = payload["index"]
            if self.merge_into is not None and index == 0:
                if event.name == "content_block_start":
                    return None
                payload["index"] = self.merge_into
            else:
                payload["index"] = index + self.offset
        delta = payload.get("delta")
        if self.trim_leading_space and isinstance(delta, dict) and delta.get("type") == "text_delta":
            delta["text"] = str(delta.get("text", "")).lstrip()
            self.trim_leading_space = not delta["text"]
        if event.name == "message_delta" and isinstance(payload.get("usage"), dict):
            usage = payload["usage"]
            usage["output_tokens"] = int(usage.get("output_tokens") or 0) + self.earlier_output
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        return f"event: {event.name}\ndata: {data}\n\n".encode()


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

    async def chunks(self) -> AsyncIterator[bytes]:
        splice: _Splice | None = None
        while True:
            try:
                async for block in self._events(self.current, splice):
                    if len(self.copy) < self.copy_limit:
                        self.copy += block[: self.copy_limit - len(self.copy)]
                    yield block
                self.complete = True
                return
            except StreamBroken as broken:
                splice = await self._continue(broken)

    async def _events(self, response: UpstreamResponse, splice: _Splice | None) -> AsyncIterator[bytes]:
        """Whole events only; an `error` event after content counts as a break."""
        pending = b""
        async for chunk in response.chunks():
            pending += chunk
            end = pending.rfind(b"\n\n")
            if end < 0:
                continue
            complete, pending = pending[: end + 2], pending[end + 2 :]
            out = bytearray()
            for raw in complete.split(b"\n\n")[:-1]:
                event = sse.parse_event(raw)
                if event is None:
                    continue
                if event.name == "error" and self._may_resume():
                    if out:
                        yield bytes(out)
                    raise StreamBroken("sse_error", "error event mid-stream")
                if splice is None:
                    out += raw + b"\n\n"
                elif (rewritten := splice.rewrite(event)) is not None:
                    out += rewritten
                else:
                    continue
                self.message.track(event)
            if out:
                yield bytes(out)
        if not self.message.stopped:
            raise StreamBroken("upstream_cut", "stream ended without message_stop")

    def _may_resume(self) -> bool:
        return self.attempts_left > 0 and self.message.text_only() and not self.message.stopped

    async def _continue(self, broken: StreamBroken) -> _Splice:
        if not self._may_resume():
            raise broken
        self.attempts_left -= 1
        self.current.close()
        message = self.message
        request = continuation(self.request, "".join(message.text))
        response = await self.resume(request, self.current.endpoint.name, broken.reason)
        if response is None:
            raise broken
        if response.status != 200 or not response.is_event_stream or _encoded(response):
            response.close()
            raise broken
        self.parts.append(response)
        self.current = response
        merge = message.open_block
        return _Splice(
            merge_into=merge,
            offset=len(message.blocks) if merge is None else len(message.blocks) - 1,
            earlier_output=message.output_tokens,
            trim_leading_space=merge is not None and "".join(message.text)[-1:].isspace(),
        )

    def close(self) -> None:
        self.current.close()


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
