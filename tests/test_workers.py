"""Several worker processes on one port (`server.workers`), with `ccf dev` as users run it.

Real processes throughout: the supervisor, its workers, fake upstreams on loopback, and
clients that open a new connection for each request, so the kernel spreads them over the
workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from addon import launch
from addon.config import load_config
from addon.fakes.anthropic import Behavior
from addon.fleet import workers

from .conftest import clean_env, endpoints_config, free_port, wait_until
from .test_failover import MESSAGE

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="workers share a socket the Linux way")


def ask(proxy, stream: bool = False) -> httpx.Response:
    """One request on a connection of its own."""
    return httpx.post(
        proxy.url + "/v1/messages",
        json=dict(MESSAGE, stream=stream),
        headers={"x-api-key": "sk-ant-client-key-0000", "connection": "close"},
        timeout=30,
    )


def every_worker(proxy, count: int = 2, seen_as=lambda health: True) -> dict[int, dict]:
    """/health from each worker (new connections until every index answered) once `seen_as` holds."""
    seen: dict[int, dict] = {}

    def all_seen() -> bool:
        health = proxy.health()
        if seen_as(health):
            seen[health["workers"]["index"]] = health
        return len(seen) == count

    wait_until(all_seen, 10, f"every one of {count} workers to answer /health")
    return seen


def process_stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command's name: state, parent pid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    try:
        state = process_stat(pid)[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited


def parent_of(pid: int) -> int:
    return int(process_stat(pid)[1])


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if parent_of(int(stat.parent.name)) == pid and alive(int(stat.parent.name)):
                children.append(int(stat.parent.name))
    return children


def run_dev(tmp_path: Path, config: Path, port: int) -> subprocess.CompletedProcess[str]:
    """`ccf dev` to its end, for a start that should fail."""
    return subprocess.run(
        [sys.executable, "-m", "addon.cli", "-c", str(config), "-p", str(port), "dev"],
        capture_output=True,
        text=True,
        env=clean_env(tmp_path / "home"),
        timeout=30,
    )


def test_workers_share_the_port_and_each_serves(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    workers = every_worker(proxy)
    assert {w["workers"]["count"] for w in workers.values()} == {2}
    assert len({w["workers"]["pid"] for w in workers.values()}) == 2
    assert all(w["state"] == "workers" for w in workers.values())
    replies = [ask(proxy, stream=i % 2 == 0) for i in range(20)]
    assert [r.status_code for r in replies] == [200] * 20
    assert all(r.headers["x-fake-name"] == "primary" for r in replies)
    assert "message_stop" in replies[0].text


def test_connections_opened_at_once_are_spread_over_the_workers(proxy_factory, primary, backup):
    # 16 connections at once, as a load generator or a busy gateway opens them: the kernel
    # spreads them (SO_REUSEPORT), rather than the first worker to wake taking them all.
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    every_worker(proxy)
    clients = [httpx.Client(base_url=proxy.url, timeout=10) for _ in range(16)]
    try:
        with ThreadPoolExecutor(16) as pool:
            indexes = list(pool.map(lambda c: c.get("/health").json()["workers"]["index"], clients))
        assert 1 <= indexes.count(0) <= 15, indexes  # all on one worker: 1 in 30,000 if fair
    finally:
        for client in clients:
            client.close()


def test_workers_start_for_an_https_target_whose_mode_also_wants_udp(proxy_factory):
    # mitmproxy's reverse mode to https listens on UDP too (HTTP/3); only one worker can.
    config = {"endpoints": [{"name": "remote", "baseUrl": "https://127.0.0.1:9"}], "server": {"workers": 2}}
    proxy = proxy_factory(config, ccf=True)
    every_worker(proxy)
    assert "worker_restarted" not in proxy.logs()
    assert "Address already in use" not in proxy.logs()


def test_a_429_seen_by_one_worker_keeps_every_worker_off_the_primary(proxy_factory, primary, backup):
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "60"),))
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    every_worker(proxy)
    assert ask(proxy).headers["x-fake-name"] == "backup"
    cooling = every_worker(proxy, seen_as=lambda h: h["endpoints"][0]["status"] == "cooling")
    assert all(w["endpoints"][0]["cooldownSecondsLeft"] > 55 for w in cooling.values())
    for i in range(20):
        assert ask(proxy, stream=i % 2 == 0).headers["x-fake-name"] == "backup"
    assert primary.request_count == 1  # in total, across the workers


def test_metrics_count_every_workers_requests(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    every_worker(proxy)
    for i in range(24):
        assert ask(proxy, stream=i % 2 == 0).status_code == 200
    served = primary.request_count
    assert served == 24
    for _ in range(6):  # whichever worker answers /metrics gives the sum
        assert proxy.metric("ccf_requests_total", outcome="success") == 24
        assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="ok") == 24
        assert proxy.metric("ccf_active_streams") == 0
    clients = every_worker(proxy)
    assert {w["clients"].get("anonymous") for w in clients.values()} == {24}


def test_a_worker_that_dies_is_started_again_and_the_others_serve_meanwhile(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    before = every_worker(proxy)
    victim = before[1]["workers"]["pid"]
    supervisor = parent_of(victim)
    os.kill(victim, signal.SIGKILL)
    known = {victim, before[0]["workers"]["pid"]}
    wait_until(lambda: set(children_of(supervisor)) - known, 10, "the successor's process")
    # which takes a second to start: no connection waits for it meanwhile
    assert {proxy.health()["workers"]["index"] for _ in range(4)} == {0}
    for i in range(10):
        assert ask(proxy, stream=i % 2 == 0).status_code == 200
    after = every_worker(proxy, seen_as=lambda h: h["workers"]["pid"] != victim)
    assert after[1]["workers"]["pid"] != victim
    assert after[0]["workers"]["pid"] == before[0]["workers"]["pid"]


def test_stopping_the_supervisor_stops_every_worker(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    pids = [w["workers"]["pid"] for w in every_worker(proxy).values()]
    proxy.process.terminate()
    assert proxy.process.wait(15) == 0
    wait_until(lambda: not any(alive(pid) for pid in pids), 5, "every worker to exit")


def test_a_second_proxy_with_workers_on_the_same_port_is_refused(proxy_factory, primary, backup, tmp_path):
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    every_worker(proxy)
    config = tmp_path / "second.yaml"
    config.write_text(f"endpoints:\n  - {{name: p, baseUrl: '{primary.url}'}}\nserver: {{workers: 2}}\n")
    result = run_dev(tmp_path, config, proxy.port)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{proxy.port}" in result.stderr
    for _ in range(6):  # and the first one's workers still serve alone
        assert ask(proxy).status_code == 200


def test_workers_whose_supervisor_was_killed_stop_by_themselves(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    pids = [w["workers"]["pid"] for w in every_worker(proxy).values()]
    proxy.process.kill()
    proxy.process.wait(5)
    wait_until(lambda: not any(alive(pid) for pid in pids), 10, "the orphaned workers to exit")


@pytest.mark.parametrize("holder", ["listening", "bound"])
def test_a_port_in_use_fails_once_and_says_so(tmp_path, primary, holder):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    if holder == "listening":
        taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(f"endpoints:\n  - {{name: p, baseUrl: '{primary.url}'}}\nserver: {{workers: 2}}\n")
    started = time.monotonic()
    result = run_dev(tmp_path, config, port)
    taken.close()
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert result.stderr.count("cannot listen") == 1
    assert time.monotonic() - started < 10


def test_the_metrics_port_serves_every_workers_counts(proxy_factory, primary, backup):
    port = free_port()
    config = endpoints_config(primary, backup, server={"workers": 2, "metricsPort": port})
    proxy = proxy_factory(config, ccf=True)
    every_worker(proxy)
    for _ in range(10):
        assert ask(proxy).status_code == 200
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'ccf_requests_total{client="anonymous",outcome="success"} 10.0' in text
    assert "cannot" not in proxy.logs().lower()


def test_sighup_reloads_every_worker(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    every_worker(proxy)
    proxy.process.send_signal(signal.SIGHUP)
    for index in (0, 1):
        wait_until(
            lambda i=index: f'"event": "config_reloaded", "worker": {i}' in proxy.logs(),
            5,
            f"worker {index} to reload",
        )
    assert proxy.process.poll() is None
    assert ask(proxy).status_code == 200


def test_the_status_pages_reload_button_reloads_every_worker(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    every_worker(proxy)

    def press() -> httpx.Response:
        return httpx.post(
            proxy.url + "/dashboard/reload", headers={"sec-fetch-site": "same-origin"}, timeout=10
        )

    assert press().json() == {"ok": True, "error": None}
    for index in (0, 1):
        wait_until(
            lambda i=index: proxy.logs().count(f'"event": "config_reloaded", "worker": {i}') == 1,
            10,
            f"worker {index} to reload once",
        )
    proxy.config_path.write_text("endpoints: not a list\n")
    refused = press()
    assert refused.status_code == 422 and refused.json()["ok"] is False
    assert proxy.logs().count('"event": "config_reloaded"') == 2  # nobody reloaded a bad file
    assert ask(proxy).status_code == 200


def test_connections_go_to_the_worker_with_the_fewest(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, server={"workers": 2}), ccf=True)
    every_worker(proxy)
    kept = []  # clients keep their connections: 32 at once, none closed during the test
    try:
        for _ in range(32):
            connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            connection.request("GET", "/health")
            kept.append((connection, json.load(connection.getresponse())["workers"]["index"]))
        # the first few may still count a connection of every_worker's whose close was on its way
        assert Counter(index for _, index in kept) == {0: 16, 1: 16}
    finally:
        for connection, _ in kept:
            connection.close()


def test_the_status_page_lists_every_workers_incidents(proxy_factory, primary, backup):
    config = endpoints_config(primary, backup, retry={"cooldownSeconds": 0}, server={"workers": 2})
    proxy = proxy_factory(config, ccf=True)
    primary.behavior = Behavior(kind="status", status=529)  # every request fails over
    every_worker(proxy)

    def failed_over_in_both() -> bool:
        assert ask(proxy).status_code == 200
        logs = proxy.logs()
        return all(f'"event": "failover", "worker": {i}' in logs for i in (0, 1))

    wait_until(failed_over_in_both, 20, "a failover in each worker")
    pages: dict[int, set[int]] = {}  # by the worker that answered: whose incidents it listed

    def each_lists_both() -> bool:
        summary = httpx.get(proxy.url + "/dashboard/summary", headers={"connection": "close"}).json()
        pages[summary["workers"]["index"]] = {i["worker"] for i in summary["incidents"]}
        return pages == {0: {0, 1}, 1: {0, 1}}

    wait_until(each_lists_both, 20, "each worker's page to list both workers' incidents")


def test_workers_that_keep_dying_at_start_stop_the_supervisor(tmp_path, primary):
    config = tmp_path / "config.yaml"
    config.write_text(f"endpoints:\n  - {{name: p, baseUrl: '{primary.url}'}}\nserver: {{workers: 2}}\n")
    port = free_port()
    # the supervisor takes this option as it comes; every worker's mitmproxy refuses it
    sets = [f"mode=reverse:{primary.url}@{port}", f"fallback_config={config}", "no_such_option=1"]
    started = time.monotonic()
    result = subprocess.run(
        launch.command(sets),
        capture_output=True,
        text=True,
        env=clean_env(tmp_path / "home"),
        timeout=60,
    )
    assert result.returncode == 2  # the workers' own exit status
    assert result.stdout.count('"event": "worker_failing"') >= 1
    assert time.monotonic() - started < 30


def test_a_stop_while_a_worker_is_starting_reaches_that_worker(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    supervisor = workers.Supervisor([], load_config(None, {"CLAUDE_FALLBACK_HOME": str(tmp_path)}), sleeper)
    listener = socket.socket()

    async def stop_at_once() -> None:
        supervisor.env = {
            **os.environ,
            workers.ENV_LISTEN: f"0:{listener.fileno()}",
            workers.METRICS_DIR: str(tmp_path),
        }
        kept = asyncio.ensure_future(supervisor.keep(0))
        await asyncio.sleep(0)  # `keep` is now starting the worker
        assert not supervisor.workers
        supervisor.stop(signal.SIGTERM)
        await asyncio.wait_for(kept, 20)  # the worker got the signal and ended

    asyncio.run(stop_at_once())
    listener.close()
    assert supervisor.exit_code == -signal.SIGTERM


def test_a_worker_tells_each_closed_connection_even_when_its_channel_is_full():
    supervisor_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    served: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(await reader.read(10))
        writer.close()

    async def scenario() -> bytes:
        workers.take_connections(worker_end, serve)
        assert supervisor_end.recv(1) == workers.READY
        worker_end.setblocking(False)
        filler = 0
        with contextlib.suppress(BlockingIOError):  # the supervisor reads nothing for a while
            while True:
                filler += worker_end.send(b"x" * 4096)
        clients = []
        for _ in range(5):
            client, connection = socket.socketpair()
            socket.send_fds(supervisor_end, [workers.HANDED], [connection.fileno()])
            connection.close()
            client.sendall(b"hello")
            clients.append(client)
        await wait_for(lambda: len(served) == 5)
        supervisor_end.setblocking(False)
        told = b""
        async with asyncio.timeout(10):
            while told.count(workers.CLOSED) < 5:  # reading makes room: what waited follows
                with contextlib.suppress(BlockingIOError):
                    told += supervisor_end.recv(1 << 16)
                await asyncio.sleep(0.01)
        for client in clients:
            client.close()
        return told[filler:]

    async def wait_for(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not condition():
                await asyncio.sleep(0.01)

    assert asyncio.run(scenario()) == workers.CLOSED * 5
    assert served == [b"hello"] * 5
    supervisor_end.close()
    worker_end.close()


def test_until_a_worker_serves_the_port_answers_503_at_once(tmp_path, primary):
    config, port = tmp_path / "config.yaml", free_port()
    config.write_text(yaml.safe_dump(endpoints_config(primary, server={"workers": 2})))
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "addon.cli", "-c", str(config), "-p", str(port), "dev"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(tmp_path / "home"),
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: accepts(port), 10, "the supervisor's port")
        answers = []

        def served() -> bool:
            started = time.monotonic()
            for method, path in (("GET", "/health"), ("POST", "/v1/messages")):
                response = httpx.request(method, url + path, json=MESSAGE, timeout=5)
                answers.append(
                    (path, response.status_code, response.json(), response.headers.get("retry-after"))
                )
            assert time.monotonic() - started < 2.0  # both answered at once, none waited for a worker
            return answers[-1][1] == 200

        wait_until(served, 30, "a worker to serve")
        starting = [a for a in answers if a[1] == 503]
        assert ("/health", 503, {"status": "starting"}, "1") in starting
        assert any(a[0] == "/v1/messages" and a[2]["error"]["type"] == "overloaded_error" for a in starting)
        assert "claude-code-fallback on " in log.read_text()  # said once a worker served
    finally:
        dev.terminate()
        dev.wait(20)


def test_the_starting_answer_is_a_whole_http_response():
    async def exchange(request: bytes) -> bytes:
        ours, theirs = socket.socketpair()
        with theirs:
            theirs.sendall(request)
            await workers.answer_starting(ours)
            return theirs.recv(65536)

    health = asyncio.run(exchange(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"))
    head, _, body = health.partition(b"\r\n\r\n")
    assert (
        head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head and body == b'{"status": "starting"}'
    )
    assert b"content-length: %d" % len(body) in head
    ready = asyncio.run(exchange(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert ready.startswith(b"HTTP/1.1 503 ") and ready.endswith(b'{"status": "starting"}')
    alive = asyncio.run(exchange(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert alive.startswith(b"HTTP/1.1 200 ") and alive.endswith(b'{"status": "alive"}')
    probe = asyncio.run(exchange(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert probe.endswith(b"\r\n\r\n")  # a HEAD gets no body


def accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
