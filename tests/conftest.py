"""Shared fixtures: real mitmdump processes running the addon, fake Anthropic upstreams on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from addon.fakes.anthropic import FakeAnthropic
from addon.fakes.openai import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon" / "fallback.py"
# Test keys are distinctive so a leak is easy to grep for.
PRIMARY_KEY = "sk-ant-test-PRIMARYSECRETKEY0000000001"
BACKUP_KEY = "sk-ant-test-BACKUPSECRETKEY00000000002"
ACCESS_KEY = "ccf-test-ACCESSSECRETKEY0000000000005"  # server.accessKey, for tests that set one


def _cut_stream_errors() -> tuple[type[BaseException], ...]:
    import anthropic
    import httpx

    errors: list[type[BaseException]] = [
        anthropic.APIConnectionError,
        httpx.RemoteProtocolError,
        httpx.ReadError,
    ]
    try:  # anthropic 2.x brings its own fork of httpx
        import httpx2  # type: ignore[import-not-found]

        errors += [httpx2.RemoteProtocolError, httpx2.ReadError]
    except ImportError:
        pass
    return tuple(errors)


# What a client raises when the proxy aborts a stream instead of ending it cleanly.
CUT_STREAM_ERRORS = _cut_stream_errors()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def mitmdump_command() -> list[str]:
    script = Path(sys.executable).parent / "mitmdump"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]


def clean_env(home: Path) -> dict[str, str]:
    """This environment less the caller's own settings, with its own CLAUDE_FALLBACK_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_FALLBACK_", "ANTHROPIC_"))}
    env["CLAUDE_FALLBACK_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)  # for `python -m addon.cli`
    return env


class Proxy:
    """A real mitmdump running the addon against a config written for the test (or `ccf dev`)."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any] | str | None,
        env: dict[str, str] | None = None,
        target: str = "http://127.0.0.1:9",
        listen_host: str = "127.0.0.1",
        ccf: bool = False,
    ) -> None:
        self.workdir = workdir
        self.ccf = ccf
        self.target = target
        self.listen_host = listen_host
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "config.yaml"
        if config is not None:
            text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
            self.config_path.write_text(text)
        self.log_path = workdir / "proxy.log"
        self.env = {**clean_env(workdir / "home"), **(env or {})}
        self.key = access_key_of(config)  # what `get` presents, as `ccf status` does
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        if self.ccf:  # as a user runs it: `ccf dev`, the lean master
            return [
                sys.executable,
                "-m",
                "addon.cli",
                "-c",
                str(self.config_path),
                "-p",
                str(self.port),
                "dev",
            ]
        args = [
            *mitmdump_command(),
            "-s",
            str(ADDON),
            "--mode",
            f"reverse:{self.target}@{self.port}",
            "--listen-host",
            self.listen_host,
            "--set",
            "termlog_verbosity=info",
            "--set",
            "flow_detail=0",
        ]
        if self.config_path.exists():
            args += ["--set", f"fallback_config={self.config_path}"]
        return args + list(extra)

    def start(self, *extra: str) -> Proxy:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - held open for the process's lifetime
        self.process = subprocess.Popen(
            self.command(*extra),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )
        wait_until(self.ready, 20, f"proxy on port {self.port} (log: {self.logs()[-2000:]})")
        return self

    def ready(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise AssertionError(f"proxy exited with {self.process.returncode}: {self.logs()}")
        try:
            # workers' supervisor answers "starting" until a worker serves
            return b'"starting"' not in self.get("/health")[1]
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "log"):
            self.log.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, key: str | None = None) -> tuple[int, bytes]:
        """GET `path`, presenting the proxy's access key (`key`, else the config's, if any)."""
        key = self.key if key is None else key
        request = urllib.request.Request(self.url + path, headers={"x-ccf-access-key": key} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/health")[1])

    def health_fleet(self) -> list[dict[str, Any]] | None:
        fleet: list[dict[str, Any]] | None = json.loads(self.get("/health?fleet=1")[1])["fleet"]
        return fleet

    def endpoint(self, name: str) -> dict[str, Any]:
        return next(e for e in self.health()["endpoints"] if e["name"] == name)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics; 0 when the sample does not exist yet."""
        text = self.get("/metrics")[1].decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0


def access_key_of(config: dict[str, Any] | str | None) -> str:
    """The key a test's proxy needs, if its config sets one: accessKey, else the first named one."""
    if not isinstance(config, dict):
        return ""
    server = config.get("server") or {}
    named = server.get("accessKeys") or [{}]
    return str(server.get("accessKey") or named[0].get("key") or "")


def endpoints_config(*fakes: FakeAnthropic, **sections: Any) -> dict[str, Any]:
    keys = [PRIMARY_KEY, BACKUP_KEY]
    config: dict[str, Any] = {
        "endpoints": [
            {"name": fake.name, "baseUrl": fake.url, "apiKey": keys[i % 2]} for i, fake in enumerate(fakes)
        ],
        "retry": {"initialDelay": 50, "maxDelay": 200, "cooldownSeconds": 30},
        "timeouts": {
            "connect": 1000,
            "firstByte": 2000,
            "response": 3000,
            "idle": 2000,
            "total": 15000,
        },
        "logging": {"level": "debug"},
    }
    for key, value in sections.items():
        config.setdefault(key, {}).update(value)
    return config


@pytest.fixture
def fakes() -> Iterator[Callable[[str], FakeAnthropic]]:
    started: list[FakeAnthropic] = []

    def make(name: str) -> FakeAnthropic:
        fake = FakeAnthropic(name).start_in_thread()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop_thread()


@pytest.fixture(scope="module")
def openai_server() -> Iterator[FakeOpenAI]:
    """One fake OpenAI upstream for a module's tests; reset it in each test's own fixture."""
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    proxies: list[Proxy] = []

    def make(
        config: dict[str, Any] | str | None,
        env: dict[str, str] | None = None,
        *extra: str,
        target: str = "http://127.0.0.1:9",
        listen_host: str = "127.0.0.1",
        ccf: bool = False,
    ) -> Proxy:
        workdir = tmp_path / f"proxy{len(proxies)}"
        workdir.mkdir()
        proxy = Proxy(workdir, config, env, target, listen_host, ccf)
        proxies.append(proxy)
        return proxy.start(*extra)

    yield make
    for proxy in proxies:
        proxy.stop()
    # Row 24, for every test that ran a proxy: no configured key ever reaches its log.
    for proxy in proxies:
        for key in (PRIMARY_KEY, BACKUP_KEY, ACCESS_KEY):
            assert key not in proxy.logs(), f"{key} leaked into {proxy.log_path}"


class RedisServer:
    """A real redis-server on a free loopback port, with nothing saved to disk."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.unix_url = f"unix://{workdir / 'redis.sock'}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary is not None
        command = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
            self.unix_url.removeprefix("unix://"),
        ]
        command += ["--enable-debug-command", "local"]  # DEBUG SLEEP: a Redis that is slow, for real
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        wait_until(self.answers, 10, f"redis-server on port {self.port}")
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command in the inline protocol; the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(" ".join(args).encode() + b"\r\n")
            return s.recv(65536)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does this)")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def primary(fakes: Callable[[str], FakeAnthropic]) -> FakeAnthropic:
    return fakes("primary")


@pytest.fixture
def backup(fakes: Callable[[str], FakeAnthropic]) -> FakeAnthropic:
    return fakes("backup")


@pytest.fixture
def proxy(proxy_factory: Callable[..., Proxy], primary: FakeAnthropic, backup: FakeAnthropic) -> Proxy:
    return proxy_factory(endpoints_config(primary, backup))
