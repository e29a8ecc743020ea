"""Self-tests for the fake Anthropic upstream (addon/fakes/anthropic.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import json
import math
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anthropic
import pytest

from addon.fakes import anthropic as fakeapi
from addon.fakes.anthropic import Account, Behavior, FakeAnthropic, Window, blackhole_listener

from .conftest import wait_until

MESSAGE = {
    "model": "claude-test-1",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}
STREAM_NAMES = ["message_start", "content_block_start", "ping"]
STREAM_NAMES += ["content_block_delta"] * 4
STREAM_NAMES += ["content_block_stop", "message_delta", "message_stop"]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic("primary") as fake:
        yield fake


@pytest.fixture
def fake(server: FakeAnthropic) -> FakeAnthropic:
    server.reset()
    return server


def request(
    fake: FakeAnthropic,
    body: dict[str, Any] | bytes | None = None,
    method: str = "POST",
    path: str = "/v1/messages",
    conn: http.client.HTTPConnection | None = None,
) -> tuple[http.client.HTTPResponse, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=data, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response, response.read()
    finally:
        if own:
            conn.close()


def sse(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in data.decode().split("\n\n"):
        if block:
            name, payload = block.split("\n")
            events.append((name.removeprefix("event: "), json.loads(payload.removeprefix("data: "))))
    return events


def raw_stream_request(fake: FakeAnthropic) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", fake.port), timeout=5)
    body = json.dumps({**MESSAGE, "stream": True}).encode()
    head = f"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


def recv_until(sock: socket.socket, marker: bytes, count: int) -> bytes:
    data = b""
    while data.count(marker) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def test_sdk_message_and_recorded_request(fake: FakeAnthropic) -> None:
    client = anthropic.Anthropic(base_url=fake.url, api_key="sk-fake-123", max_retries=0)
    raw = client.messages.with_raw_response.create(**MESSAGE)  # type: ignore[call-overload]
    message = raw.parse()
    assert raw.headers["x-fake-name"] == "primary"
    assert raw.headers["request-id"].startswith("req_")
    assert message.content[0].text == "Hello from the fake."
    assert message.model == "claude-test-1"
    assert message.usage.output_tokens == 4
    (seen,) = fake.wait_for_requests(1)
    assert (seen.method, seen.path) == ("POST", "/v1/messages")
    assert "sk-fake-123" in (
        seen.header("X-API-Key"),
        (seen.header("Authorization") or "").removeprefix("Bearer "),
    )
    assert seen.json()["messages"] == MESSAGE["messages"]


def test_sdk_stream_and_event_shapes(fake: FakeAnthropic) -> None:
    client = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=0)
    with client.messages.stream(**MESSAGE) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == "Hello from the fake."
        assert stream.get_final_message().usage.output_tokens == 4
    response, data = request(fake, {**MESSAGE, "stream": True})
    assert response.getheader("content-type", "").startswith("text/event-stream")
    assert response.getheader("transfer-encoding") == "chunked"
    events = sse(data)
    assert [name for name, _ in events] == STREAM_NAMES
    assert [e["delta"]["text"] for n, e in events if n == "content_block_delta"] == [
        "Hello ",
        "from ",
        "the ",
        "fake.",
    ]
    assert events[0][1]["message"]["model"] == "claude-test-1"


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "api_error"),
        (529, "overloaded_error"),
    ],
)
def test_status_answers_with_anthropic_error_body(fake: FakeAnthropic, status: int, error_type: str) -> None:
    fake.behavior = Behavior("status", status, headers=(("retry-after", "30"),))
    response, data = request(fake, MESSAGE)
    assert response.status == status
    assert response.getheader("retry-after") == "30"
    assert json.loads(data)["type"] == "error"
    assert json.loads(data)["error"]["type"] == error_type


def test_sdk_sees_429_with_retry_after(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior("status", 429, headers=(("retry-after", "7"),))
    client = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert caught.value.response.headers["retry-after"] == "7"


def test_script_is_used_before_behavior(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior("status", 500)
    fake.script = [Behavior("status", 529), Behavior()]
    statuses = [request(fake, MESSAGE)[0].status for _ in range(3)]
    assert statuses == [529, 200, 500]
    fake.cut_gate, fake.idle_close = threading.Event(), 1.0
    fake.reset()
    assert request(fake, MESSAGE)[0].status == 200
    assert (fake.request_count, len(fake.requests)) == (1, 1)
    assert (fake.cut_gate, fake.idle_close, fake.idle_closes) == (None, None, 0)


def test_keep_bounds_the_record_but_not_the_count(fake: FakeAnthropic) -> None:
    fake.keep = 2
    for i in range(5):
        request(fake, None, "GET", f"/r{i}")
    assert [r.path for r in fake.wait_for_requests(5)] == ["/r3", "/r4"]
    with pytest.raises(AssertionError, match="expected 6 request"):
        fake.wait_for_requests(6, timeout=0.05)


def test_keep_alive_head_and_5mb_body(fake: FakeAnthropic) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    response, data = request(fake, None, "HEAD", "/", conn=conn)
    assert (response.status, data) == (200, b"")
    big = json.dumps({**MESSAGE, "system": "x" * 5_000_000}).encode()
    for _ in range(2):
        response, data = request(fake, big, conn=conn)
        assert json.loads(data)["type"] == "message"
    seen = fake.wait_for_requests(3)
    assert [r.method for r in seen] == ["HEAD", "POST", "POST"]
    assert len({r.connection for r in seen}) == 1
    assert seen[1].body == big == seen[2].body
    conn.close()


def test_slow_answers_keep_the_connection(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior(delay=0.01, event_delay=0.001)
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    for body in (MESSAGE, {**MESSAGE, "stream": True}, MESSAGE):
        response, data = request(fake, body, conn=conn)
        assert (response.status, data.count(b"Hello")) == (200, 1)
    assert len({r.connection for r in fake.wait_for_requests(3)}) == 1
    conn.close()


def test_expect_100_continue_and_pipelining(fake: FakeAnthropic) -> None:
    body = json.dumps(MESSAGE).encode()
    head = f"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(head.encode() + b"expect: 100-continue\r\n\r\n")
        assert recv_until(sock, b"\r\n\r\n", 1) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body + (head + "\r\n").encode() + body)
        assert recv_until(sock, b'"type":"message"', 2).count(b"HTTP/1.1 200 OK") == 2


def test_other_routes_and_path_prefix(fake: FakeAnthropic) -> None:
    _, data = request(fake, None, "GET", "/v1/models")
    assert json.loads(data)["data"][0]["type"] == "model"
    _, data = request(fake, MESSAGE, path="/api/anthropic/v1/messages/count_tokens")
    assert json.loads(data) == {"input_tokens": 42}
    _, data = request(fake, MESSAGE, path="/api/anthropic/v1/messages?beta=true")
    assert json.loads(data)["type"] == "message"
    _, data = request(fake, None, "GET", "/health?x=1")
    assert json.loads(data) == {"path": "/health?x=1", "method": "GET"}
    response, data = request(fake, b"{not json")
    assert (response.status, json.loads(data)["error"]["type"]) == (400, "invalid_request_error")


@pytest.mark.parametrize(
    ("behavior", "names"),
    [
        (Behavior("sse_error_first"), ["error"]),
        (Behavior("sse_error_after_preamble"), [*STREAM_NAMES[:3], "error"]),
        (Behavior("sse_error_after", after_events=5), [*STREAM_NAMES[:5], "error"]),
    ],
)
def test_sse_error_kinds_end_cleanly(fake: FakeAnthropic, behavior: Behavior, names: list[str]) -> None:
    fake.behavior = behavior
    response, data = request(fake, {**MESSAGE, "stream": True})
    assert response.status == 200
    events = sse(data)
    assert [name for name, _ in events] == names
    assert events[-1][1]["error"]["type"] == "overloaded_error"


def test_close_mid_stream_ends_without_last_chunk(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior("close_mid_stream", after_events=4)
    with raw_stream_request(fake) as sock:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"event: ") == 4
    assert b"event: content_block_delta" in data
    assert not data.endswith(b"0\r\n\r\n")


def test_cut_resets_the_connection_without_last_chunk(fake: FakeAnthropic) -> None:
    # A reset may discard what this reader has not read yet: only "no clean end" is certain.
    fake.behavior = Behavior("cut", after_events=4)
    data = b""
    with raw_stream_request(fake) as sock, contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"event: ") <= 4
    assert not data.endswith(b"0\r\n\r\n")


def test_stall_until_client_leaves_is_recorded(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior("stall", after_events=3)
    with raw_stream_request(fake) as sock:
        recv_until(sock, b"event: ", 3)
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
        closed = time.monotonic()
    (gone,) = fake.wait_for_disconnects(1)
    assert 0 <= gone - closed < 1


def test_client_cancelling_a_slow_stream_is_recorded(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior(text="word " * 50, event_delay=0.05)
    with raw_stream_request(fake) as sock:
        recv_until(sock, b"text_delta", 2)
        closed = time.monotonic()
    (gone,) = fake.wait_for_disconnects(1)
    assert 0 <= gone - closed < 1


def test_hang_never_answers(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior("hang")
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=0.3)
    with pytest.raises(TimeoutError):
        request(fake, MESSAGE, conn=conn)
    fake.wait_for_requests(1)
    conn.close()
    fake.wait_for_disconnects(1)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("close", http.client.RemoteDisconnected),
        ("garbage", http.client.BadStatusLine),
        ("bad_chunked", http.client.IncompleteRead),
        ("short_body", http.client.IncompleteRead),
        ("huge_headers", http.client.LineTooLong),
    ],
)
def test_broken_http(fake: FakeAnthropic, kind: str, error: type[Exception]) -> None:
    fake.behavior = Behavior(kind)
    with pytest.raises(error):
        request(fake, MESSAGE)
    fake.wait_for_requests(1)


def test_gzip_json_and_sse(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior(gzip=True)
    response, data = request(fake, MESSAGE)
    assert response.getheader("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(data))["content"][0]["text"] == "Hello from the fake."
    response, data = request(fake, {**MESSAGE, "stream": True})
    assert response.getheader("content-encoding") == "gzip"
    decoder = zlib.decompressobj(31)
    assert [name for name, _ in sse(decoder.decompress(data))] == STREAM_NAMES
    assert decoder.eof


def test_truncated_gzip_is_well_framed_but_undecodable(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior("truncated_gzip")
    response, data = request(fake, MESSAGE)
    assert response.getheader("content-length") == str(len(data))
    with pytest.raises(EOFError):
        gzip.decompress(data)


def test_body_size(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior(body_size=100_000)
    _, data = request(fake, MESSAGE)
    assert len(data) == 100_000
    assert json.loads(data)["content"][0]["text"].startswith("Hello from the fake.xxx")
    fake.behavior = Behavior("large", body_size=1_000_000)
    _, data = request(fake, {**MESSAGE, "stream": True})
    text = "".join(e["delta"]["text"] for n, e in sse(data) if n == "content_block_delta")
    assert len(text) == 1_000_000


def test_behavior_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown fake behavior kind 'nope'"):
        Behavior("nope")


def test_in_loop_delays() -> None:
    async def scenario() -> None:
        fake = FakeAnthropic("loop")
        fake.behavior = Behavior(delay=0.1, event_delay=0.03)
        await fake.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
            body = json.dumps({**MESSAGE, "stream": True}).encode()
            writer.write(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body))
            writer.write(body)
            (seen,) = await fake.wait_for_requests_async(1)
            await reader.readuntil(b"\r\n\r\n")
            assert time.monotonic() - seen.time >= 0.1
            stamps = []
            for _ in STREAM_NAMES:
                await reader.readuntil(b"\n\n")
                stamps.append(time.monotonic())
            assert stamps[-1] - stamps[0] >= 0.03 * (len(STREAM_NAMES) - 1) * 0.9
            writer.close()
        finally:
            await fake.stop()

    asyncio.run(scenario())


def test_blackhole_listener_makes_connect_time_out() -> None:
    listener, port = blackhole_listener()
    with listener:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            socket.create_connection(("127.0.0.1", port), timeout=0.3)
        assert time.monotonic() - started >= 0.29


@contextlib.contextmanager
def run_cli(*args: str) -> Iterator[FakeAnthropic]:
    """`python -m addon.fakes.anthropic` in the foreground; the yielded fake only knows its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "addon.fakes.anthropic", *args],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        yield FakeAnthropic(port=int(line.rsplit(":", 1)[1]))
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0


def test_cli_runs_in_foreground() -> None:
    args = ["--name", "cli", "--kind", "status", "--status", "429", "--header", "retry-after: 30"]
    with run_cli(*args) as fake:
        response, _ = request(fake, MESSAGE)
        assert response.status == 429
        assert response.getheader("retry-after") == "30"
        assert response.getheader("x-fake-name") == "cli"


# -- subscription accounts ----------------------------------------------------------------


def unified(headers: http.client.HTTPResponse | Mapping[str, str]) -> dict[str, str]:
    """The anthropic-ratelimit-unified-* headers of a response, by the rest of their name."""
    prefix = "anthropic-ratelimit-unified-"
    items = headers.getheaders() if isinstance(headers, http.client.HTTPResponse) else headers.items()
    return {n.lower().removeprefix(prefix): v for n, v in items if n.lower().startswith(prefix)}


def test_account_use_grows_and_is_reported(fake: FakeAnthropic) -> None:
    five, week = Window("5h", per_request=0.1), Window("7d", 0.5, length=604800)
    fake.account = account = Account(five, week)
    first, _ = request(fake, MESSAGE)
    second, data = request(fake, MESSAGE)
    assert (second.status, json.loads(data)["type"]) == (200, "message")
    assert [unified(r)["5h-utilization"] for r in (first, second)] == ["0.0", "0.1"]
    assert [unified(r)["7d-utilization"] for r in (first, second)] == ["0.5", "0.51"]
    assert unified(second) == {
        "status": "allowed",
        "reset": str(math.ceil(week.resets_at)),
        "representative-claim": "seven_day",
        "5h-utilization": "0.1",
        "5h-reset": str(math.ceil(five.resets_at)),
        "5h-status": "allowed",
        "7d-utilization": "0.51",
        "7d-reset": str(math.ceil(week.resets_at)),
        "7d-status": "allowed",
        "overage-status": "rejected",
        "overage-in-use": "false",
        "overage-reset": str(math.ceil(week.resets_at)),
    }
    assert second.getheader("x-fake-name") == "primary"
    windows = account.snapshot()
    assert (windows["5h"].utilization, windows["7d"].utilization) == (0.2, 0.52)


def test_account_window_resets_when_its_time_comes(fake: FakeAnthropic) -> None:
    fake.account = account = Account(Window("5h", 0.9, length=100))
    assert unified(request(fake, MESSAGE)[0])["5h-utilization"] == "0.9"
    soon = time.time() + 1
    account.set("5h", resets_at=soon)
    wait_until(lambda: account.snapshot()["5h"].utilization == 0.0, what="the 5h window to reset")
    headers = unified(request(fake, MESSAGE)[0])
    assert (headers["5h-utilization"], headers["5h-reset"]) == ("0.0", str(math.ceil(soon + 100)))
    assert account.snapshot()["5h"].utilization == 0.01


def test_window_reset_skips_whole_lengths() -> None:
    account = Account(Window("5h", 0.5, length=100))
    past = time.time() - 250
    account.set("5h", resets_at=past)
    window = account.snapshot()["5h"]
    assert (window.utilization, window.resets_at) == (0.0, past + 300)


def test_account_statuses_and_binding_window(fake: FakeAnthropic) -> None:
    hour = time.time() + 3600
    names = ["5h", "7d", "7d-sonnet", "7d_cowork"]
    fake.account = account = Account(
        Window("5h", 0.85, resets_at=hour),
        Window("7d", 0.5, resets_at=hour + 1),
        Window("7d-sonnet", 0.85, resets_at=hour + 2),
        Window("7d_cowork", 0.2, resets_at=hour + 3),
        overage=True,
    )
    headers = unified(request(fake, MESSAGE)[0])
    assert (headers["status"], headers["representative-claim"]) == ("allowed_warning", "five_hour")
    assert headers["reset"] == headers["overage-reset"] == str(math.ceil(hour))
    assert (headers["overage-status"], headers["overage-in-use"]) == ("allowed", "false")
    statuses = ["allowed_warning", "allowed", "allowed_warning", "allowed"]
    assert [headers[f"{name}-status"] for name in names] == statuses
    account.set("7d", utilization=1.0)
    account.set("7d-sonnet", utilization=1.2)
    headers = unified(request(fake, MESSAGE)[0])
    assert (headers["status"], headers["representative-claim"]) == ("rejected", "seven_day_sonnet")
    assert headers["reset"] == headers["overage-reset"] == str(math.ceil(hour + 2))
    statuses = ["allowed_warning", "rejected", "rejected", "allowed"]
    assert [headers[f"{name}-status"] for name in names] == statuses
    assert (headers["7d-sonnet-utilization"], headers["5h-utilization"]) == ("1.0", "0.86")
    for name, utilization in zip(names, [0.5, 0.1, 0.3, 0.7], strict=True):
        account.set(name, utilization=utilization)
    headers = unified(request(fake, MESSAGE)[0])
    assert (headers["status"], headers["representative-claim"]) == ("allowed", "7d_cowork")
    assert headers["reset"] == str(math.ceil(hour + 3))


@pytest.mark.parametrize(
    ("name", "claim"),
    [
        ("5h", "five_hour"),
        ("7d", "seven_day"),
        ("7d_oi", "seven_day_oi"),
        ("7d-sonnet", "seven_day_sonnet"),
        ("7d-opus", "seven_day_opus"),
        ("30d.new", "30d.new"),
    ],
)
def test_representative_claim_names(name: str, claim: str) -> None:
    headers, refused = Account(Window(name, 0.4213)).admit()
    assert refused is None
    assert dict(headers)["anthropic-ratelimit-unified-representative-claim"] == claim
    assert dict(headers)[f"anthropic-ratelimit-unified-{name}-utilization"] == "0.4213"


def test_spent_window_with_overage_is_served_as_overage(fake: FakeAnthropic) -> None:
    fake.account = account = Account(Window("5h", 1.0), Window("7d", 0.3), overage=True)
    response, data = request(fake, MESSAGE)
    assert (response.status, json.loads(data)["content"][0]["text"]) == (200, "Hello from the fake.")
    client = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=0)
    with client.messages.stream(**MESSAGE) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == "Hello from the fake."
        streamed = stream.response
    assert streamed.headers["content-type"].startswith("text/event-stream")
    for headers in (unified(response), unified(streamed.headers)):
        assert (headers["status"], headers["representative-claim"]) == ("rejected", "five_hour")
        assert (headers["overage-status"], headers["overage-in-use"]) == ("allowed", "true")
        assert (headers["5h-status"], headers["7d-status"]) == ("rejected", "allowed")
        assert headers["5h-utilization"] == "1.0"
    assert unified(streamed.headers)["7d-utilization"] == "0.31"
    assert account.snapshot()["5h"].utilization == 1.02


def test_spent_window_without_overage_answers_429(fake: FakeAnthropic) -> None:
    fake.behavior = Behavior(headers=(("x-extra", "kept"),))
    resets = time.time() + 7999
    fake.account = account = Account(Window("5h", 0.4), Window("7d", 1.0, resets_at=resets))
    response, data = request(fake, MESSAGE)
    assert response.status == 429
    assert response.getheader("retry-after") in ("7998", "7999")
    assert json.loads(data)["error"]["type"] == "rate_limit_error"
    assert (response.getheader("x-extra"), response.getheader("x-fake-name")) == ("kept", "primary")
    headers = unified(response)
    assert (headers["status"], headers["representative-claim"]) == ("rejected", "seven_day")
    assert (headers["overage-status"], headers["overage-in-use"]) == ("rejected", "false")
    assert headers["reset"] == headers["7d-reset"] == str(math.ceil(resets))
    client = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(**MESSAGE, stream=True)  # type: ignore[call-overload]
    assert caught.value.response.headers["retry-after"] in ("7998", "7999")
    assert len(fake.wait_for_requests(2)) == 2
    windows = account.snapshot()
    assert (windows["5h"].utilization, windows["7d"].utilization) == (0.4, 1.0)
    account.overage = True
    assert request(fake, MESSAGE)[0].status == 200
    assert account.snapshot()["5h"].utilization == 0.41


def test_account_leaves_other_routes_alone(fake: FakeAnthropic) -> None:
    fake.account = account = Account(Window("5h", 1.0))
    for method, path in [("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models"), ("POST", "/v1/x")]:
        response, _ = request(fake, MESSAGE if method == "POST" else None, method, path)
        assert (response.status, unified(response)) == (200, {})
    response, _ = request(fake, MESSAGE, path="/api/anthropic/v1/messages?beta=true")
    assert (response.status, unified(response)["status"]) == (429, "rejected")
    assert account.snapshot()["5h"].utilization == 1.0
    fake.reset()
    assert (fake.account, request(fake, MESSAGE)[0].status) == (None, 200)


def test_account_rejects_bad_windows() -> None:
    with pytest.raises(ValueError, match="at least one window"):
        Account()
    with pytest.raises(ValueError, match="duplicate window names"):
        Account(Window("5h"), Window("5h"))
    with pytest.raises(ValueError, match="window name 'a b'"):
        Window("a b")
    with pytest.raises(ValueError, match="length must be > 0"):
        Window("5h", length=0)
    with pytest.raises(KeyError, match="no window '7d'"):
        Account(Window("5h")).set("7d", 0.5)


def test_cli_plays_an_account() -> None:
    started = time.time()
    with run_cli("--window", "5h=0.5:100", "--window", "7d=1", "--per-request", "0.1", "--overage") as fake:
        first, _ = request(fake, MESSAGE)
        second, _ = request(fake, {**MESSAGE, "stream": True})
    assert (first.status, second.status) == (200, 200)
    headers = unified(first)
    assert (headers["status"], headers["representative-claim"]) == ("rejected", "seven_day")
    assert (headers["overage-status"], headers["overage-in-use"]) == ("allowed", "true")
    assert started + 100 <= int(headers["5h-reset"]) <= time.time() + 101
    assert started + 604800 <= int(headers["7d-reset"]) <= time.time() + 604801
    assert [unified(r)["5h-utilization"] for r in (first, second)] == ["0.5", "0.6"]
    with run_cli("--window", "5h=1:100") as fake:
        response, data = request(fake, MESSAGE)
    assert (response.status, json.loads(data)["error"]["type"]) == (429, "rate_limit_error")
    assert response.getheader("retry-after") in ("99", "100")
    assert unified(response)["overage-status"] == "rejected"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--window", "5h"], "expected NAME=UTILIZATION[:RESET_IN_SECONDS]"),
        (["--window", "5h=0.5:0"], "RESET_IN_SECONDS must be > 0"),
        (["--window", "5h=-1"], "utilization and use >= 0"),
        (["--window", "5h=0", "--window", "5h=1"], "duplicate window names"),
        (["--overage"], "need at least one --window"),
    ],
)
def test_cli_rejects_bad_windows(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        fakeapi.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "refused"),
    [
        ("claude-opus-4-8", True),
        ("claude-sonnet-4-6", True),
        ("claude-sonnet-5", True),
        ("us.anthropic.claude-opus-4-6-v1:0", True),
        ("claude-opus-4-6@20260205", True),
        ("claude-sonnet-4-5-20250929", False),
        ("claude-opus-4-20250514", False),
        ("claude-3-5-haiku-20241022", False),
    ],
)
def test_claude_4_6_and_later_refuse_a_prefill(fake, model, refused):
    prefill = dict(
        MESSAGE, model=model, messages=[*MESSAGE["messages"], {"role": "assistant", "content": "Sure,"}]
    )
    response, body = request(fake, prefill)
    if refused:
        assert response.status == 400
        assert json.loads(body)["error"] == {
            "type": "invalid_request_error",
            "message": fakeapi.PREFILL_REFUSED,
        }
    else:
        assert response.status == 200


def test_thinking_sent_back_without_its_signature_is_refused(fake):
    unsigned = {"type": "thinking", "thinking": "hmm", "signature": ""}
    history = [
        *MESSAGE["messages"],
        {"role": "assistant", "content": [unsigned]},
        {"role": "user", "content": "go on"},
    ]
    response, body = request(fake, dict(MESSAGE, messages=history))
    assert response.status == 400 and "messages.1.content.0.thinking.signature" in body.decode()


def test_thinking_and_a_tool_call_stream_as_the_api_streams_them(fake):
    fake.behavior = Behavior(thinking="Let me see.", text="Reading it.", tool_input='{"path": "a"}')
    _, body = request(fake, dict(MESSAGE, stream=True))
    events = sse(body)
    starts = [p["content_block"]["type"] for n, p in events if n == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    deltas = [p["delta"] for n, p in events if n == "content_block_delta"]
    assert {"type": "signature_delta", "signature": fakeapi.signature("Let me see.")} in deltas
    assert "".join(d.get("partial_json", "") for d in deltas) == '{"path": "a"}'
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
