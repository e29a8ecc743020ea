"""Nothing spent for nothing: a stale pooled connection costs no cooldown, a client that
leaves stops the upstream attempt, and an oversized body is not kept in memory.

Every fault is real: fake upstreams on loopback that close idle connections or answer
slowly, clients that really go away, a real mitmdump running the addon.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from addon.fakes.anthropic import Behavior

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
    assert proxy.metric("ccf_upstream_stale_retries_total", endpoint="primary") == 2
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


# -- the body limit protects memory -------------------------------------------------------

LIMIT = 1_000_000


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def send_raw(proxy, head: bytes, body: Iterator[bytes]) -> tuple[int, dict[str, str], bytes]:
    """Sends a request from a raw socket, stops sending if the proxy answers or closes first,
    and returns the response's status, headers and body."""
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.settimeout(60)
        client.sendall(head)
        for chunk in body:
            readable, _, _ = select.select([client], [], [], 0)
            if readable:
                break  # answered early
            try:
                client.sendall(chunk)
            except OSError:  # the proxy closed its side: read what it answered
                break
        received = b""
        while b"\r\n\r\n" not in received or len(received) < response_length(received):
            data = client.recv(1 << 16)
            if not data:
                break
            received += data
    head_text, _, content = received.partition(b"\r\n\r\n")
    status_line, *lines = head_text.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, content


def response_length(received: bytes) -> int:
    head, _, _ = received.partition(b"\r\n\r\n")
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return len(head) + 4 + int(value)
    return len(received) + 1  # no length: read to the end


def chunked(total: int, size: int = 1 << 16) -> Iterator[bytes]:
    piece = b"%x\r\n%s\r\n" % (size, b"x" * size)
    for _ in range(total // size):
        yield piece
    yield b"0\r\n\r\n"


def plain(total: int, size: int = 1 << 16) -> Iterator[bytes]:
    piece = b"x" * size
    for _ in range(total // size):
        yield piece


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_an_oversized_body_is_not_kept_and_gets_the_json_413(proxy_factory, primary, backup, framing):
    total = 200 * 1024 * 1024
    proxy = proxy_factory(endpoints_config(primary, backup, server={"maxBodyBytes": LIMIT}))
    assert post(proxy).status_code == 200  # warm: every code path the request takes is loaded
    assert proxy.process is not None
    idle = rss_kb(proxy.process.pid)
    peak = [idle]
    sending = threading.Event()
    sending.set()

    def sample() -> None:
        while sending.is_set():
            peak[0] = max(peak[0], rss_kb(proxy.process.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    framed = b"transfer-encoding: chunked" if framing == "chunked" else b"content-length: %d" % total
    try:
        status, headers, content = send_raw(
            proxy,
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n%s\r\n\r\n" % framed,
            chunked(total) if framing == "chunked" else plain(total),
        )
    finally:
        sending.clear()
        sampler.join()
    assert status == 413
    assert headers["content-type"] == "application/json"
    error = json.loads(content)
    assert error["type"] == "error" and error["error"]["type"] == "request_too_large"
    assert str(LIMIT) in error["error"]["message"]
    assert (peak[0] - idle) / 1024 < 30, f"peak RSS {peak[0] // 1024} MB, idle {idle // 1024} MB"
    assert len(primary.requests) == 1 and backup.requests == []  # the warm-up only
    wait_until(lambda: proxy.metric("ccf_requests_total", outcome="rejected") == 1)
    assert post(proxy).status_code == 200


def test_a_chunked_body_within_the_limit_goes_upstream_intact(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, server={"maxBodyBytes": LIMIT}))
    body = json.dumps(dict(MESSAGE, metadata={"user_id": "x" * 500_000})).encode()
    response = httpx.post(
        proxy.url + "/v1/messages",
        content=iter([body[:1000], body[1000:]]),
        headers={"content-type": "application/json", "x-api-key": "k"},
        timeout=10,
    )
    assert response.status_code == 200 and response.headers["x-fake-name"] == "primary"
    seen = primary.wait_for_requests(1)[0]
    assert seen.body == body
    assert seen.header("x-ccf-bridge-token") is None
    assert proxy.metric("ccf_requests_total", outcome="success") == 1
