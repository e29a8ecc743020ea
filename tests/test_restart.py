"""`ccf restart` under load, counted at the client, and the drain a load balancer sees (rows 55-60).

Each test runs the real `ccf` against fake upstreams on loopback: long streams and new
requests at a steady rate (on new connections, and on the official SDK's kept-alive
connections, with its retries off so nothing is hidden) while the proxy restarts.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from addon.cli import commands as cli_module
from addon.fakes.anthropic import Behavior, FakeAnthropic
from addon.fleet import handover
from addon.fleet.listener import Listener

from .conftest import endpoints_config, free_port, wait_until
from .test_cli import ROOT, Cli, dead_pid, process_gone

WORDS = " ".join(f"w{i}" for i in range(30))  # a stream of about 3 s at 0.1 s an event
MESSAGE = {"model": "claude-opus-4-8", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


class Load:
    """Clients through the proxy while it restarts; what did not end whole is kept, by kind."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.answers = 0
        self.refused = 0
        self.failures: list[str] = []
        self.threads: list[threading.Thread] = []

    def start(self, streams: int, steady: int) -> Load:
        for _ in range(streams):
            self.run(self.one_stream)
        for i in range(steady):
            self.run(self.steady_sdk if i % 2 else self.steady_raw)
        return self

    def run(self, target: Any) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def finish(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client hung"

    def counted(self, failure: str | None) -> None:
        with self.lock:
            if failure is None:
                self.answers += 1
            elif failure == "refused":
                self.refused += 1
            else:
                self.failures.append(failure)

    def one_stream(self, stream: bool = True) -> None:
        """One request on a new connection, read to its end."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = json.dumps({**MESSAGE, "stream": stream})
        headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
        try:
            connection.request("POST", "/v1/messages", body, headers)
            response = connection.getresponse()
            data = response.read().decode()
        except ConnectionRefusedError:
            self.counted("refused")
            return
        except (OSError, http.client.HTTPException) as e:
            self.counted(f"{type(e).__name__}: {e}")
            return
        finally:
            connection.close()
        if response.status != 200:
            self.counted(f"status {response.status}: {data[:200]}")
        elif stream:
            whole = data.rstrip().endswith('data: {"type":"message_stop"}') and text_of(data) == WORDS
            self.counted(None if whole else f"cut stream: {data[-200:]!r}")
        else:
            whole = json.loads(data)["content"][0]["text"] == WORDS
            self.counted(None if whole else f"incomplete answer: {data[-200:]!r}")

    def steady_raw(self) -> None:
        while not self.stopping.wait(0.05):
            self.one_stream(stream=False)

    def steady_sdk(self) -> None:
        client = anthropic.Anthropic(
            base_url=f"http://127.0.0.1:{self.port}", api_key="sk-ant-client-0000", max_retries=0
        )
        while not self.stopping.wait(0.05):
            try:
                text = client.messages.create(**MESSAGE).content[0].text  # type: ignore[union-attr]
            except anthropic.APIError as e:
                self.counted(f"{type(e).__name__}: {e}")
                continue
            self.counted(None if text == WORDS else f"incomplete answer: {text!r}")
        client.close()

    def assert_whole(self, answers: int = 30) -> None:
        assert self.refused == 0, f"{self.refused} connections refused"
        assert self.failures == [], self.failures
        assert self.answers >= answers, f"only {self.answers} answers: the load did not run"


def text_of(sse: str) -> str:
    pieces = []
    for line in sse.splitlines():
        if line.startswith("data: ") and '"text_delta"' in line:
            pieces.append(json.loads(line[6:])["delta"]["text"])
    return "".join(pieces)


def processes(home: Path) -> list[dict[str, Any]]:
    """What every proxy of this home says of itself through its control socket."""
    found = (handover.status_of(path) for path in handover.all_paths({"CLAUDE_FALLBACK_HOME": str(home)}))
    return [status for status in found if status is not None]


@pytest.fixture
def ccf(tmp_path: Path) -> Iterator[Cli]:
    runner = Cli(tmp_path / "home")
    yield runner
    pids = [int(s["pid"]) for s in processes(runner.home)]
    if runner.pid_file.exists():
        pids.append(runner.pid())
    for pid in pids:  # whatever a test did, leave no proxy behind
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda pid=pid: process_gone(pid), 10, f"pid {pid} to exit")


def configured(ccf: Cli, primary: FakeAnthropic, **server: Any) -> int:
    port = free_port()
    ccf.write_config(endpoints_config(primary, server={"port": port, **server}))
    os.chmod(ccf.config_path, 0o600)
    return port


def holder(ccf: Cli, port: int) -> dict[str, Any]:
    status = handover.status_of(handover.control_path(port, ccf.env))
    assert status is not None, f"nothing holds port {port}"
    return status


def restart_under_load(ccf: Cli, port: int, checkout: Path = ROOT) -> tuple[dict[str, Any], str]:
    """Long streams and a steady load, and `ccf restart` (from `checkout`) in the middle; every
    answer must come whole. Returns what held the port before, and what the command said."""
    old = holder(ccf, port)
    load = Load(port).start(streams=6, steady=4)
    wait_until(lambda: load.answers >= 4, 20, "the load to run")
    started = len(load.threads)
    command = [sys.executable, "-m", "addon.cli", "restart"]
    result = subprocess.run(command, cwd=checkout, env=ccf.env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    for _ in range(4):  # and long streams that begin on the new process
        load.run(load.one_stream)
    wait_until(lambda: load.answers >= 30, 30, "answers from the new process")
    load.finish()
    assert len(load.threads) == started + 4
    load.assert_whole()
    wait_until(lambda: process_gone(old["pid"]), 30, "the old process to exit once idle")
    assert ccf.pid() == holder(ccf, port)["pid"] != old["pid"]
    return old, result.stdout


def stopped(ccf: Cli) -> None:
    """`ccf stop` from this checkout stops the proxy, whichever checkout's code it runs."""
    pid = ccf.pid()
    result = ccf("stop")
    assert result.returncode == 0 and "stopped" in result.stdout, result.stdout
    assert process_gone(pid)


def second_checkout(tmp_path: Path, version: str) -> Path:
    """A copy of this checkout's code that calls itself `version`: what an upgrade installs."""
    copy = tmp_path / "newer"
    shutil.copytree(ROOT / "addon", copy / "addon", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "addon" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "2.0.0"', f'__version__ = "{version}"'))
    return copy


def health(port: int) -> dict[str, Any]:
    answer = cli_module.fetch(f"http://127.0.0.1:{port}/health")
    assert answer is not None
    document: dict[str, Any] = json.loads(answer[1])
    return document


def test_a_restart_under_load_cuts_no_stream_and_refuses_no_connection(
    ccf: Cli, fakes: Any, primary: FakeAnthropic
) -> None:
    """Row 55: one process hands its port and its endpoints' cooldowns to the next."""
    spare = fakes("spare")  # first in line, and down for the next 10 minutes
    spare.behavior = Behavior(kind="status", status=529)
    primary.behavior = Behavior(kind="ok", text=WORDS, event_delay=0.1)
    port = free_port()
    ccf.write_config(endpoints_config(spare, primary, server={"port": port}, retry={"cooldownSeconds": 600}))
    started = ccf("restart")  # nothing runs yet: a restart starts it
    assert started.returncode == 0 and "not running: starting" in started.stdout, started.stdout
    Load(port).one_stream()
    assert len(spare.requests) == 1
    old, said = restart_under_load(ccf, port)
    assert f"pid {old['pid']} (2.0.0) handed the port to pid {ccf.pid()} (2.0.0)" in said, said
    assert len(spare.requests) == 1  # the new process knew it cools: it never tried it
    assert health(port)["endpoints"][0]["status"] == "cooling"
    stopped(ccf)


def test_an_upgrade_that_adds_workers_rolls_them_under_load(
    ccf: Cli, primary: FakeAnthropic, tmp_path: Path
) -> None:
    """Rows 56-57: from two workers to three, to a newer version of the code, one worker at a time."""
    primary.behavior = Behavior(kind="ok", text=WORDS, event_delay=0.1)
    port = configured(ccf, primary, workers=2)
    assert ccf("start").returncode == 0
    newer = second_checkout(tmp_path, "2.0.1")
    configured_port = yaml_port(ccf)
    assert configured_port == port
    rewrite_workers(ccf, 3)  # a change a reload cannot apply
    old, said = restart_under_load(ccf, port, newer)
    assert f"pid {old['pid']} (2.0.0) handed the port to pid {ccf.pid()} (2.0.1)" in said, said
    new = holder(ccf, port)
    assert (new["version"], new["workers"]) == ("2.0.1", 3)
    assert health(port)["workers"]["count"] == 3
    logs = (ccf.home / "ccf.log").read_text()
    assert logs.count('"event": "worker_retiring"') == 2, logs  # each old worker retired once
    stopped(ccf)


def yaml_port(ccf: Cli) -> int:
    import yaml

    return int(yaml.safe_load(ccf.config_path.read_text())["server"]["port"])


def rewrite_workers(ccf: Cli, count: int) -> None:
    import yaml

    config = yaml.safe_load(ccf.config_path.read_text())
    config["server"]["workers"] = count
    ccf.write_config(config)


def test_a_successor_that_cannot_start_leaves_the_old_one_serving(
    ccf: Cli, primary: FakeAnthropic, tmp_path: Path
) -> None:
    """Row 58: a broken config, or code that does not import, stops the restart, not the proxy."""
    port = configured(ccf, primary)
    assert ccf("start").returncode == 0
    pid = ccf.pid()
    config_text = ccf.config_path.read_text()
    ccf.config_path.write_text(config_text.replace("baseUrl: http", "baseUrl: htp"))
    result = ccf("restart")
    assert result.returncode == 2
    assert "endpoints[0].baseUrl" in result.stderr and "still serves" in result.stderr, result.stderr
    ccf.config_path.write_text(config_text)
    broken = second_checkout(tmp_path, "2.0.1")
    (broken / "addon" / "proxy.py").write_text("import no_such_module\n")
    command = [sys.executable, "-m", "addon.cli", "restart"]
    result = subprocess.run(command, cwd=broken, env=ccf.env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 1
    assert "no_such_module" in result.stderr  # the new process's last lines say why
    assert f"exited with status 1; pid {pid} still serves" in result.stderr, result.stderr
    assert ccf.pid() == pid and holder(ccf, port)["pid"] == pid
    assert post_status(port) == 200
    assert health(port)["status"] == "ok"


def post_status(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/v1/messages", json.dumps(MESSAGE), {"content-type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def streaming(ccf: Cli, primary: FakeAnthropic, text: str) -> tuple[int, int, Load]:
    """`ccf start`, and one stream of `text` (an event every 0.1 s) in flight through it: the
    port, the proxy's pid, and the load that reads the stream."""
    primary.behavior = Behavior(kind="ok", text=text, event_delay=0.1)
    port = configured(ccf, primary)
    assert ccf("start").returncode == 0
    load = Load(port)
    load.run(load.one_stream)
    primary.wait_for_requests(1)
    return port, ccf.pid(), load


def test_a_stop_drains_visibly_and_refuses_new_work_cleanly(ccf: Cli, primary: FakeAnthropic) -> None:
    """Row 59: while a stream finishes, /health and /readyz say draining, new work gets a 503 to retry."""
    port, pid, load = streaming(ccf, primary, WORDS)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: health(port)["status"] == "draining", 10, "the drain to show")
    assert cli_module.fetch(f"http://127.0.0.1:{port}/health")[0] == 503  # type: ignore[index]
    assert cli_module.fetch(f"http://127.0.0.1:{port}/readyz") == (503, b'{"status": "draining"}')
    assert cli_module.fetch(f"http://127.0.0.1:{port}/livez") == (200, b'{"status": "alive"}')
    status = ccf("status")
    assert "draining" in status.stdout, status.stdout
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/v1/messages", json.dumps(MESSAGE), {"content-type": "application/json"})
    refused = connection.getresponse()
    assert refused.status == 503
    assert json.loads(refused.read())["error"]["type"] == "overloaded_error"
    assert (refused.getheader("retry-after"), refused.getheader("x-should-retry")) == ("1", "true")
    load.finish()
    load.assert_whole(answers=1)
    wait_until(lambda: process_gone(pid), 10, "the proxy to exit once the stream ended")


def test_stop_now_cuts_at_once(ccf: Cli, primary: FakeAnthropic) -> None:
    """Row 60: `ccf stop --now` (or a second SIGTERM) does not wait for answers in flight."""
    _, pid, load = streaming(ccf, primary, " ".join(["w"] * 300))  # 30 s
    began = time.monotonic()
    result = ccf("stop", "--now")
    assert result.returncode == 0 and "stopped" in result.stdout, result.stdout
    assert time.monotonic() - began < 10
    assert process_gone(pid)
    load.finish()
    assert load.answers == 0 and len(load.failures) == 1  # the stream was cut, and the client saw it


class Holding:
    """A process's side of the control socket, as a test double: what a successor asked of it."""

    def __init__(self, listening: socket.socket) -> None:
        self.listening = listening
        self.asked: list[str] = []

    def hello(self) -> tuple[dict[str, Any], socket.socket]:
        self.asked.append("hello")
        return {"pid": 1, "address": ["127.0.0.1", 1], "carry": {"sessions": []}}, self.listening

    async def retire(self) -> int:
        self.asked.append("retire")
        return 0

    def resume(self) -> None:
        self.asked.append("resume")

    def released(self) -> None:
        self.asked.append("released")

    def status(self) -> dict[str, Any]:
        return {"pid": 1, "state": "serving"}


@pytest.mark.parametrize(("finishes", "home"), [(True, "home"), (False, "h" * 120)])
def test_a_successor_that_leaves_before_done_gives_the_port_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, finishes: bool, home: str
) -> None:
    """Also where the home's path is too long for a Unix socket's address."""
    monkeypatch.setenv("CLAUDE_FALLBACK_HOME", str(tmp_path / home))
    with socket.create_server(("127.0.0.1", 0)) as listening:
        holding = Holding(listening)

        async def scenario() -> None:
            control = handover.Control(holding, 1)
            stale = handover.own_path(dead_pid())  # a process killed before it could clean up
            stale.parent.mkdir(parents=True, mode=0o700)
            stale.touch()
            assert control.start()
            assert not stale.exists()
            control.publish()
            path = handover.control_path(1)
            predecessor = await asyncio.to_thread(handover.Predecessor.reach, str(path))
            inherited = predecessor.listener.getsockname()
            predecessor.listener.close()
            assert inherited == listening.getsockname()  # the very socket, not a new one
            assert predecessor.carried == {"sessions": []}
            await predecessor.retire_all()
            if finishes:
                await predecessor.done()
            else:
                predecessor.peer.close()
            await asyncio.wait_for(until(lambda: len(holding.asked) == 3), 5)
            control.stop()
            assert not path.exists() and not control.path.exists()

        asyncio.run(scenario())
    assert holding.asked == ["hello", "retire", "released" if finishes else "resume"]


async def until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_a_connection_the_proxy_accepts_itself_has_nagle_off() -> None:
    """Else a small answer waits for the client's delayed ACK: 40 ms a request, not 1."""
    taken: list[socket.socket] = []

    async def scenario() -> None:
        with handover.bind("127.0.0.1", 0) as listening:
            listener = Listener(listening, taken.append)
            listener.resume()
            with socket.create_connection(listening.getsockname()[:2]):
                await until(lambda: bool(taken))
            listener.pause()

    asyncio.run(scenario())
    assert taken[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    taken[0].close()
