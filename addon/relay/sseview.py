"""A mitmproxy content view that shows an Anthropic SSE stream as the message it assembles to.

Raw events are hard to read; a person inspecting a flow wants the reply: its text, tool
calls, thinking, stop reason and usage.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from mitmproxy import contentviews

from ..sse import EventReader


def assemble(data: bytes) -> dict[str, Any]:
    """Rebuilds the message a stream describes, the way an SDK's stream accumulator would."""
    message: dict[str, Any] = {"content": [], "usage": {}}
    partial_json: dict[int, str] = {}
    events = EventReader().feed(data + b"\n\n")
    for event in events:
        payload = event.json() or {}
        if event.name == "message_start":
            start = payload.get("message") or {}
            message.update({k: v for k, v in start.items() if k not in ("content", "usage")})
            message["usage"].update(start.get("usage") or {})
        elif event.name == "content_block_start":
            message["content"].append(dict(payload.get("content_block") or {}))
        elif event.name == "content_block_delta" and message["content"]:
            index = payload.get("index", len(message["content"]) - 1)
            block = message["content"][min(index, len(message["content"]) - 1)]
            delta = payload.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif kind == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
            elif kind == "input_json_delta":
                partial_json[index] = partial_json.get(index, "") + delta.get("partial_json", "")
        elif event.name == "message_delta":
            message.update(payload.get("delta") or {})
            message["usage"].update(payload.get("usage") or {})
        elif event.name == "error":
            message["error"] = payload.get("error")
    for index, text in partial_json.items():
        with contextlib.suppress(ValueError, IndexError):
            message["content"][index]["input"] = json.loads(text) if text else {}
    message["complete"] = any(e.name == "message_stop" for e in events)
    return message


def render(message: dict[str, Any]) -> Iterator[str]:
    header = " ".join(f"{k}={message[k]}" for k in ("model", "stop_reason") if message.get(k))
    yield header or "message"
    for block in message["content"]:
        kind = block.get("type")
        if kind == "text":
            yield ""
            yield from block.get("text", "").splitlines() or [""]
        elif kind == "thinking":
            yield ""
            yield "[thinking]"
            yield from block.get("thinking", "").splitlines()
        elif kind == "tool_use":
            yield ""
            yield f"[tool_use {block.get('name')} id={block.get('id')}]"
            yield from json.dumps(block.get("input", {}), indent=2).splitlines()
        else:
            yield f"[{kind}]"
    if message.get("error"):
        yield ""
        yield f"[error] {json.dumps(message['error'])}"
    yield ""
    yield "usage: " + json.dumps(message["usage"])
    if not message["complete"]:
        yield "(stream incomplete: no message_stop)"


def _priority(data: bytes, content_type: str | None) -> float:
    if (content_type or "").startswith("text/event-stream") and b"message_start" in data[:4096]:
        return 2
    return 0


class AnthropicStreamContentview:
    """The view for mitmproxy 12 and later (`contentviews.Contentview`)."""

    name = "Anthropic message"
    syntax_highlight = "none"

    def prettify(self, data: bytes, metadata: Any) -> str:
        return "\n".join(render(assemble(data)))

    def render_priority(self, data: bytes, metadata: Any) -> float:
        return _priority(data, metadata.content_type)


def stream_view() -> Any:
    """The view in the form the running mitmproxy wants."""
    if hasattr(contentviews, "Contentview"):
        return AnthropicStreamContentview()
    return AnthropicStreamView()


class AnthropicStreamView(contentviews.View):
    """The same view for mitmproxy 11."""

    name = "Anthropic message"

    def __call__(self, data: bytes, **metadata: Any) -> tuple[str, Iterator[list[tuple[str, str | bytes]]]]:
        lines = render(assemble(data))
        return "Anthropic stream, assembled", ([("text", line)] for line in lines)

    def render_priority(self, data: bytes, *, content_type: str | None = None, **metadata: Any) -> float:
        return _priority(data, content_type)
