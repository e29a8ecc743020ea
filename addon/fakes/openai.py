"""A fake OpenAI Chat Completions API on loopback, as strict as OpenAI's own, that can misbehave.

Tests point an OpenAI-compatible endpoint of the proxy, or the official `openai` SDK, at
a `FakeOpenAI`. `POST .../v1/chat/completions` answers a `chat.completion`, or a stream
of data-only `chat.completion.chunk` events (role, reasoning, text, tool call argument
fragments, finish_reason, a usage chunk with empty `choices` when `stream_options` asks
for it, `[DONE]`) written across TCP writes cut at awkward places: mid-line, inside a
UTF-8 character, several events at once. `Quirks` make the stream look like the
providers that deviate (indexes reused or absent, ids on every fragment or none, names
late, `reasoning` instead of `reasoning_content`, CRLF, comments). Like OpenAI, it refuses
with a 400 any top-level argument Chat Completions does not define, and tool messages
that answer no call. Behaviours: the scripted answers (`TEXT`, `TOOL`, `TWO_TOOLS`,
`TEXT_THEN_TOOL`, `REASONING`), error statuses with OpenAI's error bodies and headers, an
error chunk inside the stream, a cut (TCP reset) or a stall mid-stream. `GET .../v1/models`
lists models. `fakes.server.FakeServer` reads and records the requests (h11); answers are
raw bytes, so they can break.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .anthropic import PREFILL_REFUSED, refuses_prefill
from .server import (
    EVENT_STREAM,
    JSON,
    LAST_CHUNK,
    Exchange,
    FakeServer,
    chunk,
    response_head,
    serve_in_foreground,
)

KINDS = frozenset({"ok", "status", "error_chunk", "cut", "stall", "hang"})
"""Every `Behavior.kind` the server understands."""

CHAT_ARGUMENTS = frozenset(
    {
        "messages",
        "model",
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "metadata",
        "modalities",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)
"""The top-level arguments Chat Completions defines (openai-python 1.109's create params)."""

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_USER_PARTS = frozenset({"text", "image_url", "input_audio", "file"})
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_WORDS = re.compile(r"\S+\s*|\s+")
_DONE = b"data: [DONE]\n\n"
# Write sizes cycled through when a stream is cut awkwardly: single bytes, pieces of a
# line, and writes that hold several events.
_WRITE_SIZES = (3, 41, 1, 160, 17, 700, 9, 2, 90)


@dataclass(frozen=True)
class ToolCall:
    """One function call of an answer; `arguments` is JSON text, streamed in fragments."""

    name: str
    arguments: str
    id: str = ""  # "" → call_<n>


@dataclass(frozen=True)
class Answer:
    """What the model says: reasoning, then text, then tool calls.

    `finish_reason` "" means `tool_calls` when there are calls, else `stop`. Completion
    tokens are counted as the pieces streamed, unless given.
    """

    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str = ""
    prompt_tokens: int = 21
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finish(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")


WEATHER = ToolCall("get_weather", '{"city": "Zürich", "unit": "celsius"}', "call_weather_1")
TIME = ToolCall("get_time", '{"timezone": "Europe/Zurich", "format": "24h"}', "call_time_2")
TEXT = Answer(text="Héllo from the fake — ünïcode ✓ and an emoji 🦊 to cut inside.")
TOOL = Answer(tool_calls=(WEATHER,))
TWO_TOOLS = Answer(tool_calls=(WEATHER, TIME))
TEXT_THEN_TOOL = Answer(text="Let me look that up for you.", tool_calls=(WEATHER,))
REASONING = Answer(
    reasoning="The user says hello; a short, friendly answer fits.", text="Hello! How can I help?"
)
ANSWERS = {
    "text": TEXT,
    "tool": TOOL,
    "two_tools": TWO_TOOLS,
    "text_then_tool": TEXT_THEN_TOOL,
    "reasoning": REASONING,
}
"""The scripted answers by name."""


@dataclass(frozen=True)
class Quirks:
    """How a provider's stream departs from OpenAI's own.

    `index`: `per_call` (0, 1, ...), `zero` (every call 0), `sparse` (1, 3, ...) or
    `missing`. `ids`: on the `first` fragment of a call, on `every` one, or `none`.
    `late_name`: the name comes with the second fragment. `reasoning_field`:
    `reasoning_content` (DeepSeek, vLLM) or `reasoning` (OpenRouter, Ollama).
    `argument_piece`: characters of arguments per fragment. `crlf`: CRLF line ends.
    `comments`: keep-alive comments between events.
    """

    index: str = "per_call"
    ids: str = "first"
    late_name: bool = False
    reasoning_field: str = "reasoning_content"
    argument_piece: int = 6
    crlf: bool = False
    comments: bool = False


@dataclass(frozen=True)
class Behavior:
    """How the server answers one request; `kind` picks the (mis)behaviour.

    `ok` answers `answer` (streamed when the body asks). `status` answers `status` with
    OpenAI's error body for it (`error_code` picks another, such as
    `context_length_exceeded`; `message` replaces the text). `error_chunk` streams
    `after_events` events of the answer, then an error chunk for `status`, and ends.
    `cut` streams `after_events` events and resets the connection; `stall` sends them and
    then nothing; `hang` sends nothing at all. `split` cuts a stream's bytes into awkward
    TCP writes (one write per event without it). Frozen: build a new one to change it.
    """

    kind: str = "ok"
    answer: Answer = TEXT
    status: int = 200
    error_code: str = ""
    message: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    after_events: int = 0
    quirks: Quirks = field(default_factory=Quirks)
    split: bool = True
    delay: float = 0.0
    event_delay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", tuple((str(n), str(v)) for n, v in self.headers))
        if self.kind not in KINDS:
            raise ValueError(f"unknown fake behavior kind {self.kind!r}; use one of {sorted(KINDS)}")


RATE_LIMITED = Behavior(
    "status",
    status=429,
    headers=(
        ("retry-after", "2"),
        ("x-ratelimit-limit-requests", "3"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "2s"),
    ),
)
CONTEXT_TOO_LONG = Behavior("status", status=400, error_code="context_length_exceeded")
UNAUTHORIZED = Behavior("status", status=401)
SERVER_ERROR = Behavior("status", status=500)
OVERLOADED = Behavior("status", status=503)
ERROR_CHUNK = Behavior("error_chunk", status=503)
CUT = Behavior("cut", after_events=4)
STALL = Behavior("stall", after_events=4)

_ERRORS: dict[int | str, tuple[str, str, str | None, str | None]] = {
    # status or code: (message, type, param, code), as OpenAI words them
    400: ("Invalid request (fake).", "invalid_request_error", None, None),
    401: (
        "Incorrect API key provided: x. You can find your API key at https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        None,
        "invalid_api_key",
    ),
    403: ("You are not allowed to use this model (fake).", "invalid_request_error", None, None),
    404: (
        "The model `gpt-fake` does not exist or you do not have access to it.",
        "invalid_request_error",
        None,
        "model_not_found",
    ),
    429: (
        "Rate limit reached for gpt-fake in organization org-fake on requests per min (RPM):"
        " Limit 3, Used 3, Requested 1. Please try again in 2s.",
        "requests",
        None,
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        None,
    ),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None, None),
    "context_length_exceeded": (
        "This model's maximum context length is 128000 tokens. However, your messages resulted in"
        " 131072 tokens. Please reduce the length of the messages.",
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
    ),
}


def error_object(status: int, code: str = "", message: str = "") -> dict[str, Any]:
    """OpenAI's `error` object for `status`, or for the error `code` when one is given."""
    text, kind, param, preset_code = _ERRORS.get(code or status) or _ERRORS[500 if status >= 500 else 400]
    return {"message": message or text, "type": kind, "param": param, "code": code or preset_code}


def error_body(status: int, code: str = "", message: str = "", param: str | None = None) -> bytes:
    """OpenAI's JSON error body: `{"error": {"message", "type", "param", "code"}}`."""
    error = error_object(status, code, message)
    if param is not None:
        error["param"] = param
    return json.dumps({"error": error}).encode()


# -- what OpenAI refuses ---------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why a request is invalid, in OpenAI's words."""

    message: str
    param: str | None = None
    code: str | None = None


def check_request(payload: Any, *, max_tokens_ok: bool = True) -> Refusal | None:
    """What OpenAI's server would answer 400 to in a Chat Completions body, or None."""
    if not isinstance(payload, dict):
        return Refusal(
            "We could not parse the JSON body of your request. (HINT: the body must be a JSON object.)"
        )
    unknown = sorted(set(payload) - CHAT_ARGUMENTS)
    if unknown:
        return Refusal(f"Unrecognized request argument supplied: {', '.join(unknown)}")
    for name in ("model", "messages"):
        if name not in payload:
            return Refusal(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    if not max_tokens_ok and "max_tokens" in payload:
        return Refusal(
            "Unsupported parameter: 'max_tokens' is not supported with this model."
            " Use 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        )
    if "stream_options" in payload and payload.get("stream") is not True:
        return Refusal(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
        )
    tools = payload.get("tools")
    for name in ("tool_choice", "parallel_tool_calls"):
        if name in payload and not tools:
            return Refusal(
                f"Invalid value for '{name}': '{name}' is only allowed when 'tools' are specified.", name
            )
    for i, tool in enumerate(tools or ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        function_name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function_name, str) or not _FUNCTION_NAME.fullmatch(function_name):
            return Refusal(
                f"Invalid 'tools[{i}].function.name': string does not match pattern."
                " Expected a string that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'.",
                f"tools[{i}].function.name",
                "invalid_value",
            )
    messages = payload["messages"]
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") == "assistant" and refuses_prefill(str(payload["model"])):
        return Refusal(PREFILL_REFUSED, "messages")  # a Claude 4.6+ behind an OpenAI-format API
    return _check_messages(messages)


def _check_messages(messages: Any) -> Refusal | None:
    if not isinstance(messages, list) or not messages:
        return Refusal(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            "messages",
            "empty_array",
        )
    waiting: list[str] = []  # call ids of the latest assistant message still without an answer
    answering = False  # inside the run of tool messages after an assistant's calls
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            return Refusal(
                f"Invalid value: '{role}'. Supported values are: {sorted(_ROLES)}.", f"messages.[{i}].role"
            )
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not answering or call_id not in waiting:
                return Refusal(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding"
                    " message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            waiting.remove(call_id)
            continue
        if waiting:
            return _unanswered(waiting, i)
        answering = False
        if role == "assistant" and message.get("tool_calls"):
            waiting = [call.get("id") for call in message["tool_calls"]]
            answering = True
        if role == "user" and isinstance(message.get("content"), list):
            for part in message["content"]:
                if not isinstance(part, dict) or part.get("type") not in _USER_PARTS:
                    return Refusal(
                        f"Invalid content part in messages[{i}]: {part!r}.", f"messages.[{i}].content"
                    )
    return _unanswered(waiting, len(messages)) if waiting else None


def _unanswered(waiting: list[str], i: int) -> Refusal:
    return Refusal(
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each"
        f" 'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(waiting)}",
        f"messages.[{i}].role",
    )


# -- answers as bytes ------------------------------------------------------------------------


def completion_body(answer: Answer, chat_id: str, model: str, created: int = 0) -> bytes:
    """A non-streamed `chat.completion` for `answer`."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or None, "refusal": None}
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning
    if answer.tool_calls:
        message["tool_calls"] = [
            {
                "id": _call_id(call, n),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for n, call in enumerate(answer.tool_calls)
        ]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish}
    body = {
        "id": chat_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(answer, len(_pieces(answer, Quirks()))),
        "system_fingerprint": "fp_fake",
    }
    return json.dumps(body, ensure_ascii=False).encode()


def stream_events(
    answer: Answer,
    chat_id: str,
    model: str,
    *,
    include_usage: bool = True,
    quirks: Quirks | None = None,
    created: int = 0,
) -> list[bytes]:
    """The SSE events of a streamed `answer`, `[DONE]` last."""
    quirks = quirks or Quirks()
    head = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model}
    head["system_fingerprint"] = "fp_fake"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None  # as OpenAI does on every chunk but the last
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    pieces = _pieces(answer, quirks)
    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk(delta) for delta in pieces]
    events.append(chunk({}, answer.finish))
    if include_usage:
        usage = {**head, "choices": [], "usage": _usage(answer, len(pieces))}
        events.append(b"data: " + json.dumps(usage).encode() + b"\n\n")
    events.append(_DONE)
    if quirks.comments:
        events = [b": OPENROUTER PROCESSING\n\n", *(e + b": keep-alive\n\n" for e in events)]
    if quirks.crlf:
        events = [e.replace(b"\n", b"\r\n") for e in events]
    return events


def _pieces(answer: Answer, quirks: Quirks) -> list[dict[str, Any]]:
    """The deltas of an answer, one per chunk."""
    deltas: list[dict[str, Any]] = [
        {"content": None, quirks.reasoning_field: word} for word in _WORDS.findall(answer.reasoning)
    ]
    deltas += [{"content": word} for word in _WORDS.findall(answer.text)]
    for n, call in enumerate(answer.tool_calls):
        deltas += [{"tool_calls": [fragment]} for fragment in _fragments(call, n, quirks)]
    return deltas


def _fragments(call: ToolCall, n: int, quirks: Quirks) -> list[dict[str, Any]]:
    step = max(quirks.argument_piece, 1)
    pieces = [call.arguments[i : i + step] for i in range(0, len(call.arguments), step)]
    fragments: list[dict[str, Any]] = [
        {"function": {"arguments": ""}},
        *({"function": {"arguments": p}} for p in pieces),
    ]
    first = fragments[0]
    first["type"] = "function"
    named = fragments[1] if quirks.late_name and len(fragments) > 1 else first
    named["function"] = {"name": call.name, **named["function"]}
    index = {"per_call": n, "zero": 0, "sparse": 2 * n + 1}.get(quirks.index)
    for i, fragment in enumerate(fragments):
        if index is not None:
            fragment["index"] = index
        if quirks.ids == "every" or (quirks.ids == "first" and i == 0):
            fragment["id"] = _call_id(call, n)
    return [dict(sorted(fragment.items())) for fragment in fragments]


def _call_id(call: ToolCall, n: int) -> str:
    return call.id or f"call_{n}"


def _usage(answer: Answer, pieces: int) -> dict[str, Any]:
    completion = answer.completion_tokens or pieces
    reasoning = len(_WORDS.findall(answer.reasoning))
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": answer.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": answer.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
    }


def awkward_writes(data: bytes) -> list[bytes]:
    """`data` cut for sending: inside lines, inside the first multi-byte character, and
    with several events in some writes."""
    cuts = set(itertools.accumulate(itertools.islice(itertools.cycle(_WRITE_SIZES), len(data))))
    lead = next((i for i, byte in enumerate(data) if byte >= 0xC0), None)
    if lead is not None:
        cuts.add(lead + 1)
    points = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# -- the server ------------------------------------------------------------------------------


class FakeOpenAI(FakeServer[Behavior]):
    """A loopback HTTP/1.1 server that speaks OpenAI's Chat Completions and misbehaves on demand.

    `behavior`, `script`, `requests` (`SeenRequest`, `.json()` for the body) and `keep`
    work as in `FakeServer`; `refusals` holds what was refused as invalid. With
    `max_tokens_ok` False it refuses `max_tokens` like OpenAI's reasoning models.
    """

    def __init__(self, name: str = "fake-openai", port: int = 0) -> None:
        super().__init__(name, port, Behavior())
        self.refusals: list[Refusal] = []
        self.max_tokens_ok = True

    @property
    def url(self) -> str:
        return super().url + "/v1"

    def reset(self) -> None:
        """`FakeServer.reset` (answer `TEXT` again), and forget the refusals and `max_tokens_ok`."""
        with self._cond:
            super().reset()
            self.refusals.clear()
            self.max_tokens_ok = True

    # -- answers -----------------------------------------------------------------------------

    def _head(self, x: Exchange, b: Behavior, status: int, content_type: bytes, length: int | None) -> bytes:
        lines = [b"x-request-id: req_fake_%d\r\nopenai-processing-ms: 1\r\n" % x.number]
        lines.append(f"x-fake-name: {self.name}\r\n".encode())
        lines += [f"{n}: {v}\r\n".encode("latin-1") for n, v in b.headers]
        return response_head(status, content_type, length, lines, x.keep_alive)

    async def _send_json(self, x: Exchange, b: Behavior, status: int, body: bytes) -> bool:
        x.writer.write(self._head(x, b, status, JSON, len(body)) + body)
        await x.writer.drain()
        return x.keep_alive

    async def _answer(self, x: Exchange, b: Behavior) -> bool:
        """Send the response `b` asks for; return whether the connection can be reused."""
        if b.delay:
            await asyncio.sleep(b.delay)
        if b.kind == "hang":
            await asyncio.Event().wait()
        if b.kind == "status":
            return await self._send_json(x, b, b.status, error_body(b.status, b.error_code, b.message))
        path = x.seen.path.split("?", 1)[0]
        if x.seen.method == "GET" and path.endswith("/v1/models"):
            return await self._send_json(x, b, 200, _models())
        if x.seen.method == "POST" and path.endswith("/v1/chat/completions"):
            return await self._completions(x, b)
        message = f"Invalid URL ({x.seen.method} {path})"
        return await self._send_json(x, b, 404, error_body(404, message=message))

    async def _completions(self, x: Exchange, b: Behavior) -> bool:
        try:
            payload = json.loads(x.seen.body)
        except ValueError:
            payload = None
        refusal = check_request(payload, max_tokens_ok=self.max_tokens_ok)
        if refusal is not None:
            with self._cond:
                self.refusals.append(refusal)
            body = error_body(400, refusal.code or "", refusal.message, refusal.param)
            return await self._send_json(x, b, 400, body)
        chat_id = f"chatcmpl-fake{x.number}"
        model = str(payload.get("model"))
        if payload.get("stream") is not True:
            if b.kind == "stall":
                await asyncio.Event().wait()
            body = completion_body(b.answer, chat_id, model, int(time.time()))
            if b.kind == "cut":
                x.writer.write(self._head(x, b, 200, JSON, len(body)) + body[: len(body) // 2])
                await x.writer.drain()
                x.writer.transport.abort()
                return False
            return await self._send_json(x, b, 200, body)
        include_usage = (payload.get("stream_options") or {}).get("include_usage") is True
        events = stream_events(
            b.answer, chat_id, model, include_usage=include_usage, quirks=b.quirks, created=int(time.time())
        )
        if b.kind == "error_chunk":
            error = json.dumps({"error": error_object(b.status, b.error_code, b.message)}).encode()
            events = [*events[: b.after_events], b"data: " + error + b"\n\n"]
        elif b.kind in ("cut", "stall"):
            events = events[: b.after_events]
        return await self._stream(x, b, events)

    async def _stream(self, x: Exchange, b: Behavior, events: list[bytes]) -> bool:
        writer = x.writer
        writer.write(self._head(x, b, 200, EVENT_STREAM, None))
        await writer.drain()
        for i, piece in enumerate(awkward_writes(b"".join(events)) if b.split else events):
            if i and b.event_delay:
                await asyncio.sleep(b.event_delay)
            writer.write(chunk(piece))
            await writer.drain()
        if b.kind == "cut":
            writer.transport.abort()
            return False
        if b.kind == "stall":
            await asyncio.Event().wait()
        writer.write(LAST_CHUNK)
        await writer.drain()
        return x.keep_alive


def _models() -> bytes:
    models = [
        {"id": name, "object": "model", "created": 1700000000, "owned_by": "fake"}
        for name in ("gpt-fake", "gpt-fake-mini")
    ]
    return json.dumps({"object": "list", "data": models}).encode()


def main(argv: list[str] | None = None) -> int:
    """`python -m claude_code_fallback.fakes.openai`: one fake in the foreground (the benchmark's)."""
    parser = argparse.ArgumentParser(
        prog="python -m claude_code_fallback.fakes.openai",
        description="Run a fake OpenAI Chat Completions API on 127.0.0.1 in the foreground.",
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    parser.add_argument("--name", default="fake-openai", help="sent back in the x-fake-name header")
    parser.add_argument("--text", default=TEXT.text, help="the answer's text, a word per event")
    parser.add_argument("--event-delay", type=float, default=0.0, help="seconds between events")
    parser.add_argument("--split", action="store_true", help="cut streams into awkward TCP writes")
    args = parser.parse_args(argv)
    fake = FakeOpenAI(args.name, args.port)
    fake.behavior = Behavior(answer=Answer(text=args.text), event_delay=args.event_delay, split=args.split)
    return serve_in_foreground(fake, "fakeopenai")


if __name__ == "__main__":
    sys.exit(main())
