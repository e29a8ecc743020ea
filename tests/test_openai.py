"""OpenAI-format endpoints through the proxy: Chat Completions translated both ways.

Real mitmdump with the addon, the strict fake OpenAI server of addon/fakes/openai.py (its
events split across TCP writes at awkward places), and the anthropic SDK as the client:
its stream accumulator must build the right message from what the proxy translated.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from addon.fakes import openai as fakeopenai
from addon.fakes.anthropic import Behavior as AnthropicBehavior
from addon.fakes.openai import FakeOpenAI
from addon.relay.resume import CONTINUE_PROMPT

from .conftest import endpoints_config
from .test_failover import MESSAGE, sdk

OPENAI_KEY = "sk-openai-test-0000000000000001"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
def openai():
    with FakeOpenAI("openai") as fake:
        yield fake


def openai_endpoint(fake: FakeOpenAI, **more: object) -> dict[str, object]:
    return {
        "name": "openai",
        "provider": "openai",
        "baseUrl": fake.url,
        "apiKey": OPENAI_KEY,
        "models": {"*": "gpt-fake"},
        **more,
    }


def only_openai(fake: FakeOpenAI) -> dict[str, object]:
    config = endpoints_config()
    config["endpoints"] = [openai_endpoint(fake)]
    return config


@pytest.mark.parametrize(
    "answer,blocks,stop",
    [
        (fakeopenai.TEXT, ["text"], "end_turn"),
        (fakeopenai.TOOL, ["tool_use"], "tool_use"),
        (fakeopenai.TWO_TOOLS, ["tool_use", "tool_use"], "tool_use"),
        (fakeopenai.TEXT_THEN_TOOL, ["text", "tool_use"], "tool_use"),
        (fakeopenai.REASONING, ["thinking", "text"], "end_turn"),
    ],
    ids=["text", "tool", "two-tools", "text-then-tool", "reasoning"],
)
def test_the_sdks_accumulator_builds_the_answer(proxy_factory, openai, answer, blocks, stop):
    openai.behavior = fakeopenai.Behavior(answer=answer)
    proxy = proxy_factory(only_openai(openai))
    with sdk(proxy).messages.stream(**dict(MESSAGE, tools=[WEATHER_TOOL])) as stream:
        message = stream.get_final_message()
    assert [b.type for b in message.content] == blocks
    assert message.stop_reason == stop and message.model == MESSAGE["model"]
    calls = [b for b in message.content if b.type == "tool_use"]
    assert [(c.name, c.input) for c in calls] == [
        (t.name, json.loads(t.arguments)) for t in answer.tool_calls
    ]
    texts = [b.text for b in message.content if b.type == "text"]
    assert texts == ([answer.text] if answer.text else [])
    if answer.reasoning:
        assert message.content[0].thinking == answer.reasoning
    assert message.usage.input_tokens == 21 and message.usage.output_tokens > 0
    (seen,) = openai.requests
    body = seen.json()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "gpt-fake" and seen.header("authorization") == f"Bearer {OPENAI_KEY}"
    assert openai.refusals == []
    assert proxy.metric("ccf_tokens_total", endpoint="openai", kind="input") == 21
    assert OPENAI_KEY not in proxy.logs()


def test_a_history_with_tools_goes_over_in_order_and_comes_back_a_message(proxy_factory, openai):
    proxy = proxy_factory(only_openai(openai))
    history = [
        {"role": "user", "content": "Weather in Zürich and the time there?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Looking both up."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Zürich"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {"tz": "Europe/Zurich"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 °C, rain"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "14:05"}],
                },
                {"type": "text", "text": "Thanks!", "cache_control": {"type": "ephemeral"}},
            ],
        },
    ]
    request = dict(
        MESSAGE,
        messages=history,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    )
    message = sdk(proxy).messages.create(**request, tools=[WEATHER_TOOL])
    assert message.type == "message" and message.content[0].text == fakeopenai.TEXT.text
    sent = openai.requests[0].json()["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "tool", "user"]
    assert sent[0]["content"] == "Be brief."
    calls = sent[2]["tool_calls"]
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("toolu_1", "get_weather", {"city": "Zürich"}),
        ("toolu_2", "get_time", {"tz": "Europe/Zurich"}),
    ]
    assert [(m["tool_call_id"], m["content"]) for m in sent[3:5]] == [
        ("toolu_1", "12 °C, rain"),
        ("toolu_2", "14:05"),
    ]
    assert openai.refusals == []


def test_anthropic_429_fails_over_to_the_openai_backup_streamed(proxy_factory, primary, openai):
    primary.behavior = AnthropicBehavior(kind="status", status=429, headers=(("retry-after", "30"),))
    config = endpoints_config(primary)
    config["endpoints"].append(openai_endpoint(openai))
    proxy = proxy_factory(config)
    with sdk(proxy).messages.stream(**MESSAGE) as stream:
        assert stream.get_final_text() == fakeopenai.TEXT.text
    assert proxy.metric("ccf_failovers_total", from_endpoint="primary", to_endpoint="openai") == 1
    assert proxy.endpoint("openai")["provider"] == "openai"


def test_an_error_chunk_before_content_fails_over_and_a_429_cools_for_its_reset(
    proxy_factory, openai, backup
):
    config = endpoints_config(backup)
    config["endpoints"].insert(0, openai_endpoint(openai))
    proxy = proxy_factory(config)
    openai.behavior = fakeopenai.ERROR_CHUNK
    with sdk(proxy).messages.with_streaming_response.create(**MESSAGE, stream=True) as response:
        assert response.headers["x-fake-name"] == "backup"
        assert "event: error" not in response.read().decode()
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="openai", outcome="sse_error") == 1
    assert backup.request_count == 1


def test_a_429_without_retry_after_cools_for_openais_reset_header(proxy_factory, openai, backup):
    config = endpoints_config(backup, retry={"cooldownSeconds": 1})
    config["endpoints"].insert(0, openai_endpoint(openai))
    proxy = proxy_factory(config)
    openai.behavior = fakeopenai.Behavior(
        "status", status=429, headers=(("x-ratelimit-reset-requests", "1m30s"),)
    )
    assert sdk(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."
    assert 80 < proxy.endpoint("openai")["cooldownSecondsLeft"] <= 90


def test_a_context_length_error_is_the_prompt_too_long_claude_code_acts_on(proxy_factory, openai):
    openai.behavior = fakeopenai.CONTEXT_TOO_LONG
    proxy = proxy_factory(only_openai(openai))
    with pytest.raises(anthropic.BadRequestError) as error:
        sdk(proxy).messages.create(**MESSAGE)
    assert error.value.body["error"]["type"] == "invalid_request_error"
    assert error.value.body["error"]["message"].startswith(
        "prompt is too long: 131072 tokens > 128000 maximum"
    )


def test_what_has_no_openai_form_is_refused_before_anything_is_sent(proxy_factory, openai):
    proxy = proxy_factory(only_openai(openai))
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    with pytest.raises(anthropic.BadRequestError) as error:
        sdk(proxy).messages.create(**dict(MESSAGE, messages=[{"role": "user", "content": [document]}]))
    assert error.value.body["error"]["type"] == "invalid_request_error" and "document" in str(
        error.value.body
    )
    assert openai.request_count == 0 and proxy.endpoint("openai")["status"] == "healthy"
    counted = httpx.post(proxy.url + "/v1/messages/count_tokens", json=MESSAGE, timeout=10)
    assert counted.status_code == 501 and "openai: Chat Completions serves Messages only" in counted.text


def test_a_cut_claude_stream_is_finished_by_the_openai_backup(proxy_factory, primary, openai):
    import threading

    from .test_failover import open_when

    primary.behavior = AnthropicBehavior(
        kind="close_mid_stream", text="Hello there from Claude", after_events=5
    )
    gate = primary.cut_gate = threading.Event()
    openai.behavior = fakeopenai.Behavior(answer=fakeopenai.Answer(text=" and the rest from elsewhere."))
    config = endpoints_config(primary, streaming={"resume": True})
    config["endpoints"].append(openai_endpoint(openai))
    proxy = proxy_factory(config)
    with sdk(proxy).messages.stream(**MESSAGE) as stream:
        text = "".join(open_when(gate, "Hello there", stream.text_stream))
        final = stream.get_final_message()
    assert text == "Hello there and the rest from elsewhere." and final.content[0].text == text
    continued = openai.requests[0].json()["messages"]
    assert continued[-2:] == [  # the answer so far and the request to go on, translated
        {"role": "assistant", "content": "Hello there "},
        {"role": "user", "content": CONTINUE_PROMPT},
    ]
    assert proxy.metric("ccf_stream_resumes_total", from_endpoint="primary", to_endpoint="openai") == 1


def test_a_session_back_on_claude_loses_the_thinking_no_claude_signed(proxy_factory, primary):
    proxy = proxy_factory(endpoints_config(primary))
    answered_elsewhere = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "from an OpenAI-format model", "signature": ""},
                {"type": "thinking", "thinking": "from Claude", "signature": "c2lnbmVk"},
                {"type": "text", "text": "Hello!"},
            ],
        },
        {"role": "user", "content": "and now?"},
    ]
    httpx.post(proxy.url + "/v1/messages", json=dict(MESSAGE, messages=answered_elsewhere), timeout=10)
    sent = primary.requests[0].json()["messages"][1]["content"]
    assert [b["type"] for b in sent] == ["thinking", "text"] and sent[0]["signature"] == "c2lnbmVk"


def test_ccf_check_calls_an_openai_format_endpoint(openai, tmp_path):
    import asyncio

    from addon.config import load_config
    from addon.ops import checks

    path = tmp_path / "config.yaml"
    path.write_text(f"endpoints: [{json.dumps(openai_endpoint(openai))}]\n")
    (verdict,) = asyncio.run(checks.check(load_config(path, {}), call=True)).values()
    assert verdict.ok and verdict.result.startswith("answered in"), verdict
    assert openai.requests[0].json()["max_tokens"] == 1 and openai.refusals == []
