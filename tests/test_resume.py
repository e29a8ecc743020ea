"""Mid-stream continuation with `streaming.resume: true` (row 29)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from addon.fakeapi import Behavior

from .conftest import CUT_STREAM_ERRORS, endpoints_config, wait_until
from .test_failover import MESSAGE, open_when, sdk, stream_text_cut

FIRST = "Hello there from the primary"  # deltas: "Hello", " there", " from", ...
REST = " and the rest from the backup."
BREAK_REASONS = {"close_mid_stream": "upstream_cut", "stall": "idle_timeout", "sse_error_after": "sse_error"}


@pytest.fixture(params=["mitmdump", "ccf"])
def resuming(request, proxy_factory, primary, backup):
    backup.behavior = Behavior(kind="ok", text=REST)
    return proxy_factory(
        endpoints_config(primary, backup, streaming={"resume": True}, timeouts={"idle": 800}),
        ccf=request.param == "ccf",
    )


@pytest.mark.parametrize("kind", ["close_mid_stream", "stall", "sse_error_after"])
def test_a_broken_text_stream_is_finished_by_the_backup(resuming, primary, backup, kind):
    primary.behavior = Behavior(kind=kind, text=FIRST, after_events=5)  # preamble, then "Hello", " there"
    gate = primary.cut_gate = threading.Event()
    with sdk(resuming).messages.stream(**MESSAGE) as stream:
        text = "".join(open_when(gate, "Hello there", stream.text_stream))
        final = stream.get_final_message()
    assert text == "Hello there" + REST
    assert final.content[0].text == text and len(final.content) == 1
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 1 + 7  # the primary's message_start count + the backup's 7 deltas
    continued = backup.wait_for_requests(1)[0].json()
    assert continued["messages"][-1] == {"role": "assistant", "content": "Hello there"}
    assert continued["messages"][:-1] == MESSAGE["messages"]
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


def test_a_reset_stream_is_finished_from_exactly_what_the_client_got(resuming, primary, backup):
    # A TCP reset lets the kernel drop bytes the proxy has not read yet, so how much of
    # "Hello there" got through varies from run to run. What must hold either way: the
    # backup is asked to continue from exactly the text the client has, and the client's
    # text is that prefix and the continuation, nothing doubled, nothing lost.
    primary.behavior = Behavior(kind="cut", text=FIRST, after_events=5)
    with sdk(resuming).messages.stream(**MESSAGE) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    continued = backup.wait_for_requests(1)[0].json()
    last = continued["messages"][-1]
    prefill = last["content"] if last["role"] == "assistant" else ""
    assert prefill in ("", "Hello", "Hello there")  # whole deltas only
    assert text == prefill + REST
    assert final.content[0].text == text and len(final.content) == 1
    assert final.usage.output_tokens == (1 if prefill else 0) + 7
    assert continued["messages"][: len(MESSAGE["messages"])] == MESSAGE["messages"]
    wait_until(lambda: resuming.metric("ccf_requests_total", outcome="success") == 1)


def test_the_client_sees_one_message_start_and_one_message_stop(resuming, primary):
    primary.behavior = Behavior(kind="close_mid_stream", text=FIRST, after_events=5)
    gate = primary.cut_gate = threading.Event()
    with httpx.stream(
        "POST", resuming.url + "/v1/messages", json=dict(MESSAGE, stream=True), timeout=10
    ) as response:
        body = "".join(open_when(gate, 'there"}}', response.iter_text()))
    assert body.count("event: message_start") == 1
    assert body.count("event: message_stop") == 1
    assert body.count("event: content_block_start") == 1
    assert '"index":0' in body and '"index":1' not in body


def test_thinking_requests_are_not_resumed(resuming, primary, backup):
    primary.behavior = Behavior(kind="close_mid_stream", text=FIRST, after_events=5)
    request = dict(MESSAGE, thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=2048)
    gate = primary.cut_gate = threading.Event()
    with (
        pytest.raises(CUT_STREAM_ERRORS),
        sdk(resuming).messages.stream(**request) as stream,
    ):
        "".join(open_when(gate, "Hello there", stream.text_stream))
    assert backup.requests == []


def test_no_endpoint_left_aborts_the_client(proxy_factory, primary):
    primary.script = [Behavior(kind="close_mid_stream", text=FIRST, after_events=5)]
    primary.behavior = Behavior(kind="status", status=503)
    proxy = proxy_factory(endpoints_config(primary, streaming={"resume": True}, retry={"maxRetries": 1}))
    with pytest.raises(CUT_STREAM_ERRORS):
        stream_text_cut(proxy, primary, "Hello there")
    wait_until(
        lambda: proxy.metric("ccf_stream_aborts_total", endpoint="primary", reason="upstream_cut") == 1
    )


def test_resume_off_by_default(proxy, primary, backup):
    primary.behavior = Behavior(kind="close_mid_stream", text=FIRST, after_events=5)
    with pytest.raises(CUT_STREAM_ERRORS):
        stream_text_cut(proxy, primary, "Hello there")
    assert backup.requests == []
