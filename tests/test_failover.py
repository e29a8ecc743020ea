"""Failover before the first byte: rows 1-11, 15-21, 28 and 44-45 of the fault matrix, end to end.

Every test runs the real mitmdump with the addon, fake upstreams on loopback, and the
official SDK or raw HTTP as the client.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import AnyStr

import anthropic
import httpx
import pytest

from addon.fakes.anthropic import Behavior, blackhole_listener

from .conftest import BACKUP_KEY, PRIMARY_KEY, endpoints_config, free_port, wait_until

MESSAGE = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}


def sdk(proxy, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-client-key-0000", max_retries=0, **kwargs)


def stream_text(proxy) -> str:
    with sdk(proxy).messages.stream(**MESSAGE) as stream:
        return "".join(stream.text_stream)


def open_when(gate: threading.Event, seen: str, pieces: Iterable[AnyStr]) -> Iterator[AnyStr]:
    """Passes `pieces` on; once what came so far ends with `seen`, sets `gate`.

    With `fake.cut_gate = gate`, a `close_mid_stream` fake closes only then: the cut comes
    after that text reached the client, whatever the timing.
    """
    so_far = ""
    for piece in pieces:
        so_far += piece if isinstance(piece, str) else piece.decode(errors="replace")
        if so_far.rstrip().endswith(seen):
            gate.set()
        yield piece


def stream_text_cut(proxy, fake, seen: str) -> str:
    """`stream_text` against a `close_mid_stream` fake that closes once `seen` reached the client."""
    gate = fake.cut_gate = threading.Event()
    with sdk(proxy).messages.stream(**MESSAGE) as stream:
        return "".join(open_when(gate, seen, stream.text_stream))


def post(proxy, body=None, stream=False, headers=None, path="/v1/messages") -> httpx.Response:
    payload = dict(MESSAGE, stream=stream) if body is None else body
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return httpx.post(
        proxy.url + path,
        content=content,
        headers={
            "content-type": "application/json",
            "x-api-key": "sk-ant-client-key-0000",
            **(headers or {}),
        },
        timeout=30,
    )


def test_healthy_primary_streams_and_gets_its_own_key(proxy, primary, backup):
    assert stream_text(proxy) == "Hello from the fake."
    seen = primary.wait_for_requests(1)[0]
    assert seen.header("x-api-key") == PRIMARY_KEY
    assert seen.header("host") == primary.url.removeprefix("http://")
    assert seen.json()["stream"] is True
    assert backup.requests == []
    assert proxy.metric("ccf_requests_total", outcome="success") == 1


def test_429_fails_over_streamed_and_cools_for_retry_after(proxy, primary, backup):
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "90"),))
    assert stream_text(proxy) == "Hello from the fake."
    assert backup.wait_for_requests(1)[0].header("x-api-key") == BACKUP_KEY
    state = proxy.endpoint("primary")
    assert state["status"] == "cooling"
    assert 85 < state["cooldownSecondsLeft"] <= 90  # retry-after (90 s) beats cooldownSeconds (30 s)
    for _ in range(3):
        assert sdk(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."
    assert len(primary.requests) == 1
    assert len(backup.requests) == 4
    assert proxy.metric("ccf_failovers_total", from_endpoint="primary", to_endpoint="backup") == 1
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="status") == 1


@pytest.mark.parametrize(
    "header",
    [
        ("retry-after", "date"),
        ("retry-after-ms", "120000"),
    ],
)
def test_retry_after_as_date_or_milliseconds_sets_the_cooldown(proxy, primary, backup, header):
    name, value = header
    if value == "date":
        value = email.utils.formatdate(time.time() + 120, usegmt=True)
    primary.behavior = Behavior(kind="status", status=429, headers=((name, value),))
    assert post(proxy).status_code == 200
    assert 110 < proxy.endpoint("primary")["cooldownSecondsLeft"] <= 121


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
def test_server_errors_fail_over(proxy, primary, backup, status):
    primary.behavior = Behavior(kind="status", status=status)
    assert stream_text(proxy) == "Hello from the fake."
    assert len(primary.requests) == 1 and len(backup.requests) == 1
    assert proxy.endpoint("primary")["status"] == "cooling"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_client_errors_return_untouched_without_failover(proxy_factory, primary, backup, status):
    config = endpoints_config(primary, backup)
    if status in (401, 403):  # a refusal of the client's own key, passed through, is the client's
        del config["endpoints"][0]["apiKey"]  # (of the proxy's key: test_credentials.py)
    proxy = proxy_factory(config)
    primary.behavior = Behavior(kind="status", status=status, headers=(("x-extra", "kept"),))
    response = post(proxy)
    assert response.status_code == status
    assert response.headers["x-extra"] == "kept"
    assert response.headers["x-fake-name"] == "primary"
    assert response.json()["type"] == "error"
    assert backup.requests == []
    assert proxy.endpoint("primary")["status"] == "healthy"
    assert proxy.metric("ccf_requests_total", outcome="client_error") == 1
    assert proxy.metric("ccf_endpoint_credentials_refused_total", endpoint="primary") == 0
    if status in (401, 403):
        assert primary.requests[0].header("x-api-key") == "sk-ant-client-key-0000"


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("base_url", "kind"),
    [
        (dead_url(), "refused"),
        ("http://nonexistent.invalid", "dns"),
    ],
)
def test_unreachable_endpoint_fails_over_at_once(proxy_factory, backup, base_url, kind):
    config = endpoints_config(backup)
    config["endpoints"].insert(0, {"name": "dead", "baseUrl": base_url})
    proxy = proxy_factory(config)
    started = time.monotonic()
    assert stream_text(proxy) == "Hello from the fake."
    assert time.monotonic() - started < 1.5
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="dead", outcome=kind) == 1
    assert proxy.endpoint("dead")["lastError"] == kind


def test_connect_timeout_fails_over_after_the_connect_limit(proxy_factory, backup):
    listener, port = blackhole_listener()
    try:
        config = endpoints_config(backup, timeouts={"connect": 700})
        config["endpoints"].insert(0, {"name": "blackhole", "baseUrl": f"http://127.0.0.1:{port}"})
        proxy = proxy_factory(config)
        started = time.monotonic()
        assert stream_text(proxy) == "Hello from the fake."
        elapsed = time.monotonic() - started
        assert 0.6 < elapsed < 1.9, elapsed  # the connect limit, well before firstByte (2 s)
        assert (
            proxy.metric("ccf_upstream_attempts_total", endpoint="blackhole", outcome="connect_timeout") == 1
        )
    finally:
        listener.close()


def test_headers_that_never_come_fail_over_after_first_byte_timeout(proxy, primary, backup):
    primary.behavior = Behavior(kind="hang")
    started = time.monotonic()
    assert stream_text(proxy) == "Hello from the fake."
    assert 1.9 < time.monotonic() - started < 3.5  # timeouts.firstByte is 2 s for streams
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="first_byte_timeout") == 1


def test_non_streaming_requests_get_the_longer_response_timeout(proxy, primary, backup):
    primary.behavior = Behavior(kind="ok", delay=2.5)  # beyond firstByte (2 s), within response (3 s)
    response = post(proxy)
    assert response.status_code == 200
    assert response.headers["x-fake-name"] == "primary"


@pytest.mark.parametrize(
    ("kind", "outcome"),
    [("close", "closed"), ("garbage", "malformed")],
)
def test_broken_answers_before_headers_fail_over(proxy, primary, backup, kind, outcome):
    primary.behavior = Behavior(kind=kind)
    assert stream_text(proxy) == "Hello from the fake."
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome=outcome) == 1


@pytest.mark.parametrize("kind", ["sse_error_first", "sse_error_after_preamble"])
def test_stream_error_before_content_fails_over_invisibly(proxy, primary, backup, kind):
    primary.behavior = Behavior(kind=kind)
    with httpx.stream(
        "POST",
        proxy.url + "/v1/messages",
        json=dict(MESSAGE, stream=True),
        headers={"x-api-key": "client"},
        timeout=10,
    ) as response:
        body = response.read().decode()
    assert response.status_code == 200
    assert response.headers["x-fake-name"] == "backup"
    assert "event: error" not in body
    assert body.count("event: message_start") == 1
    assert body.rstrip().endswith('data: {"type":"message_stop"}')
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="sse_error") == 1


def test_all_endpoints_rate_limited_answer_at_once_with_the_soonest_retry_after(
    proxy_factory, primary, backup
):
    # Both retry-afters are within maxDelay (60 s) and the deadline (60 s): only maxWaitSeconds
    # (5 s) keeps the request from waiting 20 s in silence for the primary.
    primary.behavior = Behavior(
        kind="status", status=429, headers=(("retry-after", "20"), ("x-extra", "kept"))
    )
    backup.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "30"),))
    config = endpoints_config(primary, backup, retry={"maxDelay": 60000}, timeouts={"total": 60000})
    proxy = proxy_factory(config)
    started = time.monotonic()
    response = post(proxy, stream=True)
    assert time.monotonic() - started < 2
    assert response.status_code == 429
    assert response.headers["retry-after"] == "20"  # the soonest, not the last, with its own headers
    assert response.headers["x-fake-name"] == "primary" and response.headers["x-extra"] == "kept"
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert primary.request_count == 1 and backup.request_count == 1
    started = time.monotonic()
    with pytest.raises(anthropic.RateLimitError):  # the SDK, its own retries off, hears it as fast
        sdk(proxy).messages.create(**MESSAGE)
    assert time.monotonic() - started < 2


def test_all_endpoints_overloaded_answer_529_once_each_was_tried(proxy_factory, primary, backup):
    primary.behavior = backup.behavior = Behavior(kind="status", status=529)
    config = endpoints_config(primary, backup, retry={"maxDelay": 60000}, timeouts={"total": 60000})
    proxy = proxy_factory(config)
    started = time.monotonic()
    response = post(proxy, stream=True)
    assert time.monotonic() - started < 2
    assert response.status_code == 529
    assert response.json()["error"]["type"] == "overloaded_error"
    assert primary.request_count == 1 and backup.request_count == 1  # each once: cooling 30 s, past 5 s
    assert proxy.metric("ccf_retries_total") == 0


def test_a_retry_after_within_max_wait_is_waited_for_and_served(proxy_factory, primary, backup):
    primary.script = [Behavior(kind="status", status=429, headers=(("retry-after", "1"),))]
    backup.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "30"),))
    proxy = proxy_factory(endpoints_config(primary, backup, retry={"maxDelay": 60000}))
    started = time.monotonic()
    assert stream_text(proxy) == "Hello from the fake."
    assert 0.95 < time.monotonic() - started < 3
    seen = primary.wait_for_requests(2)
    assert seen[1].time - seen[0].time >= 0.95  # the wait it asked for, not the 50 ms backoff
    assert backup.request_count == 1
    assert proxy.metric("ccf_retries_total") == 1


def test_all_endpoints_unreachable_gives_502_naming_each_attempt(proxy_factory):
    config = endpoints_config()
    config["endpoints"] = [
        {"name": "first", "baseUrl": dead_url()},
        {"name": "second", "baseUrl": "http://nonexistent.invalid"},
    ]
    config["retry"] = {"maxRetries": 1}
    proxy = proxy_factory(config)
    response = post(proxy)
    assert response.status_code == 502
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "first:" in error["error"]["message"] and "second:" in error["error"]["message"]
    assert proxy.metric("ccf_requests_total", outcome="all_failed") == 1


def test_all_endpoints_timing_out_gives_504(proxy_factory, primary, backup):
    primary.behavior = backup.behavior = Behavior(kind="hang")
    config = endpoints_config(primary, backup, retry={"maxRetries": 1}, timeouts={"firstByte": 300})
    proxy = proxy_factory(config)
    response = post(proxy, stream=True)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"


def test_all_streams_overloaded_gives_529_not_200(proxy_factory, primary, backup):
    primary.behavior = backup.behavior = Behavior(kind="sse_error_after_preamble")
    proxy = proxy_factory(endpoints_config(primary, backup, retry={"maxRetries": 1}))
    response = post(proxy, stream=True)
    assert response.status_code == 529
    assert response.json()["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.APIStatusError) as raised:
        stream_text(proxy)
    assert raised.value.status_code == 529


def test_single_endpoint_backs_off_and_honours_retry_after(proxy_factory, primary):
    primary.script = [Behavior(kind="status", status=503, headers=(("retry-after", "1"),))]
    proxy = proxy_factory(endpoints_config(primary, retry={"maxDelay": 2000}))
    started = time.monotonic()
    assert stream_text(proxy) == "Hello from the fake."
    seen = primary.wait_for_requests(2)
    assert seen[1].time - seen[0].time >= 0.95  # waited for retry-after, not the 50 ms backoff
    assert time.monotonic() - started < 3
    assert proxy.metric("ccf_retries_total") == 1


def test_retry_after_beyond_max_delay_returns_the_error_at_once(proxy_factory, primary):
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "30"),))
    proxy = proxy_factory(endpoints_config(primary, retry={"maxWaitSeconds": 60}))  # maxDelay alone: 0.2 s
    started = time.monotonic()
    response = post(proxy)
    assert response.status_code == 429 and response.headers["retry-after"] == "30"
    assert time.monotonic() - started < 1
    assert len(primary.requests) == 1


def test_total_deadline_bounds_a_request(proxy_factory, primary):
    primary.behavior = Behavior(kind="status", status=503)
    retry = {"maxRetries": 50, "initialDelay": 200, "maxDelay": 400, "maxWaitSeconds": 60}
    config = endpoints_config(primary, retry=retry)
    config["timeouts"]["total"] = 1500
    proxy = proxy_factory(config)
    started = time.monotonic()
    assert post(proxy).status_code == 503
    assert time.monotonic() - started < 1.8
    assert primary.request_count >= 3  # it did retry, until the deadline


def test_cooldown_expiry_sends_exactly_one_probe(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, retry={"cooldownSeconds": 1}))
    primary.behavior = Behavior(kind="status", status=429)
    assert post(proxy).status_code == 200
    wait_until(lambda: proxy.endpoint("primary")["cooldownSecondsLeft"] == 0, 5, "cooldown to end")
    primary.behavior = Behavior(kind="ok", delay=1.0)  # a slow probe, so others arrive meanwhile
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(post, proxy)
        primary.wait_for_requests(2)
        others = [pool.submit(post, proxy) for _ in range(6)]
        answers = [f.result().headers["x-fake-name"] for f in others]
        assert first.result().headers["x-fake-name"] == "primary"
    assert answers == ["backup"] * 6
    assert len(primary.requests) == 2  # the failed request, then one probe
    assert proxy.endpoint("primary")["status"] == "healthy"
    assert post(proxy).headers["x-fake-name"] == "primary"


def test_failed_probe_restarts_the_cooldown(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, retry={"cooldownSeconds": 1}))
    primary.behavior = Behavior(kind="status", status=503)
    assert post(proxy).status_code == 200
    wait_until(lambda: proxy.endpoint("primary")["cooldownSecondsLeft"] == 0, 5, "cooldown to end")
    assert post(proxy).headers["x-fake-name"] == "backup"
    assert len(primary.requests) == 2
    state = proxy.endpoint("primary")
    assert state["status"] == "cooling" and state["consecutiveFailures"] == 2


def test_fifty_parallel_requests_while_primary_rate_limits(proxy, primary, backup):
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "30"),))
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: stream_text(proxy), range(50)))
    assert results == ["Hello from the fake."] * 50
    assert len(primary.requests) <= 50
    assert len(backup.requests) == 50
    assert proxy.metric("ccf_requests_total", outcome="success") == 50


def test_large_request_body_is_replayed_byte_for_byte_after_failover(proxy, primary, backup):
    primary.behavior = Behavior(kind="status", status=503)
    backup.behavior = Behavior(kind="large", body_size=5 << 20)
    big = dict(MESSAGE, messages=[{"role": "user", "content": "x" * (5 << 20)}])
    body = json.dumps(big, separators=(",", ":")).encode()
    response = post(proxy, body=body)
    assert response.status_code == 200
    assert len(response.content) >= 5 << 20
    assert response.json()["type"] == "message"
    assert primary.requests[0].body == body
    assert backup.requests[0].body == body


def test_gzip_response_reaches_the_client_intact(proxy, primary, backup):
    primary.behavior = Behavior(kind="ok", gzip=True)
    with httpx.Client() as client:
        raw = client.send(
            client.build_request(
                "POST",
                proxy.url + "/v1/messages",
                json=MESSAGE,
                headers={"accept-encoding": "gzip", "x-api-key": "k"},
            ),
            stream=True,
        )
        compressed = b"".join(raw.iter_raw())
    assert raw.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(compressed))["content"][0]["text"] == "Hello from the fake."
    assert sdk(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."


def test_gzip_stream_is_read_for_errors_and_passed_compressed(proxy, primary, backup):
    primary.behavior = Behavior(kind="sse_error_after_preamble", gzip=True)
    backup.behavior = Behavior(kind="ok", gzip=True)
    assert stream_text(proxy) == "Hello from the fake."
    assert len(backup.requests) == 1


def test_invalid_json_body_is_passed_through(proxy, primary, backup):
    response = post(proxy, body=b"{not json")
    assert response.status_code == 400  # the endpoint's verdict, passed on untouched
    assert response.headers["x-fake-name"] == "primary"
    assert primary.requests[0].body == b"{not json"
    assert backup.requests == []
