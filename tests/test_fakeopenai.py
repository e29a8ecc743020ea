"""Self-tests for the fake OpenAI upstream (addon/fakes/openai.py), read by the official `openai` SDK."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from addon.fakes import openai as fakeopenai
from addon.fakes.openai import (
    ANSWERS,
    Answer,
    Behavior,
    FakeOpenAI,
    Quirks,
    awkward_writes,
    check_request,
    stream_events,
)

MESSAGES: Any = [{"role": "user", "content": "hi"}]  # Any: the SDK wants its TypedDicts
STRICT_TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": name,
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {key: {"type": "string"} for key in keys},
                "required": list(keys),
                "additionalProperties": False,
            },
        },
    }
    for name, keys in (("get_weather", ("city", "unit")), ("get_time", ("timezone", "format")))
]


@pytest.fixture
def fake(openai_server: FakeOpenAI) -> FakeOpenAI:
    openai_server.reset()
    return openai_server


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.url, api_key="x", max_retries=0, timeout=5) as c:
        yield c


def expected_calls(answer: Answer) -> list[tuple[str, str, str]]:
    return [(call.id, call.name, call.arguments) for call in answer.tool_calls]


@pytest.mark.parametrize("name", ANSWERS)
def test_non_streamed_answers_parse(fake: FakeOpenAI, client: openai.OpenAI, name: str) -> None:
    answer = ANSWERS[name]
    fake.behavior = Behavior(answer=answer)
    chat = client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    message = chat.choices[0].message
    assert chat.object == "chat.completion" and chat.model == "gpt-x"
    assert (message.content or "") == answer.text
    calls = [
        (c.id, c.function.name, c.function.arguments)
        for c in message.tool_calls or ()
        if c.type == "function"
    ]
    assert calls == expected_calls(answer)
    assert (message.model_extra or {}).get("reasoning_content", "") == answer.reasoning
    assert chat.choices[0].finish_reason == ("tool_calls" if answer.tool_calls else "stop")
    assert chat.usage is not None and chat.usage.prompt_tokens == answer.prompt_tokens


def accumulate(chunks: Iterator[Any]) -> dict[str, Any]:
    """What a client builds from `chat.completion.chunk`s, by the rules of the protocol."""
    text, reasoning, finish, usage = "", "", None, None
    calls: dict[int, dict[str, str]] = {}
    first_fragments: dict[int, int] = {}
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        if not chunk.choices:
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        text += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for fragment in delta.tool_calls or ():
            call = calls.setdefault(fragment.index, {"id": "", "name": "", "arguments": ""})
            first_fragments[fragment.index] = first_fragments.get(fragment.index, 0) + 1
            if fragment.id:
                assert first_fragments[fragment.index] == 1, "id only on a call's first fragment"
                call["id"] = fragment.id
            if fragment.function and fragment.function.name:
                call["name"] = fragment.function.name
            call["arguments"] += (fragment.function and fragment.function.arguments) or ""
        finish = choice.finish_reason or finish
    return {"text": text, "reasoning": reasoning, "calls": calls, "finish": finish, "usage": usage}


def streamed_with_usage(client: openai.OpenAI) -> dict[str, Any]:
    """What `accumulate` builds from a streamed answer that asks for the usage chunk."""
    stream = client.chat.completions.create(
        model="gpt-x",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    return accumulate(iter(stream))


@pytest.mark.parametrize("name", ANSWERS)
def test_streamed_answers_parse(fake: FakeOpenAI, client: openai.OpenAI, name: str) -> None:
    answer = ANSWERS[name]
    fake.behavior = Behavior(answer=answer)
    got = streamed_with_usage(client)
    assert got["text"] == answer.text
    assert got["reasoning"] == answer.reasoning
    calls = [(c["id"], c["name"], c["arguments"]) for _, c in sorted(got["calls"].items())]
    assert calls == expected_calls(answer)
    if answer.tool_calls:
        assert sorted(got["calls"]) == list(range(len(answer.tool_calls)))
    assert got["finish"] == ("tool_calls" if answer.tool_calls else "stop")
    assert got["usage"] is not None and got["usage"].prompt_tokens == answer.prompt_tokens


def test_stream_without_include_usage_has_no_usage_chunk(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="gpt-x", messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fakeopenai.TEXT.text


@pytest.mark.parametrize("name", ["text", "two_tools", "text_then_tool"])
def test_the_sdk_stream_helper_accumulates(fake: FakeOpenAI, client: openai.OpenAI, name: str) -> None:
    answer = ANSWERS[name]
    fake.behavior = Behavior(answer=answer)
    with client.chat.completions.stream(
        model="gpt-x",
        messages=MESSAGES,
        tools=STRICT_TOOLS,
        stream_options={"include_usage": True},
    ) as stream:
        done = [event.name for event in stream if event.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert (message.content or "") == answer.text
    assert done == [call.name for call in answer.tool_calls]
    parsed = [(c.id, c.function.name, c.function.parsed_arguments) for c in message.tool_calls or ()]
    assert parsed == [(call.id, call.name, json.loads(call.arguments)) for call in answer.tool_calls]
    assert final.usage is not None and final.usage.completion_tokens > 0


def test_provider_quirks_in_the_framing_still_parse(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.behavior = Behavior(answer=fakeopenai.TWO_TOOLS, quirks=Quirks(crlf=True, comments=True))
    got = streamed_with_usage(client)
    assert [c["name"] for c in got["calls"].values()] == ["get_weather", "get_time"]


def raw_stream(fake: FakeOpenAI, body: dict[str, Any]) -> list[bytes]:
    """The HTTP chunks of a streamed answer, as the server framed them."""
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(head + data)
        raw = b""
        while piece := sock.recv(65536):
            raw += piece
    rest = raw.split(b"\r\n\r\n", 1)[1]
    chunks: list[bytes] = []
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if not int(size, 16):
            return chunks
        chunks.append(rest[: int(size, 16)])
        rest = rest[int(size, 16) + 2 :]


def test_streams_are_cut_at_awkward_places(fake: FakeOpenAI) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    chunks = raw_stream(fake, body)
    whole = b"".join(chunks)
    assert whole.endswith(b"data: [DONE]\n\n")
    undecodable = 0
    for chunk in chunks:
        try:
            chunk.decode()
        except UnicodeDecodeError:
            undecodable += 1
    assert undecodable, "a write ends inside a multi-byte character"
    assert any(chunk.count(b"\n\n") >= 2 for chunk in chunks), "a write holds several events"
    assert any(b"\n" not in chunk for chunk in chunks), "a write holds part of a line"


def test_awkward_writes_keep_every_byte() -> None:
    data = b"".join(stream_events(fakeopenai.REASONING, "c1", "m"))
    pieces = awkward_writes(data)
    assert b"".join(pieces) == data and len(pieces) > 10


@pytest.mark.parametrize(
    ("behavior", "error", "status"),
    [
        (fakeopenai.RATE_LIMITED, openai.RateLimitError, 429),
        (fakeopenai.CONTEXT_TOO_LONG, openai.BadRequestError, 400),
        (fakeopenai.UNAUTHORIZED, openai.AuthenticationError, 401),
        (fakeopenai.SERVER_ERROR, openai.InternalServerError, 500),
        (fakeopenai.OVERLOADED, openai.InternalServerError, 503),
    ],
)
def test_errors_raise_the_sdks_exceptions(
    fake: FakeOpenAI,
    client: openai.OpenAI,
    behavior: Behavior,
    error: type[openai.APIStatusError],
    status: int,
) -> None:
    fake.behavior = behavior
    with pytest.raises(error) as caught:
        client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}


def test_rate_limit_carries_its_headers(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.behavior = fakeopenai.RATE_LIMITED
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    headers = caught.value.response.headers
    assert headers["retry-after"] == "2" and headers["x-ratelimit-reset-requests"] == "2s"
    assert caught.value.code == "rate_limit_exceeded"


def test_context_length_error_says_so(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.behavior = fakeopenai.CONTEXT_TOO_LONG
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 128000 tokens" in caught.value.message


def test_an_error_chunk_before_content_raises(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.behavior = fakeopenai.ERROR_CHUNK
    stream = client.chat.completions.create(model="gpt-x", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="overloaded"):
        list(stream)


def test_a_cut_stream_breaks_the_client(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.behavior = Behavior("cut", after_events=4, split=False)
    stream = client.chat.completions.create(model="gpt-x", messages=MESSAGES, stream=True)
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        list(stream)


def test_a_stalled_stream_times_out(fake: FakeOpenAI) -> None:
    fake.behavior = fakeopenai.STALL
    with openai.OpenAI(base_url=fake.url, api_key="x", max_retries=0, timeout=0.5) as client:
        stream = client.chat.completions.create(model="gpt-x", messages=MESSAGES, stream=True)
        seen = []
        with pytest.raises((openai.APITimeoutError, httpx.ReadTimeout)):
            for chunk in stream:
                seen.append(chunk)
    assert seen, "the chunks before the stall arrived"


@pytest.mark.parametrize(
    "extra",
    [
        {"thinking": {"type": "adaptive"}},
        {"output_config": {"effort": "high"}},
        {"context_management": {"edits": []}},
        {"top_k": 5},
        {"system": "be brief"},
    ],
)
def test_unknown_arguments_are_refused(
    fake: FakeOpenAI, client: openai.OpenAI, extra: dict[str, Any]
) -> None:
    with pytest.raises(
        openai.BadRequestError, match="Unrecognized request argument supplied: " + next(iter(extra))
    ):
        client.chat.completions.create(model="gpt-x", messages=MESSAGES, extra_body=extra)
    assert fake.request_count == 1 and fake.refusals
    assert fake.requests[0].json()[next(iter(extra))] == extra[next(iter(extra))]


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "tool", "tool_call_id": "call_1", "content": "x"}], "must be a response to a preceeding"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [CALL]}],
            "did not have response messages: call_1",
        ),
        (
            [
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "user", "content": "between"},
                {"role": "tool", "tool_call_id": "call_1", "content": "x"},
            ],
            "did not have response messages",
        ),
        ([], "empty array"),
        ([{"role": "robot", "content": "x"}], "Invalid value: 'robot'"),
    ],
)
def test_misordered_messages_are_refused(
    fake: FakeOpenAI, client: openai.OpenAI, messages: Any, problem: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=problem):
        client.chat.completions.create(model="gpt-x", messages=messages)


def test_tool_results_right_after_their_calls_are_taken(client: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a"},
        {"role": "tool", "tool_call_id": "call_2", "content": "b"},
        {"role": "user", "content": "and then?"},
    ]
    chat = client.chat.completions.create(model="gpt-x", messages=messages)
    assert chat.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"stream_options": {"include_usage": True}}, "only allowed when 'stream' is enabled"),
        ({"tool_choice": "auto"}, "only allowed when 'tools' are specified"),
        ({"parallel_tool_calls": False}, "only allowed when 'tools' are specified"),
        (
            {"tools": [{"type": "function", "function": {"name": "m" * 65, "parameters": {}}}]},
            "does not match pattern",
        ),
    ],
)
def test_arguments_out_of_place_are_refused(body: dict[str, Any], problem: str) -> None:
    refusal = check_request({"model": "m", "messages": MESSAGES, **body})
    assert refusal is not None and problem in refusal.message


def test_max_tokens_refused_like_a_reasoning_model(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.max_tokens_ok = False
    with pytest.raises(openai.BadRequestError, match="Use 'max_completion_tokens' instead"):
        client.chat.completions.create(model="o-fake", messages=MESSAGES, max_tokens=10)
    chat = client.chat.completions.create(model="o-fake", messages=MESSAGES, max_completion_tokens=10)
    assert chat.choices[0].message.content


def test_models_are_listed(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["gpt-fake", "gpt-fake-mini"]


def test_an_unknown_path_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="Invalid URL"):
        client.completions.create(model="gpt-x", prompt="hi")


def test_script_answers_in_order_and_requests_are_recorded(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.script = [fakeopenai.RATE_LIMITED, Behavior(answer=fakeopenai.TOOL)]
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="first", messages=MESSAGES)
    chat = client.chat.completions.create(model="second", messages=MESSAGES)
    assert chat.choices[0].message.tool_calls
    third = client.chat.completions.create(model="third", messages=MESSAGES)
    assert third.choices[0].message.content == fakeopenai.TEXT.text
    seen = fake.wait_for_requests(3)
    assert [request.json()["model"] for request in seen] == ["first", "second", "third"]
    assert seen[1].path == "/v1/chat/completions" and seen[1].header("authorization") == "Bearer x"


def test_a_hanging_server_times_the_client_out(fake: FakeOpenAI) -> None:
    fake.behavior = Behavior("hang")
    with (
        openai.OpenAI(base_url=fake.url, api_key="x", max_retries=0, timeout=0.3) as client,
        pytest.raises(openai.APITimeoutError),
    ):
        client.chat.completions.create(model="gpt-x", messages=MESSAGES)


def test_a_cut_json_answer_breaks_the_client(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.behavior = fakeopenai.CUT
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="gpt-x", messages=MESSAGES)
