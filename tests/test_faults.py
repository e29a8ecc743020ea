"""Faults beyond plain failover, end to end: broken HTTP from upstream, bridge misuse (row 27),
the retry budget in an outage (row 26), the total deadline, body limits, the access key,
and probes under concurrent load.

Every fault is real: a fake upstream on loopback that breaks HTTP on purpose, raw sockets
aimed at the bridge, real mitmdump processes running the addon. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import signal
import socket
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from addon.fakes.anthropic import Behavior

from .conftest import BACKUP_KEY, PRIMARY_KEY, endpoints_config, free_port, wait_until
from .test_failover import MESSAGE, post, stream_text

ACCESS_KEY = "sk-proxy-access-0001"
WORDS = "one two three four five six seven eight"


def assert_still_serving(proxy, primary) -> None:
    """After a fault: a normal request is served in full and /health answers."""
    primary.behavior = Behavior()
    assert stream_text(proxy) == "Hello from the fake."
    status, body = proxy.get("/health")
    assert status == 200, body
    assert json.loads(body)["status"] in ("ok", "degraded")


def read_raw(response: httpx.Response) -> tuple[bytes, Exception | None]:
    """The body bytes as they came, and what cut them short, if anything."""
    raw = b""
    try:
        for chunk in response.iter_raw():
            raw += chunk
    except httpx.TransportError as e:
        return raw, e
    return raw, None


# -- 1. malformed upstream responses ------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
@pytest.mark.parametrize("kind", ["bad_chunked", "huge_headers"])
def test_malformed_answer_before_the_choice_fails_over(proxy, primary, backup, kind, stream):
    # bad_chunked: the first chunk-size line ("zz") arrives with the headers, so the parser
    # rejects the response as a whole; huge_headers: one 200 KB header line. Either way the
    # response is never chosen and the backup serves.
    primary.behavior = Behavior(kind=kind)
    if stream:
        assert stream_text(proxy) == "Hello from the fake."
    else:
        response = post(proxy)
        assert response.status_code == 200
        assert response.headers["x-fake-name"] == "backup"
        assert response.json()["content"][0]["text"] == "Hello from the fake."
        assert "x-fake-padding" not in response.headers
    assert len(primary.requests) == 1 and len(backup.requests) == 1
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="malformed") == 1
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="backup", outcome="ok") == 1
    assert proxy.metric("ccf_requests_total", outcome="success") == 1
    assert proxy.metric("ccf_stream_aborts_total", endpoint="primary", reason="upstream_cut") == 0
    assert proxy.endpoint("primary")["lastError"] == "malformed"
    assert_still_serving(proxy, primary)


@pytest.fixture(params=["mitmdump", "ccf"])
def either_proxy(request, proxy_factory, primary, backup):
    """The bridge (`mitmdump -s`) or the lean master's direct relay (`ccf`)."""
    return proxy_factory(endpoints_config(primary, backup), ccf=request.param == "ccf")


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_short_body_after_the_choice_aborts_the_client(either_proxy, primary, backup, stream):
    proxy = either_proxy
    # Honest headers (content-length: N), then half the body and a close: the response
    # was already chosen, so the client must see a cut, never a clean end.
    primary.behavior = Behavior(kind="short_body")
    with httpx.stream(
        "POST",
        proxy.url + "/v1/messages",
        json=dict(MESSAGE, stream=stream),
        headers={"x-api-key": "k"},
        timeout=10,
    ) as response:
        raw, cut = read_raw(response)
    assert response.status_code == 200
    assert response.headers["x-fake-name"] == "primary"
    assert isinstance(cut, httpx.RemoteProtocolError | httpx.ReadError), cut
    assert len(raw) < int(response.headers["content-length"])
    assert backup.requests == []  # the answer had begun: nothing to fail over to invisibly
    wait_until(
        lambda: proxy.metric("ccf_stream_aborts_total", endpoint="primary", reason="upstream_cut") == 1,
        what="the cut to be counted",
    )
    assert proxy.metric("ccf_requests_total", outcome="aborted") == 1
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="ok") == 1
    wait_until(lambda: proxy.metric("ccf_active_streams") == 0, what="no active stream")
    assert_still_serving(proxy, primary)


def test_truncated_gzip_reaches_the_client_as_the_endpoint_sent_it_then_a_cut(either_proxy, primary, backup):
    proxy = either_proxy
    # Well-framed HTTP around half a gzip member: the response is chosen at its headers, the
    # proxy passes the encoded bytes on without re-encoding or inventing any, and ends with
    # a cut, since a clean end would let the client take half a message as whole.
    primary.behavior = Behavior(kind="truncated_gzip")
    with httpx.stream(
        "POST",
        proxy.url + "/v1/messages",
        json=MESSAGE,
        headers={"x-api-key": "k", "accept-encoding": "gzip"},
        timeout=10,
    ) as response:
        raw, cut = read_raw(response)
    assert response.status_code == 200
    assert response.headers["x-fake-name"] == "primary"
    assert response.headers["content-encoding"] == "gzip"
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    decoded, start = decoder.decompress(raw), b'{"id":"msg_fake_'
    assert decoded.startswith(start) or start.startswith(decoded)  # a prefix of the message
    assert not decoder.eof  # never more than the endpoint's half member
    assert cut is not None
    assert backup.requests == []
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="ok") == 1
    wait_until(
        lambda: proxy.metric("ccf_stream_aborts_total", endpoint="primary", reason="malformed") == 1,
        what="the cut to be counted",
    )
    assert proxy.metric("ccf_requests_total", outcome="aborted") == 1
    assert_still_serving(proxy, primary)


# -- 2. bridge misuse (row 27) -------------------------------------------------------------


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that process `pid` listens on."""
    try:
        import psutil
    except ImportError:
        return _listening_sockets_from_proc(pid)
    process = psutil.Process(pid)
    connections = getattr(process, "net_connections", process.connections)(kind="tcp")
    return [(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]


def _listening_sockets_from_proc(pid: int) -> list[tuple[str, int]]:
    # /proc/<pid>/net/tcp lists the whole network namespace: keep the sockets whose
    # inode is one of the process's file descriptors.
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            # each 32-bit word of the address is in host (little-endian) order
            packed = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
            found.append((str(ipaddress.ip_address(packed)), int(port, 16)))
    return found


def bridge_address(proxy) -> tuple[str, int]:
    assert proxy.process is not None
    others = [s for s in listening_sockets(proxy.process.pid) if s[1] != proxy.port]
    assert len(others) == 1, f"expected one listener besides the proxy port, found {others}"
    return others[0]


def send_raw(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """What a server answers to `data` before it closes (or stops talking for 3 s)."""
    received = b""
    with socket.create_connection((host, port), timeout=3) as s:
        s.sendall(data)
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := s.recv(65536):
                received += chunk
    return received


BRIDGE_REQUESTS = {
    "no_token": b"GET /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n",
    "wrong_token": (
        b"GET /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 0\r\n"
        b"x-ccf-bridge-token: Zm9yZ2VkLXRva2VuLTAwMDAwMDAw\r\n\r\n"
    ),
    "empty_token": (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 2\r\n"
        b"x-ccf-bridge-token: \r\n\r\n{}"
    ),
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
}


def test_bridge_listens_on_loopback_only(proxy):
    host, port = bridge_address(proxy)
    assert host == "127.0.0.1"
    # 127.0.0.2 is loopback too: a wildcard socket would accept there, one bound to 127.0.0.1 refuses
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=2).close()


def test_bridge_refuses_requests_without_a_valid_token(proxy, primary, backup):
    _, port = bridge_address(proxy)
    # The bridge is probed while it relays a slow stream, so there is something to leak.
    primary.behavior = Behavior(kind="ok", text=WORDS, event_delay=0.1)
    with ThreadPoolExecutor(1) as pool:
        relayed = pool.submit(stream_text, proxy)
        wait_until(lambda: proxy.metric("ccf_active_streams") == 1, what="the relay to start")
        answers = {name: send_raw(port, data) for name, data in BRIDGE_REQUESTS.items()}
        assert relayed.result(timeout=10) == WORDS  # the legitimate stream is untouched
    for name, answer in answers.items():
        if answer:
            assert answer.startswith(b"HTTP/1.1 403 "), (name, answer[:200])
            assert b"not a valid bridge token" in answer
        else:
            assert name == "garbage", f"{name}: closed without an answer"
        for leak in (b"msg_fake", b"event:", b"x-fake-name", b"content_block", b"sk-ant-"):
            assert leak not in answer, (name, answer[:200])
    assert len(primary.requests) == 1 and backup.requests == []
    assert proxy.metric("ccf_requests_total", outcome="success") == 1
    assert_still_serving(proxy, primary)


# -- 3. retry budget in a total outage (row 26) --------------------------------------------

# maxWaitSeconds past the cooldown (30 s): requests keep retrying, so the budget is what bounds them
BUDGET = {
    "maxRetries": 3,
    "initialDelay": 10,
    "maxDelay": 50,
    "budgetRatio": 0.2,
    "budgetMinRetries": 5,
    "maxWaitSeconds": 60,
}


def test_total_outage_retries_stay_within_the_budget(proxy_factory, primary, backup):
    primary.behavior = backup.behavior = Behavior(kind="status", status=503)
    proxy = proxy_factory(endpoints_config(primary, backup, retry=BUDGET))
    requests, threads = 200, 10
    body = json.dumps(MESSAGE).encode()
    local = threading.local()

    def one(_: int) -> tuple[int, str | None, float]:
        if not hasattr(local, "client"):  # keep-alive per thread, as a real client does
            local.client = httpx.Client(base_url=proxy.url, timeout=30)
        started = time.monotonic()
        response = local.client.post(
            "/v1/messages", content=body, headers={"content-type": "application/json"}
        )
        return response.status_code, response.headers.get("x-fake-name"), time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, range(requests)))
    windows = math.ceil((time.monotonic() - started) / 10)  # the budget's 10 s sliding window
    # Every client got the last upstream error, quickly: at most 5 budgeted waits of at most
    # maxDelay (50 ms) each, far from the 15 s deadline.
    assert len(results) == requests
    assert {(status, name) for status, name, _ in results} <= {(503, "primary"), (503, "backup")}
    assert max(latency for _, _, latency in results) < 1.5
    attempts = primary.request_count + backup.request_count
    retries = proxy.metric("ccf_retries_total")
    # Every attempt is one of three: the request's first (free); a failover to an endpoint
    # that is healthy and has not failed this request (free, at most one per other endpoint,
    # so at most one here); a retry paid from the budget (counted in ccf_retries_total).
    # Paid retries in any window are at most budgetMinRetries + budgetRatio x requests.
    # So attempts <= (2 + 0.2) x requests + 5 per window, and retries <= 0.2 x requests + 5.
    assert retries <= 0.2 * requests + 5 * windows, retries
    assert attempts <= (2 + 0.2) * requests + 5 * windows, attempts
    assert proxy.metric("ccf_backoff_seconds_total") <= retries * 0.050
    assert proxy.metric("ccf_retry_budget_exhausted_total") > 0
    assert proxy.metric("ccf_requests_total", outcome="all_failed") == requests
    counted = sum(
        proxy.metric("ccf_upstream_attempts_total", endpoint=name, outcome="status")
        for name in ("primary", "backup")
    )
    assert counted == attempts


# -- 4. the total deadline -----------------------------------------------------------------


def timed_post(proxy, stream: bool) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = post(proxy, stream=stream)
    return response, time.monotonic() - started


def test_deadline_bounds_endpoints_that_never_answer(proxy_factory, primary, backup):
    primary.behavior = backup.behavior = Behavior(kind="hang")
    config = endpoints_config(primary, backup, timeouts={"firstByte": 5000, "total": 1000})
    proxy = proxy_factory(config)
    response, elapsed = timed_post(proxy, stream=True)
    assert 0.9 < elapsed < 1.5, elapsed
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"


def test_deadline_bounds_backoff_between_retries(proxy_factory, primary, backup):
    primary.behavior = backup.behavior = Behavior(kind="status", status=503)
    config = endpoints_config(
        primary,
        backup,
        retry={"maxRetries": 50, "initialDelay": 300, "maxDelay": 2000, "maxWaitSeconds": 60},
        timeouts={"total": 1000},
    )
    proxy = proxy_factory(config)
    response, elapsed = timed_post(proxy, stream=True)
    assert elapsed < 1.3, elapsed
    assert response.status_code == 503  # the last upstream error, as it came
    assert response.headers["x-fake-name"] in ("primary", "backup")
    assert len(primary.requests) + len(backup.requests) >= 3  # it did retry within the deadline


def test_deadline_bounds_slow_error_answers(proxy_factory, primary, backup):
    primary.behavior = backup.behavior = Behavior(kind="status", status=503, delay=0.4)
    retry = {"maxRetries": 5, "initialDelay": 10, "maxWaitSeconds": 60}
    config = endpoints_config(primary, backup, retry=retry, timeouts={"total": 1000})
    proxy = proxy_factory(config)
    response, elapsed = timed_post(proxy, stream=False)
    assert elapsed < 1.3, elapsed
    assert response.status_code == 503
    assert primary.request_count + backup.request_count >= 3  # retried until the deadline


def test_spent_deadline_does_not_cool_an_endpoint_it_never_waited_for(proxy_factory, primary, backup):
    primary.behavior = Behavior(kind="hang")
    config = endpoints_config(primary, backup, timeouts={"firstByte": 5000, "total": 1000})
    proxy = proxy_factory(config)
    response, elapsed = timed_post(proxy, stream=True)
    assert response.status_code == 504 and elapsed < 1.5
    assert proxy.endpoint("backup")["status"] == "healthy"
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="backup", outcome="first_byte_timeout") == 0
    assert stream_text(proxy) == "Hello from the fake."  # primary cools; the backup serves


def test_deadline_bounds_the_preamble_hold(proxy_factory, primary, backup):
    primary.behavior = Behavior(kind="stall", after_events=3)  # message_start, block start, ping
    config = endpoints_config(primary, backup, timeouts={"idle": 3000, "total": 1000})
    proxy = proxy_factory(config)
    started = time.monotonic()
    with httpx.stream(
        "POST",
        proxy.url + "/v1/messages",
        json=dict(MESSAGE, stream=True),
        headers={"x-api-key": "k"},
        timeout=10,
    ):
        chosen = time.monotonic() - started  # a response (any) by the deadline
    assert chosen < 1.5, chosen


# -- 5. request body limit -----------------------------------------------------------------


def body_of(size: int) -> bytes:
    """A valid Messages request of exactly `size` bytes."""
    shell = json.dumps(dict(MESSAGE, messages=[{"role": "user", "content": ""}])).encode()
    pad = size - len(shell)
    return json.dumps(dict(MESSAGE, messages=[{"role": "user", "content": "x" * pad}])).encode()


def chunks_of(body: bytes, size: int = 1 << 16):
    for i in range(0, len(body), size):
        yield body[i : i + size]


@pytest.fixture
def limited_proxy(proxy_factory, primary, backup):
    return proxy_factory(endpoints_config(primary, backup, server={"maxBodyBytes": 1_000_000}))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_over_the_limit_gets_an_anthropic_413(limited_proxy, primary, backup, framing):
    body = body_of(2_000_000)
    content = body if framing == "content-length" else chunks_of(body)
    response = httpx.post(
        limited_proxy.url + "/v1/messages",
        content=content,
        headers={"content-type": "application/json", "x-api-key": "k"},
        timeout=10,
    )
    assert response.status_code == 413
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "request_too_large"
    assert "1000000" in error["error"]["message"]
    assert primary.requests == [] and backup.requests == []
    assert_still_serving(limited_proxy, primary)


def test_body_over_the_limit_is_counted_as_rejected(limited_proxy):
    response = post(limited_proxy, body=body_of(2_000_000))
    assert response.status_code == 413
    assert limited_proxy.metric("ccf_requests_total", outcome="rejected") == 1


def test_body_under_the_limit_passes_intact(limited_proxy, primary):
    body = body_of(500_000)
    response = post(limited_proxy, body=body)
    assert response.status_code == 200
    assert primary.wait_for_requests(1)[0].body == body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_reloaded_limit_holds_for_the_next_body(limited_proxy, primary, backup, framing):
    config = endpoints_config(primary, backup, server={"maxBodyBytes": 3_000_000})
    limited_proxy.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert limited_proxy.process is not None
    limited_proxy.process.send_signal(signal.SIGHUP)
    reloaded = lambda: limited_proxy.metric("ccf_config_reloads_total", result="success") >= 1  # noqa: E731
    wait_until(reloaded, 10, "the reload")
    body = body_of(2_000_000)
    response = httpx.post(
        limited_proxy.url + "/v1/messages",
        content=body if framing == "content-length" else chunks_of(body),
        headers={"content-type": "application/json", "x-api-key": "k"},
        timeout=10,
    )
    assert response.status_code == 200
    assert primary.wait_for_requests(1)[0].body == body
    too_large = post(limited_proxy, body=body_of(4_000_000))
    assert too_large.status_code == 413 and "3000000" in too_large.json()["error"]["message"]


# -- 6. bodies that are not JSON -----------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/octet-stream", b"\x00\xff\xfe binary \x80\x81"),
        ("text/plain", b'{"model": "claude-sonnet-4-6"'),
        ("application/json", b"[1, 2, 3]"),
    ],
    ids=["binary", "text", "json-array"],
)
def test_non_json_body_goes_to_the_endpoint_which_decides(proxy, primary, backup, content_type, body):
    primary.behavior = Behavior(kind="status", status=503)
    response = post(proxy, body=body, headers={"content-type": content_type})
    # The primary's 503 makes the proxy replay the body as is; the backup's verdict comes back.
    assert response.status_code == 400
    assert response.headers["x-fake-name"] == "backup"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert primary.requests[0].body == body and backup.requests[0].body == body
    assert backup.requests[0].header("content-type") == content_type
    assert proxy.metric("ccf_requests_total", outcome="client_error") == 1


# -- 7. the proxy's access key -------------------------------------------------------------


@pytest.fixture
def keyed_proxy(proxy_factory, primary, backup):
    return proxy_factory(endpoints_config(primary, backup, server={"accessKey": ACCESS_KEY}))


def raw_post(proxy, headers: dict[str, str], stream: bool = False) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/messages",
        json=dict(MESSAGE, stream=stream),
        headers=headers,
        timeout=10,
    )


def saw_access_key(seen) -> bool:
    return ACCESS_KEY in seen.body.decode("latin-1") or any(ACCESS_KEY in value for _, value in seen.headers)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "sk-ant-client-key-0000"},
        {"authorization": "Bearer sk-proxy-access-0002"},
        {"x-ccf-access-key": ACCESS_KEY[:-1]},
    ],
    ids=["none", "client-key", "wrong-bearer", "wrong-access-header"],
)
def test_requests_without_the_access_key_get_401(keyed_proxy, primary, backup, headers):
    response = raw_post(keyed_proxy, headers)
    assert response.status_code == 401
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "authentication_error"
    assert ACCESS_KEY not in response.text
    assert primary.requests == [] and backup.requests == []
    assert keyed_proxy.metric("ccf_requests_total", outcome="rejected") == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": ACCESS_KEY},
        {"authorization": f"Bearer {ACCESS_KEY}"},
        {"x-ccf-access-key": ACCESS_KEY, "x-api-key": "sk-ant-client-key-0000"},
    ],
    ids=["x-api-key", "bearer", "x-ccf-access-key"],
)
def test_access_key_lets_requests_through_and_stays_at_the_proxy(keyed_proxy, primary, backup, headers):
    primary.behavior = Behavior(kind="status", status=529)  # both endpoints see the request
    response = raw_post(keyed_proxy, headers, stream=True)
    assert response.status_code == 200
    assert response.headers["x-fake-name"] == "backup"
    for fake, key in ((primary, PRIMARY_KEY), (backup, BACKUP_KEY)):
        seen = fake.wait_for_requests(1)[0]
        assert seen.header("x-api-key") == key
        assert seen.header("authorization") is None
        assert seen.header("x-ccf-access-key") is None
        assert not saw_access_key(seen)
    assert ACCESS_KEY not in keyed_proxy.logs()


@pytest.mark.parametrize(
    "headers",
    [{"x-api-key": ACCESS_KEY}, {"authorization": f"Bearer {ACCESS_KEY}"}],
    ids=["x-api-key", "bearer"],
)
def test_access_key_never_reaches_an_endpoint_without_its_own_key(proxy_factory, primary, headers):
    config = endpoints_config(primary, server={"accessKey": ACCESS_KEY})
    del config["endpoints"][0]["apiKey"]
    proxy = proxy_factory(config)
    raw_post(proxy, headers)
    assert not saw_access_key(primary.wait_for_requests(1)[0])


def test_access_key_with_a_keyless_endpoint_passes_the_clients_own_key(proxy_factory, primary):
    config = endpoints_config(primary, server={"accessKey": ACCESS_KEY})
    del config["endpoints"][0]["apiKey"]
    proxy = proxy_factory(config)
    response = raw_post(proxy, {"x-ccf-access-key": ACCESS_KEY, "x-api-key": "sk-ant-client-own"})
    assert response.status_code == 200
    seen = primary.wait_for_requests(1)[0]
    assert seen.header("x-api-key") == "sk-ant-client-own"
    assert not saw_access_key(seen)


def test_health_without_the_key_says_only_its_status(keyed_proxy, primary):
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "30"),))
    assert raw_post(keyed_proxy, {"x-ccf-access-key": ACCESS_KEY}).status_code == 200
    for key in ("", ACCESS_KEY[:-1]):  # none, or a wrong one
        status, body = keyed_proxy.get("/health", key=key)
        assert (status, json.loads(body)) == (200, {"status": "degraded"})
        assert b"primary" not in body and b"127.0.0.1" not in body
    whole = json.loads(keyed_proxy.get("/health", key=ACCESS_KEY)[1])
    assert whole["status"] == "degraded" and whole["clients"] == {"default": 1}
    assert whole["endpoints"][0]["lastError"] == "status"


@pytest.mark.parametrize(
    "headers",
    [{"x-api-key": ACCESS_KEY}, {"authorization": f"Bearer {ACCESS_KEY}"}],
    ids=["x-api-key", "bearer"],
)
def test_health_and_metrics_answer_in_full_to_the_key(keyed_proxy, headers):
    health = httpx.get(keyed_proxy.url + "/health", headers=headers, timeout=10)
    assert health.status_code == 200
    assert [e["name"] for e in health.json()["endpoints"]] == ["primary", "backup"]
    metrics = httpx.get(keyed_proxy.url + "/metrics", headers=headers, timeout=10)
    assert metrics.status_code == 200 and "ccf_requests_total" in metrics.text


def test_the_status_pages_cookie_opens_health_too(keyed_proxy):
    exchange = httpx.get(f"{keyed_proxy.url}/?key={ACCESS_KEY}", timeout=10)
    assert exchange.status_code == 303
    cookies = {"ccf_session": exchange.cookies["ccf_session"]}
    health = httpx.get(keyed_proxy.url + "/health", cookies=cookies, timeout=10).json()
    assert [e["name"] for e in health["endpoints"]] == ["primary", "backup"]


def test_metrics_need_the_key_but_the_metrics_port_stays_open(proxy_factory, primary):
    metrics_port = free_port()
    config = endpoints_config(primary, server={"accessKey": ACCESS_KEY, "metricsPort": metrics_port})
    proxy = proxy_factory(config)
    for key in ("", ACCESS_KEY[:-1]):
        status, body = proxy.get("/metrics", key=key)
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
        assert b"ccf_" not in body
    side = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
    assert side.status_code == 200 and "ccf_requests_total" in side.text


def test_health_and_metrics_stay_open_without_access_keys(proxy):
    for path in ("/health", "/metrics"):
        status, body = proxy.get(path, key="")
        assert status == 200 and b"primary" in body


# -- 8. probes under concurrent load (issue 4) ---------------------------------------------


def timed_stream(proxy, start: threading.Event) -> tuple[str, float]:
    start.wait(10)
    started = time.monotonic()
    try:
        text = stream_text(proxy)
    except Exception as e:  # a failure is a result to assert on, not a crash of the pool
        text = repr(e)
    return text, time.monotonic() - started


def recover_under_load(proxy, primary, backup, recovered: Behavior):
    """30 streams while the primary rate-limits, then 30 more as its cooldown ends.

    Returns the results of all 60, when the primary received its first request after the
    cooldown (the probe), and what the primary and the backup saw of the second wave.
    """
    primary.behavior = Behavior(kind="status", status=429)  # cooldownSeconds: 1
    backup.behavior = Behavior(kind="ok", text=WORDS, event_delay=0.15)  # ~2 s per stream
    first, second = threading.Event(), threading.Event()
    with ThreadPoolExecutor(60) as pool:
        futures = [pool.submit(timed_stream, proxy, first) for _ in range(30)]
        futures += [pool.submit(timed_stream, proxy, second) for _ in range(30)]
        first.set()
        backup.wait_for_requests(30)  # every first-wave request has chosen its endpoint
        assert 1 <= primary.request_count <= 30
        seen_before = primary.request_count
        primary.behavior = recovered
        wait_until(lambda: proxy.endpoint("primary")["cooldownSecondsLeft"] == 0, 5, "cooldown to end")
        assert proxy.metric("ccf_active_streams") > 0  # the first wave is still streaming
        second.set()
        probe = primary.wait_for_requests(seen_before + 1)[seen_before]
        results = [f.result(timeout=30) for f in futures]
    return results, probe.time, primary.requests[seen_before:], backup.requests[30:]


@pytest.fixture
def cooling_proxy(proxy_factory, primary, backup):
    return proxy_factory(endpoints_config(primary, backup, retry={"cooldownSeconds": 1}))


def test_recovery_under_load_sends_one_probe_and_loses_nothing(cooling_proxy, primary, backup):
    recovered = Behavior(kind="ok", text=WORDS, delay=1.2)  # slow probe (below firstByte, 2 s)
    results, probed_at, primary_seen, backup_seen = recover_under_load(
        cooling_proxy, primary, backup, recovered
    )
    assert [text for text, _ in results] == [WORDS] * 60
    assert max(duration for _, duration in results) < 8
    in_flight = [r for r in primary_seen if r.time < probed_at + recovered.delay]
    assert len(in_flight) == 1  # no stampede while the probe is out
    assert any(r.time < probed_at + recovered.delay for r in backup_seen)  # the rest went on
    assert cooling_proxy.endpoint("primary")["status"] == "healthy"
    assert cooling_proxy.metric("ccf_requests_total", outcome="success") == 60


def test_failed_probe_under_load_keeps_nobody_waiting(cooling_proxy, primary, backup):
    failing = Behavior(kind="status", status=503, delay=1.5, headers=(("retry-after", "30"),))
    results, probed_at, primary_seen, backup_seen = recover_under_load(
        cooling_proxy, primary, backup, failing
    )
    assert [text for text, _ in results] == [WORDS] * 60
    assert max(duration for _, duration in results) < 8
    assert len(primary_seen) == 1  # the one probe; retry-after keeps it out afterwards
    # All 29 other second-wave requests reached the backup before the probe's answer.
    assert len([r for r in backup_seen if r.time < probed_at + failing.delay]) == 29
    state = cooling_proxy.endpoint("primary")
    assert state["status"] == "cooling" and state["consecutiveFailures"] >= 2
    assert cooling_proxy.metric("ccf_requests_total", outcome="success") == 60


def test_an_exception_in_a_hook_answers_that_request_and_spares_the_process(proxy_factory, primary, backup):
    crash = Path(__file__).with_name("crash_addon.py")
    proxy = proxy_factory(endpoints_config(primary, backup), None, "-s", str(crash))
    crashed = post(proxy, headers={"x-test-crash": "1"})
    assert crashed.status_code == 500
    assert crashed.json()["error"]["type"] == "api_error"
    assert post(proxy).status_code == 200
    assert proxy.process is not None and proxy.process.poll() is None
    assert proxy.metric("ccf_requests_total", outcome="internal_error") == 1
    assert "forced crash for a test" in proxy.logs()


def test_listening_beyond_loopback_without_access_key_warns(proxy_factory, primary):
    exposed = proxy_factory(endpoints_config(primary), listen_host="0.0.0.0")
    assert "without server.accessKey" in exposed.logs()
    guarded = proxy_factory(
        endpoints_config(primary, server={"accessKey": "sk-proxy-access-0002"}), listen_host="0.0.0.0"
    )
    assert "without server.accessKey" not in guarded.logs()
    named = proxy_factory(
        endpoints_config(primary, server={"accessKeys": [{"name": "ci", "key": "sk-proxy-access-0003"}]}),
        listen_host="0.0.0.0",
    )
    assert "without server.accessKey" not in named.logs()
    local = proxy_factory(endpoints_config(primary))
    assert "without server.accessKey" not in local.logs()


def test_failover_statuses_are_configurable(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, retry={"statuses": [429]}))
    primary.behavior = Behavior(kind="status", status=503)
    assert post(proxy).status_code == 503
    assert backup.requests == []
    primary.behavior = Behavior(kind="status", status=429)
    assert post(proxy).status_code == 200
    assert len(backup.requests) == 1
