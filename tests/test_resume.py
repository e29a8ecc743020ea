"""Mid-stream continuation with `streaming.resume: true` (row 29), on a model that refuses a
prefill as Claude 4.6 and later do: every fake here answers 400 to a final assistant turn."""

from __future__ import annotations

import json
import threading
import time

import anthropic
import httpx
import pytest

from addon.fakes.anthropic import Behavior, signature
from addon.relay.resume import CONTINUE_PROMPT, join_seam

from .conftest import CUT_STREAM_ERRORS, endpoints_config, wait_until
from .test_failover import MESSAGE, open_when, sdk, stream_text_cut

FIRST = "Hello there from the primary"  # deltas: "Hello", " there", " from", ...
REST = " and the rest from the backup."
BREAK_REASONS = {"close_mid_stream": "upstream_cut", "stall": "idle_timeout", "sse_error_after": "sse_error"}
TODAY = dict(MESSAGE, model="claude-opus-4-8")
THINKING = "Let me think about it."  # deltas: "Let ", "me ", "think ", "about ", "it."
GO_ON = {"role": "user", "content": [{"type": "text", "text": CONTINUE_PROMPT}]}


def answer_so_far(*blocks):
    return [{"role": "assistant", "content": list(blocks)}, GO_ON]


DELTA_FIELDS = {"text": "text", "thinking": "thinking", "input_json": "partial_json"}


def read_cut(stream, gate: threading.Event, seen: str) -> None:
    """Reads the SDK's stream; opens `gate` (the fake's cut) once what came so far ends with `seen`."""
    so_far = ""
    for event in stream:
        if field := DELTA_FIELDS.get(event.type):
            so_far += getattr(event, field)
        if so_far.rstrip().endswith(seen):
            gate.set()


@pytest.fixture(params=["mitmdump", "ccf"])
def resuming(request, proxy_factory, primary, backup):
    backup.behavior = Behavior(kind="ok", text=REST)
    return proxy_factory(
        endpoints_config(primary, backup, streaming={"resume": True}, timeouts={"idle": 800}),
        ccf=request.param == "ccf",
    )


@pytest.fixture
def resumer(proxy_factory, primary, backup):
    backup.behavior = Behavior(kind="ok", text=REST)
    return proxy_factory(endpoints_config(primary, backup, streaming={"resume": True}), ccf=True)


@pytest.mark.parametrize("kind", ["close_mid_stream", "stall", "sse_error_after"])
def test_a_broken_text_stream_is_finished_by_the_backup(resuming, primary, backup, kind):
    primary.behavior = Behavior(kind=kind, text=FIRST, after_events=5)  # preamble, then "Hello", " there"
    gate = primary.cut_gate = threading.Event()
    with sdk(resuming).messages.stream(**TODAY) as stream:
        text = "".join(open_when(gate, "Hello there", stream.text_stream))
        final = stream.get_final_message()
    assert text == "Hello there" + REST
    assert final.content[0].text == text and len(final.content) == 1
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 1 + 7  # the primary's message_start count + the backup's 7 deltas
    continued = backup.wait_for_requests(1)[0].json()
    assert continued["messages"] == [
        *TODAY["messages"],
        *answer_so_far({"type": "text", "text": "Hello there "}),
    ]
    assert resuming.metric("ccf_stream_resumes_total", from_endpoint="primary", to_endpoint="backup") == 1
    wait_until(lambda: resuming.metric("ccf_requests_total", outcome="success") == 1)
    assert "stream_resumed" in resuming.logs()
    # the broken endpoint is recorded as every failed endpoint is: cooled, counted, logged
    reason = BREAK_REASONS[kind]
    assert resuming.metric("ccf_endpoint_cooldowns_total", endpoint="primary", reason=reason) == 1
    lines = resuming.logs().splitlines()
    cooling = [json.loads(line[line.index("{") :]) for line in lines if '"endpoint_cooling"' in line]
    assert [(c["endpoint"], c["reason"]) for c in cooling] == [("primary", reason)]
    assert resuming.endpoint("primary")["status"] == "cooling"


def test_a_reset_stream_is_finished_from_exactly_what_the_client_got(resumer, primary, backup):
    # A TCP reset lets the kernel drop bytes the proxy has not read yet, so how much of
    # "Hello there" got through varies from run to run. What must hold either way: the
    # backup is asked to continue from exactly the text the client has, and the client's
    # text is that prefix and the continuation, nothing doubled, nothing lost.
    primary.behavior = Behavior(kind="cut", text=FIRST, after_events=5)
    with sdk(resumer).messages.stream(**TODAY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    continued = backup.wait_for_requests(1)[0].json()["messages"]
    got = continued[-2]["content"][0]["text"] if len(continued) > 1 else ""
    assert got in ("", "Hello ", "Hello there ")  # whole deltas only
    assert continued == [*TODAY["messages"], *(answer_so_far({"type": "text", "text": got}) if got else [])]
    assert text == (got + REST.lstrip() if got else REST)
    assert final.content[0].text == text and len(final.content) == 1
    wait_until(lambda: resumer.metric("ccf_requests_total", outcome="success") == 1)


def test_a_repeat_at_the_seam_is_dropped(resumer, primary, backup):
    primary.behavior = Behavior(kind="close_mid_stream", text=FIRST, after_events=6)  # "Hello there from "
    backup.behavior = Behavior(kind="ok", text="there from the primary" + REST)  # starts over mid-sentence
    gate = primary.cut_gate = threading.Event()
    with sdk(resumer).messages.stream(**TODAY) as stream:
        text = "".join(open_when(gate, "Hello there from", stream.text_stream))
    assert text == FIRST + REST


def test_the_client_sees_one_message_start_and_one_message_stop(resumer, primary):
    primary.behavior = Behavior(kind="close_mid_stream", text=FIRST, after_events=5)
    gate = primary.cut_gate = threading.Event()
    with httpx.stream(
        "POST", resumer.url + "/v1/messages", json=dict(TODAY, stream=True), timeout=10
    ) as response:
        body = "".join(open_when(gate, 'there "}}', response.iter_text()))
    assert body.count("event: message_start") == 1
    assert body.count("event: message_stop") == 1
    assert body.count("event: content_block_start") == 1
    assert '"index":0' in body and '"index":1' not in body


def test_a_cut_after_signed_thinking_keeps_it_in_the_continuation(resumer, primary, backup):
    # message_start, thinking start, ping, 5 thinking deltas, signature, stop, text start, "Hello ", "there "
    primary.behavior = Behavior(kind="close_mid_stream", thinking=THINKING, text=FIRST, after_events=13)
    gate = primary.cut_gate = threading.Event()
    request = dict(TODAY, thinking={"type": "adaptive"}, max_tokens=2048)
    with sdk(resumer).messages.stream(**request) as stream:
        read_cut(stream, gate, "Hello there")
        final = stream.get_final_message()
    signed = {"type": "thinking", "thinking": THINKING, "signature": signature(THINKING)}
    continued = backup.wait_for_requests(1)[0].json()["messages"]
    assert continued == [*TODAY["messages"], *answer_so_far(signed, {"type": "text", "text": "Hello there "})]
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].signature == signature(THINKING)
    assert final.content[1].text == "Hello there" + REST


def test_a_cut_inside_thinking_drops_the_unsigned_part_and_answers_anew(resumer, primary, backup):
    primary.behavior = Behavior(kind="close_mid_stream", thinking=THINKING, text=FIRST, after_events=5)
    gate = primary.cut_gate = threading.Event()
    request = dict(TODAY, thinking={"type": "adaptive"}, max_tokens=2048)
    with sdk(resumer).messages.stream(**request) as stream:
        read_cut(stream, gate, "Let me")
        final = stream.get_final_message()
    assert backup.wait_for_requests(1)[0].json()["messages"] == TODAY["messages"]
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Let me " and not final.content[0].signature
    assert final.content[1].text == REST
    assert final.stop_reason == "end_turn"


def test_a_cut_inside_a_tool_call_ends_with_an_error_event(resumer, primary, backup):
    # text "Let me look." then a read_file call whose input is cut after two pieces
    primary.behavior = Behavior(
        kind="close_mid_stream", text="Let me look.", tool_input='{"path": "/etc/hosts"}', after_events=10
    )
    gate = primary.cut_gate = threading.Event()
    started = time.monotonic()
    with (
        pytest.raises(anthropic.APIStatusError, match="tool call"),
        sdk(resumer).messages.stream(**TODAY) as stream,
    ):
        read_cut(stream, gate, '{"path": "/etc')
    assert time.monotonic() - started < 5
    assert backup.requests == []
    wait_until(
        lambda: resumer.metric("ccf_stream_aborts_total", endpoint="primary", reason="upstream_cut") == 1
    )
    assert resumer.metric("ccf_requests_total", outcome="aborted") == 1


def test_a_continuation_that_fails_ends_the_stream_with_an_error_event_at_once(proxy_factory, primary):
    primary.script = [Behavior(kind="close_mid_stream", text=FIRST, after_events=5)]
    primary.behavior = Behavior(kind="status", status=503)
    proxy = proxy_factory(endpoints_config(primary, streaming={"resume": True}, retry={"maxRetries": 1}))
    gate = primary.cut_gate = threading.Event()
    started = time.monotonic()
    with (
        pytest.raises(anthropic.APIStatusError, match="no endpoint could continue"),
        sdk(proxy).messages.stream(**TODAY) as stream,
    ):
        "".join(open_when(gate, "Hello there", stream.text_stream))
    assert time.monotonic() - started < 5
    wait_until(
        lambda: proxy.metric("ccf_stream_aborts_total", endpoint="primary", reason="upstream_cut") == 1
    )


def test_resume_off_by_default(proxy, primary, backup):
    primary.behavior = Behavior(kind="close_mid_stream", text=FIRST, after_events=5)
    with pytest.raises(CUT_STREAM_ERRORS):
        stream_text_cut(proxy, primary, "Hello there")
    assert backup.requests == []


@pytest.mark.parametrize(
    ("before", "after", "joined"),
    [
        ("Hello there ", "and the rest", "Hello there and the rest"),
        ("Hello there ", "  and the rest", "Hello there and the rest"),
        ("Hello the", "re and the rest", "Hello there and the rest"),
        ("The quick brown fo", "The quick brown fox jumps", "The quick brown fox jumps"),
        ("I went to the", "e store", "I went to thee store"),  # a short match is not a repeat
        ("", "Hello", "Hello"),
    ],
)
def test_the_seam_drops_a_repeat_and_doubled_whitespace(before, after, joined):
    assert before + join_seam(before, after) == joined
