"""Anthropic Messages <-> OpenAI Chat Completions, as pure functions on dicts and bytes.

An endpoint that only speaks Chat Completions (OpenRouter, OpenAI, Gemini's and
DeepSeek's compatible APIs, Ollama, vLLM, LM Studio, llama.cpp) can still serve Claude
Code when everything else is down, if the request is rewritten on the way out and the
answer on the way back. Nothing here does I/O: `chat_request` shapes the body to send,
`anthropic_message` turns a JSON answer into a Message, `StreamTranslator` turns the
OpenAI event stream into Anthropic events as bytes arrive, and `anthropic_error` gives an
error body Claude Code understands. A request whose content has no Chat Completions form
raises the providers' `Untranslatable` before anything is sent, so the client gets a clear
400 instead of an answer to a silently different question.

Only fields Chat Completions defines are sent, because strict servers (OpenAI's own)
answer 400 to any argument they do not know. The stream side runs once per event of
every answer, so it avoids regexes and re-encoding: one JSON decode per chunk and one
string template per event.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from ..sse import Usage, error_type, int_or_zero, split_blocks
from . import Untranslatable

_MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_NAME_LIMIT = 64  # OpenAI's limit on a function name; Anthropic allows 128
_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_JOIN = "\n\n"


# -- request: Anthropic -> Chat Completions -------------------------------------------------


def chat_request(
    payload: Mapping[str, Any],
    model: str,
    *,
    streaming: bool,
    max_tokens_field: str = "max_tokens",
    reasoning_effort: bool = False,
) -> dict[str, Any]:
    """The Chat Completions body for an Anthropic Messages `payload`, asking for `model`.

    `max_tokens_field` names the field that carries `max_tokens` (`max_completion_tokens`
    for OpenAI's reasoning models). With `reasoning_effort`, `thinking` becomes
    `reasoning_effort`; otherwise it is dropped like every field Chat Completions lacks.
    Raises `Untranslatable` for content without an OpenAI form.
    """
    if max_tokens_field not in _MAX_TOKENS_FIELDS:
        raise ValueError(f"max_tokens_field must be one of {_MAX_TOKENS_FIELDS}, not {max_tokens_field!r}")
    messages = _system_messages(payload.get("system"))
    for message in _list(payload.get("messages"), "messages"):
        messages += _messages(message)
    chat: dict[str, Any] = {"model": model, "messages": messages}
    tools = [tool for tool in map(_tool, payload.get("tools") or ()) if tool is not None]
    if tools:
        chat["tools"] = tools
        chat.update(_tool_choice(payload.get("tool_choice")))
    if payload.get("max_tokens") is not None:
        chat[max_tokens_field] = payload["max_tokens"]
    if payload.get("stop_sequences"):
        chat["stop"] = list(payload["stop_sequences"])
    for key in ("temperature", "top_p"):
        if payload.get(key) is not None:
            chat[key] = payload[key]
    if reasoning_effort and (effort := _effort(payload.get("thinking"))):
        chat["reasoning_effort"] = effort
    if streaming:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def long_tool_names(payload: Mapping[str, Any]) -> dict[str, str]:
    """The names `chat_request` shortened, as {sent name: Anthropic name}.

    Claude Code's MCP tools (`mcp__<server>__<tool>`) can pass OpenAI's 64 characters;
    give this to `anthropic_message` or `StreamTranslator` so answers name them as asked.
    """
    names = {tool.get("name") for tool in payload.get("tools") or () if isinstance(tool, dict)}
    return {_function_name(name): name for name in names if isinstance(name, str) and len(name) > _NAME_LIMIT}


def _function_name(name: str) -> str:
    if len(name) <= _NAME_LIMIT:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[: _NAME_LIMIT - 9]}_{digest}"


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise Untranslatable(f"{where} must be a list")
    return value


def _system_messages(system: Any) -> list[dict[str, Any]]:
    if not system:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    texts = []
    for block in _list(system, "system"):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise Untranslatable(f"system: a {kind!r} block cannot be sent to a Chat Completions endpoint")
        texts.append(block.get("text", ""))
    return [{"role": "system", "content": _JOIN.join(texts)}]


def _messages(message: Any) -> list[dict[str, Any]]:
    role = message.get("role") if isinstance(message, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if role == "user":
        return _user(content)
    if role == "assistant":
        return [_assistant(content)]
    if role == "system":  # Claude Code's mid-conversation instructions: Chat Completions has them too
        return _system_messages(content)
    raise Untranslatable(f"messages: role {role!r} cannot be sent to a Chat Completions endpoint")


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = _list(content, "message content")
    for block in blocks:
        if not isinstance(block, dict):
            raise Untranslatable(f"message content: {block!r} is not a content block")
    return blocks


def _user(content: Any) -> list[dict[str, Any]]:
    """Tool results first, each its own `tool` message, then the rest of the turn."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in _blocks(content):
        kind = block.get("type")
        if kind == "tool_result":
            results.append(_tool_message(block))
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_image_part(block.get("source")))
        elif kind not in _DROPPED_BLOCKS:
            raise _untranslatable(kind)
    if parts or not results:
        results.append({"role": "user", "content": _content(parts)})
    return results


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    # A plain string where there is only text: DeepSeek, llama.cpp and older Ollama take
    # no content arrays.
    if all(part["type"] == "text" for part in parts):
        return _JOIN.join(part["text"] for part in parts)
    return parts


def _assistant(content: Any) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in _blocks(content):
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append(_tool_call(block))
        elif kind not in _DROPPED_BLOCKS:
            raise _untranslatable(kind)
    message: dict[str, Any] = {"role": "assistant", "content": _JOIN.join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def _tool_call(block: Mapping[str, Any]) -> dict[str, Any]:
    arguments = json.dumps(block.get("input") or {}, ensure_ascii=False, separators=(",", ":"))
    function = {"name": _function_name(str(block.get("name", ""))), "arguments": arguments}
    return {"id": str(block.get("id", "")), "type": "function", "function": function}


def _tool_message(block: Mapping[str, Any]) -> dict[str, Any]:
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for part in _blocks(content):
            kind = part.get("type")
            if kind == "image":
                raise Untranslatable(
                    "A tool_result holds an image, which a Chat Completions endpoint cannot take"
                    " in a tool message; this request cannot go to an OpenAI-compatible endpoint."
                )
            if kind != "text":
                raise _untranslatable(kind, "inside a tool_result")
            texts.append(part.get("text", ""))
        text = _JOIN.join(texts)
    return {"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text}


def _image_part(source: Any) -> dict[str, Any]:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif kind == "url":
        url = str(source.get("url", ""))
    else:
        raise Untranslatable(
            f"An image with a {kind!r} source cannot be sent to a Chat Completions endpoint;"
            " only base64 and URL images can."
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _untranslatable(kind: Any, where: str = "") -> Untranslatable:
    place = f" {where}" if where else ""
    return Untranslatable(
        f"A {kind!r} content block{place} has no Chat Completions form;"
        " this request cannot go to an OpenAI-compatible endpoint."
    )


def _tool(tool: Any) -> dict[str, Any] | None:
    # Server tools (web search, code execution, ...) run on Anthropic's side: no schema,
    # nothing an OpenAI model could call.
    if not isinstance(tool, dict) or "input_schema" not in tool or tool.get("type") not in (None, "custom"):
        return None
    parameters = tool["input_schema"]
    if isinstance(parameters, dict) and "$schema" in parameters:
        # Gemini's compatible API refuses the meta-schema keyword.
        parameters = {k: v for k, v in parameters.items() if k != "$schema"}
    function: dict[str, Any] = {"name": _function_name(str(tool.get("name", "")))}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> dict[str, Any]:
    if not isinstance(choice, dict):
        return {}
    kind = choice.get("type")
    chat: dict[str, Any] = {}
    if kind in ("auto", "none"):
        chat["tool_choice"] = kind
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "tool":
        name = _function_name(str(choice.get("name", "")))
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        chat["parallel_tool_calls"] = False
    return chat


def _effort(thinking: Any) -> str | None:
    if not isinstance(thinking, dict):
        return None
    if thinking.get("type") == "adaptive":
        return "medium"
    if thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int):
        return "medium"
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


# -- answer: Chat Completions -> Anthropic ---------------------------------------------------


def anthropic_message(
    chat: Mapping[str, Any], client_model: str, tool_names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The Anthropic Message for a non-streamed Chat Completions answer.

    Tool arguments that do not parse as a JSON object are kept as `{"_raw": <text>}`, so
    the client's input check names the problem instead of a missing parameter.
    """
    choices = chat.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = _text_of(message.get("content")) or _text_of(message.get("refusal"))
    if text:
        content.append({"type": "text", "text": text})
    calls = list(message.get("tool_calls") or ())
    if isinstance(message.get("function_call"), dict):
        calls.append({"function": message["function_call"]})
    names = tool_names or {}
    for call in calls:
        function = call.get("function") or {}
        name = str(function.get("name") or "")
        tool_id = tool_use_id(call.get("id"))
        input_ = _input(function.get("arguments"))
        content.append({"type": "tool_use", "id": tool_id, "name": names.get(name, name), "input": input_})
    reason, sequence = stop_reason(choice, bool(calls))
    return {
        "id": message_id(chat.get("id")),
        "type": "message",
        "role": "assistant",
        "model": client_model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": _usage_dict(usage_of(chat.get("usage"))),
    }


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # some servers answer with content parts
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _input(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):
        value = None
    return value if isinstance(value, dict) else {"_raw": str(arguments)}


def message_id(chat_id: Any) -> str:
    """An Anthropic message id derived from the OpenAI one (random when there is none)."""
    return f"msg_{chat_id}" if isinstance(chat_id, str) and chat_id else f"msg_{uuid.uuid4().hex}"


def tool_use_id(call_id: Any) -> str:
    """The OpenAI call id, made fit for Anthropic's `^[a-zA-Z0-9_-]+$` (random when there is none).

    The id goes back to whichever endpoint serves the next turn, Anthropic's own included.
    """
    if not isinstance(call_id, str) or not call_id:
        return f"toolu_{uuid.uuid4().hex[:24]}"
    return _ID_CHARS.sub("_", call_id)


_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(choice: Mapping[str, Any], called_tools: bool) -> tuple[str, str | None]:
    """Anthropic's `stop_reason` and `stop_sequence` for a choice's `finish_reason`.

    Which stop sequence ended the text is known only where the server says so (vLLM's
    `stop_reason`, SGLang's `matched_stop`). Servers that answer `stop` after tool calls
    (older Ollama) still mean `tool_use`.
    """
    finish = choice.get("finish_reason")
    reason = _STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    if called_tools and reason == "end_turn":
        return "tool_use", None
    if finish == "stop":
        matched = choice.get("stop_reason") or choice.get("matched_stop")
        if isinstance(matched, str) and matched:
            return "stop_sequence", matched
    return reason, None


def usage_of(usage: Any) -> Usage:
    """Token counts of a Chat Completions `usage`, split the way Anthropic counts them.

    OpenAI's `prompt_tokens` include the cached ones; Anthropic's `input_tokens` do not,
    and clients add `cache_read_input_tokens` to them to size the context.
    """
    if not isinstance(usage, dict):
        return Usage()
    prompt = int_or_zero(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = int_or_zero(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = cached or int_or_zero(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
    return Usage(
        input=max(prompt - cached, 0), output=int_or_zero(usage.get("completion_tokens")), cache_read=cached
    )


def _usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.input,
        "output_tokens": usage.output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cache_read,
    }


# -- stream: Chat Completions chunks -> Anthropic events -------------------------------------

_MESSAGE_START = (
    'event: message_start\ndata: {"type":"message_start","message":{"id":%s,"type":"message",'
    '"role":"assistant","model":%s,"content":[],"stop_reason":null,"stop_sequence":null,"usage":'
    '{"input_tokens":%d,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":%d}}}\n\n'
)
_BLOCK_START = (
    'event: content_block_start\ndata: {"type":"content_block_start","index":%d,"content_block":%s}\n\n'
)
_BLOCK_STOP = 'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_TEXT_DELTA = (
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    '"delta":{"type":"text_delta","text":%s}}\n\n'
)
_THINKING_DELTA = (
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    '"delta":{"type":"thinking_delta","thinking":%s}}\n\n'
)
_JSON_DELTA = (
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    '"delta":{"type":"input_json_delta","partial_json":%s}}\n\n'
)
_MESSAGE_DELTA = (
    'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":%s,"stop_sequence":%s},'
    '"usage":%s}\n\n'
)
_MESSAGE_STOP = 'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_TEXT_BLOCK = '{"type":"text","text":""}'
_THINKING_BLOCK = '{"type":"thinking","thinking":"","signature":""}'
_TOOL_BLOCK = '{"type":"tool_use","id":%s,"name":%s,"input":{}}'


class _Call:
    """One tool call as its fragments arrive; `block` is its content block once started."""

    __slots__ = ("block", "index", "name", "pending", "raw_id", "tool_id")

    def __init__(self, raw_id: str | None, index: Any) -> None:
        self.raw_id = raw_id
        self.tool_id = tool_use_id(raw_id)
        self.index = index
        self.name = ""
        self.pending: list[str] = []
        self.block: int | None = None


class StreamTranslator:
    """Turns a Chat Completions event stream into an Anthropic one, as the bytes arrive.

    `feed` takes raw SSE bytes in any chunking and returns the complete Anthropic events
    they finish (or b""). `message_start` goes out with the first chunk, so an error chunk
    that comes first stays the first event, which the proxy fails over on. Usage comes
    after the finish_reason in a chunk of its own, so `message_delta` and `message_stop`
    wait for `[DONE]`, or for `end()` at EOF when a finish_reason came.

    Tool calls get a block each, whatever the provider does with `index` (reused, skipped,
    absent) and `id` (first fragment only, every fragment, none). A fragment with an id
    not seen yet starts a new call; one without an id continues the latest call with its
    `index`, unless both name a function, which means a new call; a call that never has
    an id gets a random `toolu_` one. A call's block starts once its name is known;
    arguments that came before are sent then. Fragments for a
    call whose block has already closed (interleaved parallel calls; no provider is known
    to send them) are dropped, as an Anthropic stream cannot reopen a block.
    """

    def __init__(self, client_model: str, tool_names: Mapping[str, str] | None = None) -> None:
        self.client_model = client_model
        self.started = False  # message_start sent
        self.finished = False  # message_stop or an error sent; the rest is ignored
        self.usage = Usage()
        self.error: dict[str, str] | None = None  # the Anthropic error sent, if any
        self.finish_reason: str | None = None  # the OpenAI one
        self._tool_names = dict(tool_names or {})
        self._buffer = b""
        self._block = -1  # index of the latest block
        self._open: str | None = None  # type of the open block, if one is open
        self._calls: list[_Call] = []
        self._matched_stop: Any = None
        self._usage_seen = False

    def feed(self, data: bytes) -> bytes:
        """The Anthropic events that `data` completes, as SSE bytes."""
        if self.finished:
            return b""
        events, self._buffer = split_blocks(self._buffer, data)
        if not events:
            return b""
        out: list[str] = []
        for event in events:
            payload = event[6:] if event[:6] == b"data: " and b"\n" not in event else _data_field(event)
            if not payload:
                continue
            if payload[:6] == b"[DONE]":
                self._close(out)
                break
            chunk = _json_object(payload)
            if chunk is not None:
                self._chunk(chunk, out)
                if self.finished:
                    break
        return "".join(out).encode() if out else b""

    def end(self) -> bytes:
        """At EOF: the last event even without its blank line, then, if a finish_reason came
        but `[DONE]` did not, the events that close the message. A stream cut before its
        finish_reason stays unclosed: the client must see it as broken."""
        out = self.feed(b"\n\n")
        if self.finished or self.finish_reason is None:
            return out
        closing: list[str] = []
        self._close(closing)
        return out + "".join(closing).encode()

    @property
    def content_started(self) -> bool:
        """Whether a content block went out: from then on an error cannot be failed over."""
        return self._block >= 0

    @property
    def stop_reason(self) -> str | None:
        """Anthropic's stop_reason once a finish_reason came."""
        return None if self.finish_reason is None else self._stop()[0]

    def _stop(self) -> tuple[str, str | None]:
        choice = {"finish_reason": self.finish_reason, "stop_reason": self._matched_stop}
        return stop_reason(choice, bool(self._calls))

    # -- one chunk ---------------------------------------------------------------------------

    def _chunk(self, chunk: dict[str, Any], out: list[str]) -> None:
        error = chunk.get("error")
        if error:
            self._error(error, out)
            return
        usage = chunk.get("usage")
        if usage:
            self.usage = usage_of(usage)
            self._usage_seen = True
        if not self.started:
            self._start(chunk, out)
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta")
            if delta:
                self._delta(delta, out)
            finish = choice.get("finish_reason")
            if finish:
                self.finish_reason = finish
                self._matched_stop = choice.get("stop_reason") or choice.get("matched_stop")

    def _delta(self, delta: dict[str, Any], out: list[str]) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning and isinstance(reasoning, str):
            if self._open != "thinking":
                self._open_block("thinking", _THINKING_BLOCK, out)
            out.append(_THINKING_DELTA % (self._block, _quote(reasoning)))
        text = delta.get("content") or delta.get("refusal")
        if text and isinstance(text, str):
            if self._open != "text":
                self._open_block("text", _TEXT_BLOCK, out)
            out.append(_TEXT_DELTA % (self._block, _quote(text)))
        calls = delta.get("tool_calls")
        if calls and isinstance(calls, list):
            for fragment in calls:
                if isinstance(fragment, dict):
                    self._fragment(fragment, out)

    def _open_block(self, kind: str, block: str, out: list[str]) -> None:
        if self._open is not None:
            out.append(_BLOCK_STOP % self._block)
        self._block += 1
        self._open = kind
        out.append(_BLOCK_START % (self._block, block))

    def _start(self, chunk: dict[str, Any], out: list[str]) -> None:
        self.started = True
        message = _quote(message_id(chunk.get("id")))
        out.append(
            _MESSAGE_START % (message, _quote(self.client_model), self.usage.input, self.usage.cache_read)
        )

    # -- tool calls --------------------------------------------------------------------------

    def _fragment(self, fragment: dict[str, Any], out: list[str]) -> None:
        function = fragment.get("function")
        if not isinstance(function, dict):
            function = {}
        call = self._call_for(fragment, bool(function.get("name")))
        if function.get("name") and not call.name:
            call.name = str(function["name"])
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, str):
            arguments = json.dumps(arguments, separators=(",", ":"))
        if call.block is None:
            if arguments:
                call.pending.append(arguments)
            if call.name:
                self._start_call(call, out)
        elif arguments and call.block == self._block and self._open == "tool_use":
            out.append(_JSON_DELTA % (self._block, _quote(arguments)))

    def _call_for(self, fragment: dict[str, Any], named: bool) -> _Call:
        raw_id = fragment.get("id")
        index = fragment.get("index")
        calls = self._calls
        if raw_id and isinstance(raw_id, str):
            for call in reversed(calls):
                if call.raw_id == raw_id:
                    return call
            return self._new_call(raw_id, index)
        for call in reversed(calls):
            if index is None or call.index == index:
                if named and call.name:
                    break
                return call
        return self._new_call(None, index)

    def _new_call(self, raw_id: str | None, index: Any) -> _Call:
        call = _Call(raw_id, index)
        self._calls.append(call)
        return call

    def _start_call(self, call: _Call, out: list[str]) -> None:
        name = self._tool_names.get(call.name, call.name)
        self._open_block("tool_use", _TOOL_BLOCK % (_quote(call.tool_id), _quote(name)), out)
        call.block = self._block
        if call.pending:
            out.append(_JSON_DELTA % (self._block, _quote("".join(call.pending))))
            call.pending = []

    # -- the end -----------------------------------------------------------------------------

    def _close(self, out: list[str]) -> None:
        if not self.started:
            self._start({}, out)
        for call in self._calls:
            if call.block is None:  # never named: sent as it is rather than lost
                self._start_call(call, out)
        if self._open is not None:
            out.append(_BLOCK_STOP % self._block)
            self._open = None
        reason, sequence = self._stop()
        usage: dict[str, int] = {"output_tokens": self.usage.output}
        if self._usage_seen:
            usage["input_tokens"] = self.usage.input
            usage["cache_read_input_tokens"] = self.usage.cache_read
        quoted = _quote(sequence) if sequence is not None else "null"
        out.append(_MESSAGE_DELTA % (_quote(reason), quoted, _compact(usage)))
        out.append(_MESSAGE_STOP)
        self.finished = True

    def _error(self, error: Any, out: list[str]) -> None:
        kind, message = stream_error(error)
        self.error = {"type": kind, "message": message}
        out.append(f"event: error\ndata: {_compact({'type': 'error', 'error': self.error})}\n\n")
        self.finished = True


_decoder = json.JSONDecoder()


def _json_object(payload: bytes) -> dict[str, Any] | None:
    """The chunk in an event's data, or None for data that is not a JSON object."""
    try:
        text = payload.decode()
        # raw_decode is json.loads without its encoding detection and whitespace regexes:
        # a third of the time spent per chunk.
        value = _decoder.raw_decode(text)[0] if text[:1] == "{" else json.loads(text)
    except ValueError:
        return None  # a line the server did not mean as a chunk; the next one may be fine
    return value if isinstance(value, dict) else None


def _data_field(event: bytes) -> bytes:
    """The data of one SSE event in its general form: comments, other fields, several lines."""
    lines = []
    for line in event.split(b"\n"):
        if line[:5] == b"data:":
            lines.append(line[6:] if line[5:6] == b" " else line[5:])
    return b"\n".join(lines)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# -- errors ----------------------------------------------------------------------------------

_DEFAULT_MESSAGES = {
    "invalid_request_error": "The endpoint refused the request as invalid.",
    "authentication_error": "The endpoint refused the API key.",
    "billing_error": "The endpoint's account has no credit left.",
    "permission_error": "The API key has no permission for this model or resource.",
    "not_found_error": "The endpoint does not know this model or path.",
    "request_too_large": "The request is larger than the endpoint takes.",
    "rate_limit_error": "The endpoint's rate limit was reached.",
    "timeout_error": "The endpoint timed out.",
    "overloaded_error": "The endpoint is overloaded.",
    "api_error": "The endpoint had an internal error.",
}

# Words in an error's `type`/`code`/`status` (OpenAI, OpenRouter, Gemini, vLLM), most
# telling first: "invalid_api_key" is about the key, not the request.
_ERROR_WORDS = (
    ("context_length", "invalid_request_error"),
    ("exceed_context", "invalid_request_error"),
    ("rate_limit", "rate_limit_error"),
    ("quota", "rate_limit_error"),
    ("resource_exhausted", "rate_limit_error"),
    ("too_many_requests", "rate_limit_error"),
    ("overload", "overloaded_error"),
    ("unavailable", "overloaded_error"),
    ("capacity", "overloaded_error"),
    ("timeout", "timeout_error"),
    ("deadline", "timeout_error"),
    ("auth", "authentication_error"),
    ("api_key", "authentication_error"),
    ("permission", "permission_error"),
    ("forbidden", "permission_error"),
    ("not_found", "not_found_error"),
    ("invalid", "invalid_request_error"),
    ("bad_request", "invalid_request_error"),
)


def anthropic_error(status: int, body: bytes) -> bytes:
    """The Anthropic error body for an OpenAI-style error answer with `status` (kept by the caller).

    Reads OpenAI's `{"error": {...}}`, Gemini's list of those, Ollama's `{"error": "..."}`,
    FastAPI's `{"detail": ...}` and plain text. A context-length error becomes the
    `invalid_request_error` Claude Code acts on (it compacts, or lowers max_tokens).
    """
    error = _error_object(body)
    kind = error_type(status)
    message = _error_message(error) or _DEFAULT_MESSAGES[kind]
    if kind in ("invalid_request_error", "request_too_large"):
        too_long = context_message(error, message)
        if too_long is not None:
            kind, message = "invalid_request_error", too_long
    return _compact({"type": "error", "error": {"type": kind, "message": message}}).encode()


def stream_error(error: Any) -> tuple[str, str]:
    """Anthropic's (type, message) for an error chunk inside a stream."""
    if not isinstance(error, dict):
        error = {"message": str(error)}
    code = error.get("code")
    status = (
        code if isinstance(code, int) and not isinstance(code, bool) else int_or_zero(error.get("status"))
    )
    if isinstance(code, str) and code.isdigit():
        status = int(code)
    if 400 <= status < 600:
        kind = error_type(status)
    else:
        words = f"{error.get('type')} {code} {error.get('status')}".lower()
        kind = next((kind for word, kind in _ERROR_WORDS if word in words), "api_error")
    message = _error_message(error) or _DEFAULT_MESSAGES[kind]
    if kind in ("invalid_request_error", "request_too_large", "api_error"):
        too_long = context_message(error, message)
        if too_long is not None:
            return "invalid_request_error", too_long
    return kind, message


def _error_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return {"message": text[:2000]} if text else {}
    if isinstance(value, list) and value:
        value = value[0]  # Gemini
    if not isinstance(value, dict):
        return {"message": str(value)} if value else {}
    inner = value.get("error")
    if isinstance(inner, dict):
        return inner
    if isinstance(inner, str):
        return {**value, "message": inner}
    if "detail" in value and "message" not in value:
        detail = value["detail"]
        return {"message": detail if isinstance(detail, str) else _compact(detail)}
    return value


def _error_message(error: Mapping[str, Any]) -> str:
    message = error.get("message")
    text = message if isinstance(message, str) else "" if message is None else _compact(message)
    metadata = error.get("metadata")
    raw = metadata.get("raw") if isinstance(metadata, dict) else None
    if isinstance(raw, str) and raw and raw not in text:
        # OpenRouter wraps the provider's own words, which say what went wrong.
        text = f"{text} ({raw[:1000]})" if text else raw[:1000]
    return text


_CONTEXT_WORDS = (
    "context_length_exceeded",
    "exceed_context_size",
    "maximum context length",
    "context window",
    "context length",
    "context size",
    "too many tokens",
    "prompt is too long",
    "input token count",
    "maximum model length",
)
_NUMBER = r"(\d[\d,]*)"
_LIMIT = [
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        rf"maximum context length is {_NUMBER}",
        rf"context length of (?:only )?{_NUMBER}",
        rf"maximum model length of {_NUMBER}",
        rf"maximum number of tokens allowed \({_NUMBER}\)",
        rf"context (?:window|size|limit) (?:of |is )?\(?{_NUMBER}",
        rf"> {_NUMBER} maximum",
    )
]
# (input, output) of a request whose prompt may fit but whose max_tokens do not.
_SPLIT = [
    (re.compile(pattern, re.IGNORECASE), order)
    for pattern, order in (
        (rf"{_NUMBER} (?:in the messages|of text input|in the prompt)\D*?{_NUMBER} (?:in|for) the", 1),
        (rf"requested {_NUMBER} output tokens and your prompt contains (?:at least )?{_NUMBER}", -1),
        (rf"has {_NUMBER} input tokens \({_NUMBER} >", 1),
    )
]
_TOTAL = [
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        rf"prompt is too long: {_NUMBER} tokens",
        rf"resulted in {_NUMBER} tokens",
        rf"total of (?:at least )?{_NUMBER} tokens",
        rf"requested (?:about )?{_NUMBER} tokens",
        rf"input token count \(?(?:of )?{_NUMBER}",
        rf"prompt \(length {_NUMBER}\)",
        rf"keep the first {_NUMBER} tokens",
    )
]


def context_message(error: Mapping[str, Any], message: str) -> str | None:
    """Anthropic's wording for a context-length error, or None when `error` is another one.

    `prompt is too long: <n> tokens > <max> maximum` when the prompt alone is too long;
    `input length and `max_tokens` exceed context limit: <in> + <out> > <max>` when only
    the two together are (Claude Code then lowers max_tokens); the numbers come from the
    message, or from llama.cpp's `n_prompt_tokens`/`n_ctx`.
    """
    words = f"{error.get('type')} {error.get('code')} {message}".lower()
    if not any(word in words for word in _CONTEXT_WORDS):
        return None
    limit = int_or_zero(error.get("n_ctx")) or _first(_LIMIT, message)
    total = int_or_zero(error.get("n_prompt_tokens")) or _first(_TOTAL, message)
    split = _split(message)
    if limit and split and split[0] <= limit:
        return (
            f"input length and `max_tokens` exceed context limit: {split[0]} + {split[1]} > {limit},"
            " decrease input length or `max_tokens` and try again"
        )
    if split and not total:
        total = split[0]
    if limit and total:
        return f"prompt is too long: {total} tokens > {limit} maximum"
    return f"prompt is too long: {message}" if message else "prompt is too long"


def _first(patterns: Iterable[re.Pattern[str]], text: str) -> int:
    for pattern in patterns:
        if match := pattern.search(text):
            return int(match[1].replace(",", ""))
    return 0


def _split(text: str) -> tuple[int, int] | None:
    for pattern, order in _SPLIT:
        if match := pattern.search(text):
            first, second = (int(match[i].replace(",", "")) for i in (1, 2))
            return (first, second) if order > 0 else (second, first)
    return None
