"""Tests for the Anthropic <-> Chat Completions translation (addon/providers/chat_completions.py).

Streams come from the fake OpenAI server's own bytes, over a socket or from its encoder,
and what the translator makes of them is read back by the anthropic SDK's accumulator.
"""

from __future__ import annotations

import inspect
import json
import string
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from addon import sse
from addon.fakes import openai as fakeopenai
from addon.fakes.openai import (
    ANSWERS,
    Answer,
    Behavior,
    FakeOpenAI,
    Quirks,
    ToolCall,
    check_request,
    stream_events,
)
from addon.providers.chat_completions import (
    StreamTranslator,
    Untranslatable,
    anthropic_error,
    anthropic_message,
    chat_request,
    error_type,
    long_tool_names,
    tool_use_id,
)

EVENTS = TypeAdapter(RawMessageStreamEvent)
WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "input_schema": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
    "cache_control": {"type": "ephemeral"},
}
# What Claude Code 2.1 sends besides the conversation: none of it is Chat Completions'.
CLAUDE_CODE_FIELDS = {
    "metadata": {"user_id": '{"device_id":"d","account_uuid":"","session_id":"s"}'},
    "thinking": {"type": "adaptive"},
    "output_config": {"effort": "high"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "service_tier": "auto",
    "container": "container_1",
    "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}],
    "top_k": 40,
    "some_future_field": {"x": 1},
}


def user(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def text(value: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


def payload(messages: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 1024,
        "messages": messages or [user(text("hi"))],
        **fields,
    }


# -- request ---------------------------------------------------------------------------------


def test_the_model_is_the_callers_and_max_tokens_carry_over() -> None:
    chat = chat_request(payload(), "gpt-4o", streaming=False)
    assert chat == {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1024}


def test_max_tokens_go_where_the_caller_says() -> None:
    chat = chat_request(payload(), "o3", streaming=False, max_tokens_field="max_completion_tokens")
    assert chat["max_completion_tokens"] == 1024 and "max_tokens" not in chat
    with pytest.raises(ValueError, match="max_tokens_field"):
        chat_request(payload(), "o3", streaming=False, max_tokens_field="max_output_tokens")


def test_a_stream_asks_for_usage() -> None:
    chat = chat_request(payload(stream=True), "m", streaming=True)
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert "stream" not in chat_request(payload(stream=True), "m", streaming=False)


def test_system_blocks_become_one_system_message_without_cache_control() -> None:
    system = [text("You are Claude Code."), text("Be brief.", cache_control={"type": "ephemeral"})]
    chat = chat_request(payload(system=system), "m", streaming=False)
    assert chat["messages"][0] == {"role": "system", "content": "You are Claude Code.\n\nBe brief."}
    assert chat_request(payload(system="Plain."), "m", streaming=False)["messages"][0]["content"] == "Plain."


def test_text_blocks_join_into_a_string_and_cache_control_goes() -> None:
    message = user(
        text("<system-reminder>x</system-reminder>"), text("hi", cache_control={"type": "ephemeral"})
    )
    chat = chat_request(payload([message]), "m", streaming=False)
    assert chat["messages"] == [{"role": "user", "content": "<system-reminder>x</system-reminder>\n\nhi"}]


def test_history_with_tool_calls_and_results_keeps_openais_order() -> None:
    messages = [
        user(text("weather in Bern and Zürich?")),
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "two calls", "signature": "sig"},
                {"type": "redacted_thinking", "data": "xyz"},
                text("Checking both."),
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Bern"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Zürich"}},
            ],
        },
        user(
            text("also, hurry", cache_control={"type": "ephemeral"}),
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {
                "type": "tool_result",
                "tool_use_id": "toolu_2",
                "content": [text("rain"), text("5 °C")],
                "is_error": False,
            },
        ),
    ]
    chat = chat_request(payload(messages, tools=[WEATHER_TOOL]), "m", streaming=False)
    assert chat["messages"] == [
        {"role": "user", "content": "weather in Bern and Zürich?"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Bern"}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Zürich"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "rain\n\n5 °C"},
        {"role": "user", "content": "also, hurry"},
    ]
    assert check_request(chat) is None


def test_an_assistant_turn_of_only_tool_calls_has_null_content() -> None:
    messages = [
        user(text("q")),
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        user({"type": "tool_result", "tool_use_id": "t1"}),
    ]
    chat = chat_request(payload(messages), "m", streaming=False)
    assert (
        chat["messages"][1]["content"] is None
        and chat["messages"][1]["tool_calls"][0]["function"]["arguments"] == "{}"
    )
    assert chat["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": ""}
    assert len(chat["messages"]) == 3


def test_images_become_image_url_parts() -> None:
    message = user(
        text("what is this?"),
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
        {
            "type": "image",
            "source": {"type": "url", "url": "https://example.com/cat.png"},
            "cache_control": {},
        },
    )
    chat = chat_request(payload([message]), "m", streaming=False)
    assert chat["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    assert check_request(chat) is None


@pytest.mark.parametrize(
    "block",
    [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}},
        {"type": "search_result", "source": "s", "title": "t", "content": [text("x")]},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
        {"type": "container_upload", "file_id": "file_1"},
    ],
)
def test_blocks_without_an_openai_form_are_untranslatable(block: dict[str, Any]) -> None:
    with pytest.raises(Untranslatable, match=repr(block["type"])):
        chat_request(payload([user(text("hi"), block)]), "m", streaming=False)
    with pytest.raises(Untranslatable, match=repr(block["type"])):
        chat_request(
            payload([user(text("q")), {"role": "assistant", "content": [block]}]), "m", streaming=False
        )


def test_an_image_from_the_files_api_is_untranslatable() -> None:
    image = {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
    with pytest.raises(Untranslatable, match="'file' source"):
        chat_request(payload([user(image)]), "m", streaming=False)


def test_an_image_inside_a_tool_result_is_untranslatable_and_says_so() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [text("screenshot:"), image]}
    with pytest.raises(Untranslatable, match="tool_result holds an image"):
        chat_request(payload([user(result)]), "m", streaming=False)


def test_untranslatable_is_a_value_error_with_a_sentence_for_the_client() -> None:
    with pytest.raises(ValueError, match="cannot go to an OpenAI-compatible endpoint"):
        chat_request(payload([user({"type": "document", "source": {}})]), "m", streaming=False)


def test_tools_become_functions_and_server_tools_are_dropped() -> None:
    tools = [
        WEATHER_TOOL,
        {"type": "custom", "name": "noop", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "bash_20250124", "name": "bash"},
    ]
    chat = chat_request(payload(tools=tools, tool_choice={"type": "auto"}), "m", streaming=False)
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        },
        {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}},
    ]
    assert WEATHER_TOOL["input_schema"]["$schema"], "the caller's payload is left alone"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        (
            {"type": "tool", "name": "get_weather"},
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        ),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            {"tool_choice": "auto", "parallel_tool_calls": False},
        ),
        (
            {"type": "any", "disable_parallel_tool_use": True},
            {"tool_choice": "required", "parallel_tool_calls": False},
        ),
    ],
)
def test_tool_choice_maps(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    chat = chat_request(payload(tools=[WEATHER_TOOL], tool_choice=choice), "m", streaming=False)
    assert {k: chat[k] for k in ("tool_choice", "parallel_tool_calls") if k in chat} == expected
    assert check_request(chat) is None


def test_tool_choice_goes_when_no_tool_is_left() -> None:
    tools = [{"type": "web_search_20250305", "name": "web_search"}]
    chat = chat_request(payload(tools=tools, tool_choice={"type": "any"}), "m", streaming=False)
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(chat)


def test_sampling_fields() -> None:
    chat = chat_request(
        payload(stop_sequences=["END"], temperature=0.2, top_p=0.9, top_k=5), "m", streaming=False
    )
    assert (chat["stop"], chat["temperature"], chat["top_p"]) == (["END"], 0.2, 0.9)
    assert "top_k" not in chat


def test_claude_codes_own_fields_are_dropped() -> None:
    body = payload(system=[text("s", cache_control={"type": "ephemeral"})], tools=[WEATHER_TOOL], stream=True)
    chat = chat_request({**body, **CLAUDE_CODE_FIELDS}, "gpt-4o", streaming=True)
    assert set(chat) == {"model", "messages", "tools", "max_tokens", "stream", "stream_options"}
    assert "cache_control" not in json.dumps(chat)
    assert check_request(chat) is None


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, "low"),
        ({"type": "enabled", "budget_tokens": 4096}, "medium"),
        ({"type": "enabled", "budget_tokens": 16383}, "medium"),
        ({"type": "enabled", "budget_tokens": 16384}, "high"),
        ({"type": "adaptive"}, "medium"),
        ({"type": "disabled"}, None),
    ],
)
def test_thinking_maps_to_reasoning_effort_when_asked(thinking: dict[str, Any], effort: str | None) -> None:
    chat = chat_request(payload(thinking=thinking), "o3", streaming=False, reasoning_effort=True)
    assert chat.get("reasoning_effort") == effort
    assert "reasoning_effort" not in chat_request(payload(thinking=thinking), "o3", streaming=False)


def test_long_tool_names_are_shortened_and_answers_use_the_long_ones() -> None:
    long_name = "mcp__" + "a_very_long_server_name" * 3 + "__do_it"
    tool = {"name": long_name, "input_schema": {"type": "object"}}
    history = [
        user(text("q")),
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": long_name, "input": {}}]},
        user({"type": "tool_result", "tool_use_id": "t1", "content": "ok"}),
    ]
    body = payload(history, tools=[tool], tool_choice={"type": "tool", "name": long_name})
    chat = chat_request(body, "m", streaming=False)
    short = chat["tools"][0]["function"]["name"]
    assert len(short) == 64 and short.startswith("mcp__a_very_long")
    assert chat["messages"][1]["tool_calls"][0]["function"]["name"] == short
    assert chat["tool_choice"]["function"]["name"] == short
    assert check_request(chat) is None
    names = long_tool_names(body)
    assert names == {short: long_name}
    answer = {
        "choices": [
            {"message": {"tool_calls": [{"id": "c", "function": {"name": short, "arguments": "{}"}}]}}
        ]
    }
    assert anthropic_message(answer, "claude", names)["content"][0]["name"] == long_name
    events = stream_events(Answer(tool_calls=(ToolCall(short, "{}", "c1"),)), "c", "m")
    message = accumulate(translate(events, tool_names=names))
    assert message.content[0].name == long_name


def test_a_message_with_a_strange_role_is_untranslatable() -> None:
    with pytest.raises(Untranslatable, match="role 'tool'"):
        chat_request(payload([{"role": "tool", "content": "x"}]), "m", streaming=False)


def test_claude_codes_mid_conversation_system_turns_stay_system_messages() -> None:
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
    ]
    sent = chat_request(payload(turns), "m", streaming=False)["messages"]
    assert sent == [{"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}]


def test_translated_claude_code_requests_pass_the_strict_server(fakes: FakeOpenAI) -> None:
    body = {**payload(system="s", tools=[WEATHER_TOOL], stream=True), **CLAUDE_CODE_FIELDS}
    chat = chat_request(body, "gpt-4o", streaming=True)
    with httpx.stream("POST", fakes.url + "/chat/completions", json=chat, timeout=5) as response:
        assert response.status_code == 200
        response.read()
    assert fakes.refusals == []


# -- non-streamed answers --------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str | None = "stop", **fields: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-42",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        **fields,
    }


def test_a_text_answer() -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 60}}
    message = anthropic_message(completion({"role": "assistant", "content": "Hi!"}, usage=usage), "claude-x")
    assert message == {
        "id": "msg_chatcmpl-42",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "Hi!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 40,
            "output_tokens": 7,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 60,
        },
    }
    Message.model_validate(message)


def test_reasoning_leads_and_tool_calls_follow() -> None:
    chat = completion(
        {
            "content": "Calling.",
            "reasoning_content": "think first",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
            ],
        },
        "tool_calls",
    )
    message = anthropic_message(chat, "claude-x")
    assert message["content"] == [
        {"type": "thinking", "thinking": "think first", "signature": ""},
        {"type": "text", "text": "Calling."},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
    ]
    assert message["stop_reason"] == "tool_use"
    Message.model_validate(message)


def test_openrouters_reasoning_field_counts_too() -> None:
    message = anthropic_message(completion({"content": "x", "reasoning": "hmm"}), "c")
    assert message["content"][0] == {"type": "thinking", "thinking": "hmm", "signature": ""}


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": [1, 2]}', {"a": [1, 2]}),
        ("", {}),
        (None, {}),
        ({"already": "parsed"}, {"already": "parsed"}),
        ('{"a": 1', {"_raw": '{"a": 1'}),
        ("[1, 2]", {"_raw": "[1, 2]"}),
    ],
)
def test_tool_arguments_become_input(arguments: Any, expected: dict[str, Any]) -> None:
    chat = completion({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": arguments}}]})
    assert anthropic_message(chat, "c")["content"][0]["input"] == expected


def test_tool_ids_are_made_fit_for_anthropic() -> None:
    assert tool_use_id("functions.get_weather:0") == "functions_get_weather_0"
    assert tool_use_id("call_abc-1") == "call_abc-1"
    assert tool_use_id(None).startswith("toolu_") and tool_use_id("") != tool_use_id("")


@pytest.mark.parametrize(
    ("finish", "extra", "reason", "sequence"),
    [
        ("stop", {}, "end_turn", None),
        ("length", {}, "max_tokens", None),
        ("tool_calls", {}, "tool_use", None),
        ("function_call", {}, "tool_use", None),
        ("content_filter", {}, "refusal", None),
        (None, {}, "end_turn", None),
        ("stop", {"stop_reason": "END"}, "stop_sequence", "END"),  # vLLM
        ("stop", {"matched_stop": "###"}, "stop_sequence", "###"),  # SGLang
        ("stop", {"stop_reason": 128001}, "end_turn", None),  # vLLM: a stop token, not a sequence
    ],
)
def test_stop_reasons(finish: str | None, extra: dict[str, Any], reason: str, sequence: str | None) -> None:
    chat = {"id": "x", "choices": [{"message": {"content": "t"}, "finish_reason": finish, **extra}]}
    message = anthropic_message(chat, "c")
    assert (message["stop_reason"], message["stop_sequence"]) == (reason, sequence)


def test_tool_calls_with_finish_reason_stop_still_mean_tool_use() -> None:
    chat = completion({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}, "stop")
    assert anthropic_message(chat, "c")["stop_reason"] == "tool_use"


def test_deepseeks_cache_hits_count_as_cache_reads() -> None:
    usage = {
        "prompt_tokens": 50,
        "completion_tokens": 5,
        "prompt_cache_hit_tokens": 30,
        "prompt_cache_miss_tokens": 20,
    }
    assert (
        anthropic_message(completion({"content": "x"}, usage=usage), "c")["usage"]["cache_read_input_tokens"]
        == 30
    )


@pytest.mark.parametrize("name", ["text", "tool", "two_tools", "text_then_tool", "reasoning"])
def test_the_fakes_json_answers_translate(fakes: FakeOpenAI, name: str) -> None:
    answer = ANSWERS[name]
    fakes.behavior = Behavior(answer=answer)
    chat = chat_request(payload(), "gpt-4o", streaming=False)
    response = httpx.post(fakes.url + "/chat/completions", json=chat, timeout=5)
    message = Message.model_validate(anthropic_message(response.json(), "claude-sonnet-4-6"))
    assert message.model == "claude-sonnet-4-6" and message.id.startswith("msg_chatcmpl-fake")
    assert blocks(message.content) == expected_blocks(answer)
    assert message.stop_reason == ("tool_use" if answer.tool_calls else "end_turn")
    assert message.usage.input_tokens == answer.prompt_tokens


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_types_by_status(status: int, kind: str) -> None:
    assert error_type(status) == kind
    body = json.loads(anthropic_error(status, fakeopenai.error_body(status)))
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]


def test_the_openai_message_is_kept() -> None:
    body = json.loads(anthropic_error(401, fakeopenai.error_body(401)))
    assert body["error"]["message"].startswith("Incorrect API key provided")


def openai_error(message: str, **fields: Any) -> bytes:
    return json.dumps({"error": {"message": message, **fields}}).encode()


TOO_MAX = (
    "input length and `max_tokens` exceed context limit: {} + {} > {},"
    " decrease input length or `max_tokens` and try again"
)
OPENAI_LIMIT = (
    "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the messages,"
)
VLLM_LIMIT = (
    "This model's maximum context length is 32768 tokens. However, you requested 32000 output tokens and your"
    " prompt contains at least 1200 input tokens, for a total of at least 33200 tokens."
)
OPENROUTER_LIMIT = (
    "This endpoint's maximum context length is 200000 tokens. However, you requested about 250123 tokens"
    " (240000 of text input, 10123 in the output). Please reduce the length of either one."
)
GEMINI_LIMIT = "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
LM_STUDIO_LIMIT = (
    "Trying to keep the first 5000 tokens when context the overflows. However, the model is loaded with"
    " context length of only 4096 tokens, which is not enough."
)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            400,
            fakeopenai.error_body(400, "context_length_exceeded"),
            "prompt is too long: 131072 tokens > 128000 maximum",
        ),
        # DeepSeek, older vLLM: the prompt fits, max_tokens do not
        (
            400,
            openai_error(OPENAI_LIMIT.format(65536, 70000, 38000) + " 32000 in the completion)."),
            TOO_MAX.format(38000, 32000, 65536),
        ),
        # the prompt alone is too long
        (
            400,
            openai_error(OPENAI_LIMIT.format(65536, 102000, 70000) + " 32000 in the completion)."),
            "prompt is too long: 102000 tokens > 65536 maximum",
        ),
        (
            400,
            json.dumps({"object": "error", "message": VLLM_LIMIT, "code": 400}).encode(),
            TOO_MAX.format(1200, 32000, 32768),
        ),
        (400, openai_error(OPENROUTER_LIMIT, code=400), "prompt is too long: 250123 tokens > 200000 maximum"),
        # Gemini's compatible API answers a list
        (
            400,
            b"[" + openai_error(GEMINI_LIMIT, status="INVALID_ARGUMENT") + b"]",
            "prompt is too long: 1200000 tokens > 1048576 maximum",
        ),
        (
            400,  # llama.cpp
            openai_error(
                "the request exceeds the available context size",
                type="exceed_context_size_error",
                n_prompt_tokens=9000,
                n_ctx=8192,
            ),
            "prompt is too long: 9000 tokens > 8192 maximum",
        ),
        (
            400,
            json.dumps({"error": LM_STUDIO_LIMIT}).encode(),
            "prompt is too long: 5000 tokens > 4096 maximum",
        ),
        (
            413,
            openai_error("prompt is too long: 210000 tokens > 200000 maximum"),
            "prompt is too long: 210000 tokens > 200000 maximum",
        ),
        (
            400,
            b'{"error":"too many tokens in the input"}',
            "prompt is too long: too many tokens in the input",
        ),
    ],
)
def test_context_length_errors_read_as_claude_codes_prompt_too_long(
    status: int, body: bytes, message: str
) -> None:
    answer = json.loads(anthropic_error(status, body))["error"]
    assert answer["type"] == "invalid_request_error"
    assert answer["message"] == message


def test_a_rate_limit_on_tokens_is_not_a_context_error() -> None:
    body = openai_error("Rate limit reached: too many tokens per min (TPM)", code="rate_limit_exceeded")
    assert json.loads(anthropic_error(429, body))["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "The endpoint had an internal error."),
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
        (b'{"detail": "Not Found"}', "Not Found"),
        (
            b'{"error": "model \\"llama9\\" not found, try pulling it first"}',
            'model "llama9" not found, try pulling it first',
        ),
        (
            openai_error("Provider returned error", code=502, metadata={"raw": "upstream timeout"}),
            "Provider returned error (upstream timeout)",
        ),
    ],
)
def test_error_bodies_of_every_shape_keep_their_words(body: bytes, message: str) -> None:
    assert json.loads(anthropic_error(502, body))["error"]["message"] == message


# -- streams ---------------------------------------------------------------------------------


@pytest.fixture
def fakes(openai_server: FakeOpenAI) -> FakeOpenAI:
    openai_server.reset()
    return openai_server


def parse(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Anthropic events, each framed exactly `event: <type>\\ndata: <compact json>\\n\\n`."""
    if not data:
        return []
    assert data.endswith(b"\n\n"), "only complete events come out"
    events = []
    for block in data[:-2].split(b"\n\n"):
        name, line = block.split(b"\n")
        assert name.startswith(b"event: ") and line.startswith(b"data: ")
        payload = json.loads(line[6:])
        assert payload["type"] == name[7:].decode()
        assert line[6:] == json.dumps(payload, separators=(",", ":")).encode()
        events.append((payload["type"], payload))
    return events


def translate(
    events: Iterable[bytes], pieces: Iterable[bytes] | None = None, tool_names: dict[str, str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Feed an OpenAI stream through a translator; each feed's output must parse by itself."""
    translator = StreamTranslator("claude-sonnet-4-6", tool_names)
    out = []
    for piece in pieces if pieces is not None else events:
        out += parse(translator.feed(piece))
    return out + parse(translator.end())


def check_sequence(events: list[tuple[str, dict[str, Any]]]) -> None:
    """The ordering rules of an Anthropic stream."""
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("message_delta") == 1 and names.count("message_stop") == 1
    open_block: dict[str, Any] | None = None
    next_index = 0
    delta_types = {"text": "text_delta", "thinking": "thinking_delta", "tool_use": "input_json_delta"}
    for name, event in events[1:-2]:
        if name == "content_block_start":
            assert open_block is None and event["index"] == next_index
            open_block = event["content_block"]
            if open_block["type"] == "tool_use":
                assert open_block["input"] == {}
            next_index += 1
        elif name == "content_block_delta":
            assert open_block is not None and event["index"] == next_index - 1
            assert event["delta"]["type"] == delta_types[open_block["type"]]
        else:
            assert (
                name == "content_block_stop" and open_block is not None and event["index"] == next_index - 1
            )
            open_block = None
    assert open_block is None


def accumulate(events: list[tuple[str, dict[str, Any]]]) -> Any:
    """The final message as the anthropic SDK builds it from the events."""
    snapshot = None
    # anthropic 2.x keeps each tool call's partial JSON in buffers the caller holds
    buffers = {"json_bufs": {}} if "json_bufs" in inspect.signature(accumulate_event).parameters else {}
    for _, payload in events:
        snapshot = accumulate_event(
            event=EVENTS.validate_python(payload), current_snapshot=snapshot, **buffers
        )
    return snapshot


def blocks(content: Iterable[Any]) -> list[dict[str, Any]]:
    shown = []
    for block in content:
        if block.type == "text":
            shown.append({"type": "text", "text": block.text})
        elif block.type == "thinking":
            shown.append({"type": "thinking", "thinking": block.thinking, "signature": block.signature})
        else:
            shown.append({"type": "tool_use", "id": block.id, "name": block.name, "input": block.input})
    return shown


def expected_blocks(answer: Answer, ids: bool = True) -> list[dict[str, Any]]:
    shown: list[dict[str, Any]] = []
    if answer.reasoning:
        shown.append({"type": "thinking", "thinking": answer.reasoning, "signature": ""})
    if answer.text:
        shown.append({"type": "text", "text": answer.text})
    for n, call in enumerate(answer.tool_calls):
        tool_id = tool_use_id(call.id or f"call_{n}") if ids else None
        arguments = json.loads(call.arguments) if call.arguments else {}
        shown.append({"type": "tool_use", "id": tool_id, "name": call.name, "input": arguments})
    return shown


def served(fake: FakeOpenAI, behavior: Behavior) -> Iterator[bytes]:
    """The fake's answer to a translated Claude Code request, in the pieces the socket gave."""
    fake.behavior = behavior
    chat = chat_request(payload(tools=[WEATHER_TOOL], stream=True), "gpt-4o", streaming=True)
    with httpx.stream("POST", fake.url + "/chat/completions", json=chat, timeout=5) as response:
        assert response.status_code == 200
        yield from response.iter_raw()


@pytest.mark.parametrize("name", ANSWERS)
def test_the_fakes_streams_translate(fakes: FakeOpenAI, name: str) -> None:
    answer = ANSWERS[name]
    events = translate(served(fakes, Behavior(answer=answer)))
    check_sequence(events)
    message = accumulate(events)
    assert blocks(message.content) == expected_blocks(answer)
    assert message.stop_reason == ("tool_use" if answer.tool_calls else "end_turn")
    assert message.model == "claude-sonnet-4-6" and message.id.startswith("msg_chatcmpl-fake")
    assert message.usage.input_tokens == answer.prompt_tokens and message.usage.output_tokens > 0
    Message.model_validate(message.model_dump(exclude={"content"}) | {"content": blocks(message.content)})


def test_usage_comes_in_message_delta_and_message_start_has_zero(fakes: FakeOpenAI) -> None:
    answer = Answer(text="hi there", prompt_tokens=500, cached_tokens=400, completion_tokens=9)
    events = translate(served(fakes, Behavior(answer=answer)))
    assert events[0][1]["message"]["usage"]["input_tokens"] == 0
    assert events[-2][1]["usage"] == {"output_tokens": 9, "input_tokens": 100, "cache_read_input_tokens": 400}
    start, delta = (sse.Event(name, json.dumps(data)) for name, data in (events[0], events[-2]))
    assert sse.usage_of(delta) == sse.Usage(input=100, output=9, cache_read=400)
    assert sse.usage_of(start) == sse.Usage()


def test_text_is_relayed_as_it_arrives_not_at_the_end() -> None:
    chunks = stream_events(Answer(text="one two three"), "c", "m")
    translator = StreamTranslator("claude")
    first = parse(translator.feed(chunks[0]))
    assert [name for name, _ in first] == ["message_start"]
    assert translator.started and not translator.content_started
    second = parse(translator.feed(chunks[1]))
    assert translator.content_started
    assert [name for name, _ in second] == ["content_block_start", "content_block_delta"]
    assert second[1][1]["delta"]["text"] == "one "
    assert not sse.is_preamble(sse.Event(*second[1][0:1], json.dumps(second[1][1])))


def test_a_tool_block_waits_for_its_name_and_then_sends_what_came() -> None:
    quirks = Quirks(late_name=True, argument_piece=3)
    chunks = stream_events(fakeopenai.TOOL, "c", "m", quirks=quirks)
    translator = StreamTranslator("claude")
    assert [name for name, _ in parse(translator.feed(chunks[0] + chunks[1]))] == ["message_start"]
    started = parse(translator.feed(chunks[2]))
    assert started[0][1]["content_block"] == {
        "type": "tool_use",
        "id": "call_weather_1",
        "name": "get_weather",
        "input": {},
    }
    assert started[1][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"c'}


def test_an_error_chunk_before_content_is_the_first_event(fakes: FakeOpenAI) -> None:
    events = translate(served(fakes, fakeopenai.ERROR_CHUNK))
    assert events == [
        (
            "error",
            {
                "type": "error",
                "error": {
                    "type": "api_error",
                    "message": "The engine is currently overloaded, please try again later.",
                },
            },
        )
    ]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ({"message": "m", "type": "server_error", "code": None}, "api_error"),
        ({"message": "Rate limit exceeded", "code": 429}, "rate_limit_error"),
        ({"message": "Overloaded", "code": 529}, "overloaded_error"),
        ({"message": "busy", "type": "overloaded_error"}, "overloaded_error"),
        ({"message": "m", "code": "rate_limit_exceeded", "type": "requests"}, "rate_limit_error"),
        ({"message": "m", "code": 503, "status": "UNAVAILABLE"}, "overloaded_error"),
        ({"message": "m", "status": "RESOURCE_EXHAUSTED"}, "rate_limit_error"),
        ({"message": "m", "code": "invalid_api_key"}, "authentication_error"),
        ("a bare string", "api_error"),
    ],
)
def test_error_chunks_map_to_anthropic_error_types(error: Any, kind: str) -> None:
    events = translate([b"data: " + json.dumps({"error": error}).encode() + b"\n\n"])
    assert events[0][0] == "error" and events[0][1]["error"]["type"] == kind
    assert sse.error_status(sse.Event("error", json.dumps(events[0][1]))) in (429, 500, 401, 529)


def test_a_context_error_chunk_reads_as_prompt_too_long() -> None:
    error = fakeopenai.error_object(400, "context_length_exceeded")
    translator = StreamTranslator("claude")
    events = parse(translator.feed(b"data: " + json.dumps({"error": error}).encode() + b"\n\n"))
    assert events[0][1]["error"] == {
        "type": "invalid_request_error",
        "message": "prompt is too long: 131072 tokens > 128000 maximum",
    }
    assert translator.finished and translator.error is not None
    assert translator.feed(b"data: [DONE]\n\n") == b"" and translator.end() == b""


def test_an_error_after_content_ends_the_stream_with_it() -> None:
    chunks = stream_events(fakeopenai.TEXT, "c", "m")[:3]
    error = b'data: {"error": {"message": "Provider disconnected", "code": 502}}\n\n'
    names = [name for name, _ in translate([*chunks, error, *chunks])]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "error",
    ]


def test_a_cut_stream_is_left_unclosed(fakes: FakeOpenAI) -> None:
    translator = StreamTranslator("claude")
    with pytest.raises(httpx.HTTPError):
        for piece in served(fakes, Behavior("cut", after_events=5)):
            translator.feed(piece)
    assert translator.end() == b"" and not translator.finished and translator.started


def test_end_closes_a_stream_whose_done_never_came() -> None:
    chunks = stream_events(fakeopenai.TEXT, "c", "m")
    events = translate(chunks[:-1])  # everything but [DONE]
    check_sequence(events)
    assert accumulate(events).usage.input_tokens == fakeopenai.TEXT.prompt_tokens


def test_end_reads_a_last_event_without_its_blank_line() -> None:
    chunks = stream_events(fakeopenai.TEXT, "c", "m")
    events = translate([*chunks[:-1], b"data: [DONE]"])
    check_sequence(events)


def test_an_empty_stream_with_done_is_an_empty_message() -> None:
    events = translate([b": keep-alive\n\n", b"data: [DONE]\n\n"])
    check_sequence(events)
    assert accumulate(events).content == []


def test_a_stop_sequence_named_by_vllm_is_reported() -> None:
    chunks = stream_events(Answer(text="a b"), "c", "m")
    finish = json.loads(chunks[-3][6:])
    finish["choices"][0]["stop_reason"] = "###"
    chunks[-3] = b"data: " + json.dumps(finish).encode() + b"\n\n"
    events = translate(chunks)
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "###"}


def test_the_finish_reason_maps_and_the_translator_says_so() -> None:
    translator = StreamTranslator("claude")
    for chunk in stream_events(Answer(text="a", finish_reason="length"), "c", "m"):
        translator.feed(chunk)
    assert translator.stop_reason == "max_tokens" and translator.finished
    assert translator.usage.input == 21


def test_reasoning_after_text_opens_a_new_thinking_block() -> None:
    def delta(d: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": d}]}).encode() + b"\n\n"

    events = translate(
        [delta({"content": "a"}), delta({"reasoning": "b"}), delta({"content": "c"}), b"data: [DONE]\n\n"]
    )
    check_sequence(events)
    assert [b["type"] for b in blocks(accumulate(events).content)] == ["text", "thinking", "text"]


def test_all_choices_in_one_chunk_and_odd_fields_are_handled() -> None:
    chunk = {
        "id": "c",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "all at once", "tool_calls": None},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3},
    }
    events = translate(
        [b"data:" + json.dumps(chunk).encode() + b"\r\n\r\n", b"data: not json\n\n", b"data: [DONE]\r\n\r\n"]
    )
    check_sequence(events)
    assert blocks(accumulate(events).content) == [{"type": "text", "text": "all at once"}]


QUIRKS = {
    "index reused": Quirks(index="zero"),
    "index absent": Quirks(index="missing"),
    "index sparse": Quirks(index="sparse"),
    "id on every fragment": Quirks(ids="every"),
    "no ids": Quirks(ids="none"),
    "name late": Quirks(late_name=True),
    "name late, index reused": Quirks(late_name=True, index="zero"),
    "reasoning field": Quirks(reasoning_field="reasoning"),
    "crlf and comments": Quirks(crlf=True, comments=True),
    "one character per fragment": Quirks(argument_piece=1),
}


@pytest.mark.parametrize("name", QUIRKS)
def test_provider_quirks_still_give_each_call_its_block(fakes: FakeOpenAI, name: str) -> None:
    quirks = QUIRKS[name]
    answer = Answer(reasoning="hm", text="Two calls.", tool_calls=fakeopenai.TWO_TOOLS.tool_calls)
    events = translate(served(fakes, Behavior(answer=answer, quirks=quirks)))
    check_sequence(events)
    got = blocks(accumulate(events).content)
    if quirks.ids == "none":
        assert all(b["id"].startswith("toolu_") for b in got if b["type"] == "tool_use")
        got = [{**b, "id": None} if b["type"] == "tool_use" else b for b in got]
    assert got == expected_blocks(answer, ids=quirks.ids != "none")


# -- properties: any chunking of any valid stream --------------------------------------------

_ID_CHARS = string.ascii_letters + string.digits + "_-.:"
_texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def tool_calls(draw: st.DrawFn) -> tuple[ToolCall, ...]:
    calls = []
    for n in range(draw(st.integers(0, 3))):
        name = draw(st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=20))
        arguments = draw(st.dictionaries(_texts, _json_values, max_size=4))
        text = (
            ""
            if not arguments and draw(st.booleans())
            else json.dumps(arguments, ensure_ascii=draw(st.booleans()))
        )
        call_id = draw(st.text(_ID_CHARS, max_size=12))
        calls.append(ToolCall(name, text, f"{call_id}{n}" if call_id else ""))
    return tuple(calls)


@st.composite
def quirk_sets(draw: st.DrawFn) -> Quirks:
    quirks = Quirks(
        index=draw(st.sampled_from(["per_call", "zero", "sparse", "missing"])),
        ids=draw(st.sampled_from(["first", "every", "none"])),
        late_name=draw(st.booleans()),
        reasoning_field=draw(st.sampled_from(["reasoning_content", "reasoning"])),
        argument_piece=draw(st.integers(1, 12)),
        crlf=draw(st.booleans()),
        comments=draw(st.booleans()),
    )
    if quirks.ids == "none" and quirks.index in ("zero", "missing") and quirks.late_name:
        # Nothing then tells a new call from the next fragment of the last one.
        quirks = Quirks(**{**quirks.__dict__, "late_name": False})
    return quirks


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[Answer, Quirks, list[bytes]]:
    prompt = draw(st.integers(0, 10**6))
    answer = Answer(
        text=draw(_texts),
        reasoning=draw(st.one_of(st.just(""), _texts)),
        tool_calls=draw(tool_calls()),
        prompt_tokens=prompt,
        cached_tokens=draw(st.integers(0, min(prompt, 64))),
    )
    quirks = draw(quirk_sets())
    data = b"".join(stream_events(answer, "chatcmpl-h", "m", quirks=quirks))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=40))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return answer, quirks, pieces


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked_streams())
def test_any_chunking_of_any_stream_gives_a_valid_anthropic_stream(
    case: tuple[Answer, Quirks, list[bytes]],
) -> None:
    answer, quirks, pieces = case
    events = translate((), pieces)
    check_sequence(events)
    message = accumulate(events)
    got = blocks(message.content)
    named = quirks.ids != "none"
    if not named:
        assert all(b["id"].startswith("toolu_") for b in got if b["type"] == "tool_use")
        got = [{**b, "id": None} if b["type"] == "tool_use" else b for b in got]
    assert got == expected_blocks(answer, ids=named)
    assert message.stop_reason == ("tool_use" if answer.tool_calls else "end_turn")
    assert message.usage.input_tokens == answer.prompt_tokens - answer.cached_tokens
    assert message.usage.cache_read_input_tokens == answer.cached_tokens
    # The same answer, not streamed, says the same.
    whole = anthropic_message(
        json.loads(fakeopenai.completion_body(answer, "chatcmpl-h", "m")), "claude-sonnet-4-6"
    )
    assert [{**b, "id": None} if b["type"] == "tool_use" else b for b in whole["content"]] == expected_blocks(
        answer, ids=False
    )


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_split_points_inside_multibyte_characters_are_harmless(data: st.DataObject) -> None:
    answer = Answer(text="日本語のテキスト 🦊🦊 ünïcode", reasoning="考え中…")
    stream = b"".join(stream_events(answer, "c", "m", quirks=Quirks(crlf=data.draw(st.booleans()))))
    inside = [i for i, byte in enumerate(stream) if 0x80 <= byte < 0xC0]  # continuation bytes
    cuts = sorted(set(data.draw(st.lists(st.sampled_from(inside), min_size=1, max_size=30))))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    events = translate((), pieces)
    check_sequence(events)
    assert blocks(accumulate(events).content) == expected_blocks(answer)
