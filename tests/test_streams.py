"""Streams once begun: timing, cuts, stalls, cancels, rate limits read on the way (rows 12-14, 30),
through the bridge (`mitmdump -s`) and injected directly (`ccf`, the lean master)."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from addon.fakes.anthropic import Behavior

from .conftest import CUT_STREAM_ERRORS, endpoints_config, wait_until
from .test_failover import MESSAGE, open_when, post, sdk, stream_text, stream_text_cut

WORDS = "one two three four five six seven eight"


@pytest.fixture(params=["mitmdump", "ccf"])
def proxy(request, proxy_factory, primary, backup):
    """Under `mitmdump -s` a stream goes through the bridge; under `ccf` (the lean master) it
    is injected into mitmproxy's stream directly. Both must behave alike."""
    return proxy_factory(endpoints_config(primary, backup), ccf=request.param == "ccf")


def test_events_arrive_spaced_as_the_upstream_sent_them(proxy, primary):
    primary.behavior = Behavior(kind="ok", text=WORDS, event_delay=0.2)
    arrivals = []
    with sdk(proxy).messages.stream(**MESSAGE) as stream:
        for _ in stream.text_stream:
            arrivals.append(time.monotonic())
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    assert len(arrivals) == 8
    # Not bunched, not held back: the events keep the upstream's pace. A median, so that
    # one event delayed by a busy machine (a long gap, then a short one) does not count.
    assert 0.1 < gaps[len(gaps) // 2] < 0.4, gaps
    assert arrivals[-1] - arrivals[0] > 7 * 0.2 * 0.5, gaps


def test_first_content_is_not_delayed_by_the_preamble_hold(proxy, primary):
    primary.behavior = Behavior(kind="ok", text=WORDS, event_delay=1.0)
    started = time.monotonic()
    with sdk(proxy).messages.stream(**MESSAGE) as stream:
        next(iter(stream.text_stream))
        first = time.monotonic() - started
    # message_start, content_block_start, ping, first delta: 3 gaps of 1 s upstream. Held
    # any longer, the first delta would come with the second one, a second later.
    assert 3.0 <= first < 3.8


def test_upstream_cut_mid_stream_aborts_the_client(proxy, primary, backup):
    primary.behavior = Behavior(kind="close_mid_stream", text=WORDS, after_events=5)
    with pytest.raises(CUT_STREAM_ERRORS):
        stream_text_cut(proxy, primary, "one two")
    assert backup.requests == []  # bytes were sent: nothing to fail over to invisibly
    wait_until(
        lambda: proxy.metric("ccf_stream_aborts_total", endpoint="primary", reason="upstream_cut") == 1
    )
    assert proxy.metric("ccf_requests_total", outcome="aborted") == 1


def test_raw_client_sees_no_clean_end_after_a_cut(proxy, primary):
    primary.behavior = Behavior(kind="close_mid_stream", text=WORDS, after_events=5)
    gate = primary.cut_gate = threading.Event()
    with (
        pytest.raises(CUT_STREAM_ERRORS),
        httpx.stream("POST", proxy.url + "/v1/messages", json=dict(MESSAGE, stream=True), timeout=10) as r,
    ):
        for _ in open_when(gate, 'two "}}', r.iter_raw()):
            pass


def test_stalled_stream_is_aborted_after_the_idle_timeout(proxy_factory, primary, backup):
    primary.behavior = Behavior(kind="stall", text=WORDS, after_events=5)
    proxy = proxy_factory(endpoints_config(primary, backup, timeouts={"idle": 800}))
    started = time.monotonic()
    with pytest.raises(CUT_STREAM_ERRORS):
        stream_text(proxy)
    assert 0.7 < time.monotonic() - started < 3
    wait_until(
        lambda: proxy.metric("ccf_stream_aborts_total", endpoint="primary", reason="idle_timeout") == 1
    )
    wait_until(lambda: primary.disconnects, 2, "the stalled upstream to be closed")


def test_client_cancel_closes_the_upstream_within_a_second(proxy, primary):
    primary.behavior = Behavior(kind="ok", text=" ".join(["word"] * 200), event_delay=0.1)
    body = json.dumps(dict(MESSAGE, stream=True)).encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"content_block_delta" not in received:
            received += client.recv(65536)
        cancelled = time.monotonic()
    disconnected = primary.wait_for_disconnects(1, timeout=3)[0]
    assert disconnected - cancelled < 1.0
    wait_until(
        lambda: proxy.metric("ccf_stream_aborts_total", endpoint="primary", reason="client_cancel") == 1
    )


def test_exhausted_rate_limit_headers_move_traffic_before_any_429(proxy, primary, backup):
    reset = (datetime.now(UTC) + timedelta(seconds=60)).isoformat().replace("+00:00", "Z")
    primary.behavior = Behavior(
        kind="ok",
        headers=(
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", reset),
        ),
    )
    assert post(proxy).headers["x-fake-name"] == "primary"  # this one is still served
    for _ in range(3):
        assert stream_text(proxy) == "Hello from the fake."
    assert len(primary.requests) == 1 and len(backup.requests) == 3
    state = proxy.endpoint("primary")
    assert state["status"] == "cooling"
    assert state["reason"] == "ratelimit_requests_exhausted"
    assert 55 < state["cooldownSecondsLeft"] <= 60


def test_remaining_tokens_above_threshold_change_nothing(proxy, primary, backup):
    reset = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
    primary.behavior = Behavior(
        kind="ok",
        headers=(
            ("anthropic-ratelimit-tokens-remaining", "5000"),
            ("anthropic-ratelimit-tokens-reset", reset),
        ),
    )
    for _ in range(2):
        assert post(proxy).headers["x-fake-name"] == "primary"
    assert proxy.endpoint("primary")["status"] == "healthy"


def test_usage_from_the_stream_is_counted_per_endpoint(proxy, primary):
    assert stream_text(proxy) == "Hello from the fake."
    usage = primary.requests and proxy.metric("ccf_tokens_total", endpoint="primary", kind="input")
    assert usage == 10
    assert proxy.metric("ccf_tokens_total", endpoint="primary", kind="output") == 4


def test_clients_that_leave_at_any_moment_leave_no_stream_behind(proxy, primary):
    # Some leave while the answer is chosen, some as it begins, some once it streams: none
    # stays counted as in flight, and none is counted twice.
    body = json.dumps(dict(MESSAGE, stream=True)).encode()
    request = (
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )

    def leave(after: bytes | None) -> None:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            seen = primary.request_count
            client.sendall(request)
            if after is None:  # once the endpoint has the request: the answer is being chosen
                wait_until(lambda: primary.request_count > seen, 5, "the request upstream")
                return
            received = b""
            while after not in received and (chunk := client.recv(65536)):
                received += chunk

    def crowd(moments: list[bytes | None]) -> None:
        threads = [threading.Thread(target=leave, args=(moment,)) for moment in moments]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)

    text = " ".join(["word"] * 30)
    for delay in (0.0, 0.005, 0.02):  # how long the endpoint takes to answer
        primary.behavior = Behavior(kind="ok", text=text, event_delay=0.002, delay=delay)
        crowd([None] * 20)
    crowd([b"HTTP/1.1", b"content_block_delta"] * 15)
    wait_until(lambda: proxy.metric("ccf_active_streams") == 0, 5, "no stream left counted as in flight")
    outcomes = ("success", "aborted", "client_cancel")
    counted = lambda: sum(proxy.metric("ccf_requests_total", outcome=o) for o in outcomes)  # noqa: E731
    # those who saw their answer begin, at least; no one twice (the others may go unseen)
    wait_until(lambda: 30 <= counted() <= 90, 5, "the requests to be counted")
    assert proxy.health()["activeStreams"] == 0
