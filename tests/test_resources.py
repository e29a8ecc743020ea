"""Nothing spent for nothing: a stale pooled connection costs no cooldown, a client that
leaves stops the upstream attempt, and an oversized body is not kept in memory.

Every fault is real: fake upstreams on loopback that close idle connections or answer
slowly, clients that really go away, a real mitmdump running the addon.
"""

from __future__ import annotations

import json
import socket
import time

from addon.fakeapi import Behavior

from .conftest import endpoints_config, wait_until
from .test_failover import MESSAGE, post, stream_text


def test_a_pooled_connection_closed_while_idle_is_retried_fresh_without_cooling(
    proxy_factory, primary, backup
):
    primary.idle_close = 1.0
    proxy = proxy_factory(endpoints_config(primary, backup))
    for i in range(4):
        if i:
            time.sleep(2)  # the fault itself: the pooled connection idles past the endpoint's limit
        response = post(proxy, stream=i == 3)
        assert response.status_code == 200
        assert response.headers["x-fake-name"] == "primary"
    # The fault happened twice: requests 2 (JSON) and 4 (SSE) went out on a pooled connection
    # that the endpoint then closed. The retry's own connection is not kept, so request 3
    # opens a new one that request 4 reuses.
    assert primary.idle_closes == 2
    assert len(primary.requests) == 4 and backup.requests == []
    assert proxy.metric("ccf_endpoint_cooldowns_total", endpoint="primary", reason="closed") == 0
    assert proxy.metric("ccf_failovers_total", from_endpoint="primary", to_endpoint="backup") == 0
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="ok") == 4
    assert proxy.metric("ccf_requests_total", outcome="success") == 4
    state = proxy.endpoint("primary")
    assert state["status"] == "healthy" and state["consecutiveFailures"] == 0


# -- a client that leaves stops the spending ----------------------------------------------

SLOW = {"firstByte": 20000, "response": 20000, "idle": 20000, "total": 60000}


def leave_after(proxy, payload: dict, ready) -> float:
    """Sends a request from a raw socket, closes it once `ready()` holds; returns when it closed."""
    body = json.dumps(payload).encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(ready, 10, "the request to reach the phase under test")
    return time.monotonic()


def assert_cancelled_once(proxy, fake, left: float, failures: int = 0) -> None:
    """The endpoint saw its connection close within a second, and was not blamed for it;
    the request was counted and logged once."""
    (gone,) = fake.wait_for_disconnects(1, timeout=5)
    assert gone - left < 1.0
    wait_until(lambda: proxy.metric("ccf_requests_total", outcome="client_cancel") == 1)
    (line,) = [line for line in proxy.logs().splitlines() if "client_cancel" in line]
    assert '"event": "request"' in line and '"status": 499' in line
    state = proxy.endpoint(fake.name)
    assert state["status"] == "healthy" and state["consecutiveFailures"] == failures, state


def test_client_leaving_during_a_failover_cancels_the_slow_first_byte(proxy_factory, primary, backup):
    primary.behavior = Behavior(kind="status", status=529)
    backup.behavior = Behavior(delay=30)
    proxy = proxy_factory(endpoints_config(primary, backup, timeouts=SLOW))
    left = leave_after(proxy, dict(MESSAGE, stream=True), lambda: backup.request_count)
    assert_cancelled_once(proxy, backup, left)
    assert proxy.endpoint("primary")["status"] == "cooling"  # its 529 counts, as before
    backup.behavior = Behavior()
    assert stream_text(proxy) == "Hello from the fake."


def test_client_leaving_while_the_preamble_is_held_closes_the_stream(proxy_factory, primary, backup):
    primary.behavior = Behavior(kind="stall", after_events=3)  # message_start, block start, ping
    config = endpoints_config(primary, backup, timeouts=SLOW, streaming={"holdMaxMs": 30000})
    proxy = proxy_factory(config)
    left = leave_after(proxy, dict(MESSAGE, stream=True), lambda: primary.events_sent >= 3)
    assert_cancelled_once(proxy, primary, left)
    assert backup.requests == []
    primary.behavior = Behavior()
    assert stream_text(proxy) == "Hello from the fake."


def test_client_leaving_a_non_streamed_probe_frees_the_probe(proxy_factory, primary, backup):
    primary.behavior = Behavior(kind="status", status=529)
    proxy = proxy_factory(endpoints_config(primary, backup, timeouts=SLOW, retry={"cooldownSeconds": 1}))
    assert post(proxy).headers["x-fake-name"] == "backup"
    wait_until(lambda: proxy.endpoint("primary")["cooldownSecondsLeft"] == 0, 5, "the cooldown to end")
    primary.behavior = Behavior(delay=30)
    left = leave_after(proxy, MESSAGE, lambda: primary.request_count == 2)  # the half-open probe
    assert_cancelled_once(proxy, primary, left, failures=1)  # the 529's, no more
    # The probe ended without a verdict: the next request probes again, and succeeds.
    primary.behavior = Behavior()
    assert post(proxy).headers["x-fake-name"] == "primary"
    assert len(backup.requests) == 1
