"""The `ccf` command, run as a subprocess against fake upstreams, each test in its own home."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from addon.cli import commands as cli_module
from addon.config import load_config
from addon.fakes.anthropic import Behavior, FakeAnthropic

from .conftest import ACCESS_KEY, BACKUP_KEY, PRIMARY_KEY, endpoints_config, free_port, wait_until
from .test_operations import WEB_AUTH, xsrf

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["start", "stop", "restart", "status", "logs", "open", "dev", "web"]
COMMANDS += ["init", "env", "check", "demo"]
DEAD_KEY = "sk-ant-test-DEADPORTSECRETKEY000000003"
ENV_KEY = "sk-ant-env-ENVIRONMENTSECRETKEY0000004"
ENV_COMMAND = [sys.executable, "-m", "addon.cli", "-p", "9124", "env"]
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


class Cli:
    """Runs `python -m addon.cli` with a clean environment and its own CLAUDE_FALLBACK_HOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.pid_file = home / "ccf.pid"
        self.config_path = home / "config.yaml"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CLAUDE_FALLBACK_", "ANTHROPIC_")) and k.lower() not in PROXY_VARIABLES
        }
        self.env["CLAUDE_FALLBACK_HOME"] = str(home)
        self.foreground_pid = 0  # of the last `foreground` command

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "addon.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def write_config(self, config: dict[str, Any]) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return self.config_path

    def pid(self) -> int:
        return int(self.pid_file.read_text().split()[0])


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # an exited child of a parent that has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def post_message(port: int, key: str = "") -> tuple[int, str | None]:
    body = json.dumps({"model": "claude-x", "max_tokens": 8, "messages": []}).encode()
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/messages", body, headers | ({"x-ccf-access-key": key} if key else {})
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return response.status, response.headers.get("x-fake-name")


@contextlib.contextmanager
def foreground(cli: Cli, url: str, *args: str) -> Iterator[Path]:
    """`ccf <args>` running in the foreground until /health answers on `url`; yields its log."""
    log_path = cli.home / "foreground.log"
    cli.home.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "addon.cli", *args],
            cwd=ROOT,
            env=cli.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    cli.foreground_pid = process.pid
    try:
        wait_until(
            lambda: process.poll() is None and cli_module.fetch_health(url) is not None,
            30,
            f"`ccf {' '.join(args)}` on {url} (log: {log_path.read_text()[-2000:]})",
        )
        yield log_path
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    runner = Cli(tmp_path / "home")
    yield runner
    # Whatever a test did, leave no proxy behind.
    if runner.pid_file.exists() and not process_gone(pid := runner.pid()):
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: process_gone(pid), 10, f"pid {pid} to exit")


@pytest.fixture
def port(cli: Cli, primary: FakeAnthropic, backup: FakeAnthropic) -> int:
    """A free port, written with the two fakes into the home's default config file."""
    number = free_port()
    cli.write_config(endpoints_config(primary, backup, server={"port": number}))
    return number


@pytest.fixture
def started(cli: Cli, port: int) -> Iterator[int]:
    result = cli("start")
    assert result.returncode == 0, result.stderr
    yield cli.pid()
    cli("stop")


def test_start_status_stop_round_trip(cli: Cli, port: int, primary: FakeAnthropic) -> None:
    result = cli("start")
    assert result.returncode == 0, result.stderr
    pid = cli.pid()
    assert f"started (pid {pid}) on http://127.0.0.1:{port}" in result.stdout
    assert f"export ANTHROPIC_BASE_URL=http://127.0.0.1:{port}" in result.stdout
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "30"),))
    assert post_message(port) == (200, "backup")

    status = cli("status")
    assert status.returncode == 0, status.stderr
    assert str(pid) in status.stdout and "2.0.0" in status.stdout
    rows = {line.split()[0]: line for line in status.stdout.splitlines() if line.strip()}
    assert "cooling (" in rows["primary"] and "s left)" in rows["primary"]
    assert "healthy" in rows["backup"]
    health = json.loads(cli("status", "--json").stdout)
    assert [e["name"] for e in health["endpoints"]] == ["primary", "backup"]
    assert cli("logs", "-n", "3").stdout.count("\n") == 3
    log = (cli.home / "ccf.log").read_text()
    assert '"event": "request"' in log
    assert "client connect" not in log  # the health checks above leave no trace

    stop = cli("stop")
    assert stop.returncode == 0, stop.stderr
    assert "stopped" in stop.stdout
    assert process_gone(pid)
    assert not cli.pid_file.exists()
    assert port_free(port)
    after = cli("status")
    assert (after.returncode, after.stdout.strip()) == (3, "not running")


def test_status_finds_a_proxy_in_the_foreground(
    cli: Cli, port: int, primary: FakeAnthropic, backup: FakeAnthropic
) -> None:
    # under an access key: `ccf status` presents the config's key, or it would see only a status
    cli.write_config(endpoints_config(primary, backup, server={"port": port, "accessKey": ACCESS_KEY}))
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "30"),))
    url = f"http://127.0.0.1:{port}"
    with foreground(cli, url, "dev"):
        assert post_message(port, ACCESS_KEY) == (200, "backup")
        status = cli("status")
        assert status.returncode == 0, status.stderr
        assert f"address   {url}" in status.stdout
        assert "pid       - (in the foreground" in status.stdout
        rows = {line.split()[0]: line for line in status.stdout.splitlines() if line.strip()}
        assert "cooling (" in rows["primary"] and "healthy" in rows["backup"]
        as_json = cli("status", "--json")
        assert as_json.returncode == 0, as_json.stderr
        health = json.loads(as_json.stdout)
        assert [e["name"] for e in health["endpoints"]] == ["primary", "backup"]
        assert health["endpoints"][0]["status"] == "cooling"
    assert not cli.pid_file.exists()
    wait_until(lambda: port_free(port), 10, f"port {port} to be free")
    after = cli("status")
    assert (after.returncode, after.stdout.strip()) == (3, "not running")


def test_second_start_is_refused(cli: Cli, started: int) -> None:
    result = cli("start")
    assert result.returncode == 1
    assert f"already running (pid {started}" in result.stderr
    assert cli.pid() == started


def test_start_replaces_a_stale_pid_file(cli: Cli, port: int) -> None:
    stale = dead_pid()
    cli.pid_file.write_text(f"{stale}\n")
    result = cli("start")
    try:
        assert result.returncode == 0, result.stderr
        assert f"stale pid file {cli.pid_file} (pid {stale}" in result.stdout
        assert cli.pid() != stale
    finally:
        cli("stop")


def test_stop_removes_a_stale_pid_file(cli: Cli) -> None:
    cli.home.mkdir()
    stale = dead_pid()
    cli.pid_file.write_text(f"{stale}\n")
    result = cli("stop")
    assert result.returncode == 0
    assert f"removed stale pid file for pid {stale}" in result.stdout
    assert not cli.pid_file.exists()


def test_start_refuses_a_port_in_use(cli: Cli, port: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = cli("start")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "--port" in result.stderr
    assert not cli.pid_file.exists()


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_help(cli: Cli, command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: ccf {' '.join(command)}".rstrip())
    assert "--host HOST, -h HOST" in result.stdout


def test_claude_code_fallback_command_has_the_original_options(cli: Cli) -> None:
    code = "import sys; from addon.cli import run_foreground; sys.exit(run_foreground(['--help']))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cli.env, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: claude-code-fallback")
    assert "--log-level LEVEL" in result.stdout


def test_no_subcommand_prints_help_and_exits_2(cli: Cli) -> None:
    result = cli()
    assert result.returncode == 2
    assert "usage: ccf" in result.stderr


def test_bad_config_exits_2_naming_file_and_key(cli: Cli, primary: FakeAnthropic) -> None:
    number = free_port()
    path = cli.write_config(endpoints_config(primary, server={"port": number}, retry={"maxRetries": 0}))
    for command in ("start", "dev", "check", "env"):
        result = cli(command)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith(f"ccf: {path}: retry.maxRetries: expected an integer")
    assert port_free(number)
    assert not cli.pid_file.exists()
    bad_port = cli("start", "--port", "99999")
    assert bad_port.returncode == 2
    assert "command line: server.port" in bad_port.stderr


def test_logs_without_a_log_file(cli: Cli) -> None:
    result = cli("logs")
    assert result.returncode == 1
    assert "no log file" in result.stderr


def test_init_writes_the_example_once(cli: Cli, tmp_path: Path) -> None:
    first = cli("init")
    assert first.returncode == 0, first.stderr
    assert str(cli.config_path) in first.stdout
    assert cli.config_path.read_bytes() == (ROOT / "config.example.yaml").read_bytes()
    assert stat.S_IMODE(cli.config_path.stat().st_mode) == 0o600

    cli.config_path.write_text("# edited\n")
    second = cli("init")
    assert second.returncode == 1
    assert "already exists" in second.stderr
    assert cli.config_path.read_text() == "# edited\n"
    assert cli("init", "--force").returncode == 0
    assert cli.config_path.read_bytes() == (ROOT / "config.example.yaml").read_bytes()

    elsewhere = tmp_path / "nested" / "dir" / "ccf.yaml"
    result = cli("init", "-c", str(elsewhere))
    assert result.returncode == 0 and elsewhere.is_file()
    assert f"ccf -c {elsewhere} check" in result.stdout


def test_env_prints_two_lines_for_eval(cli: Cli) -> None:
    result = cli("env", "-h", "0.0.0.0", "-p", "9123")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "export ANTHROPIC_BASE_URL=http://127.0.0.1:9123\n"
        "export CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK=1\n"
    )
    assert result.stderr.startswith("# CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK=1")
    shell = subprocess.run(
        ["bash", "-c", 'eval "$("$@")"; echo "$ANTHROPIC_BASE_URL"', "-", *ENV_COMMAND],
        cwd=ROOT,
        env=cli.env,
        capture_output=True,
        text=True,
    )
    assert shell.stdout == "http://127.0.0.1:9124\n"


def test_check_reports_each_endpoint(
    cli: Cli, fakes: Callable[[str], FakeAnthropic], primary: FakeAnthropic
) -> None:
    rejecting = fakes("rejecting")
    rejecting.behavior = Behavior(kind="status", status=401)
    config = endpoints_config(primary, rejecting)
    config["endpoints"][1]["authHeader"] = "bearer"
    config["endpoints"].append(
        {"name": "dead", "baseUrl": f"http://127.0.0.1:{free_port()}", "apiKey": DEAD_KEY}
    )
    config["endpoints"].append({"name": "keyless", "baseUrl": primary.url, "enabled": False})
    cli.write_config(config)

    result = cli("check")
    assert result.returncode == 1, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert lines["primary"].endswith(" ok")
    assert lines["rejecting"].endswith(" auth rejected (401)")
    assert " unreachable: " in lines["dead"]
    assert "disabled" in lines["keyless"]
    assert "sk-ant-…0001" in lines["primary"]
    for key in (PRIMARY_KEY, BACKUP_KEY, DEAD_KEY):
        assert key not in result.stdout + result.stderr
        assert key[12:30] not in result.stdout + result.stderr

    (seen,) = primary.requests
    assert (seen.method, seen.path) == ("GET", "/v1/models")
    assert seen.header("x-api-key") == PRIMARY_KEY
    assert seen.header("anthropic-version") == "2023-06-01"
    assert rejecting.requests[0].header("authorization") == f"Bearer {BACKUP_KEY}"


def test_check_sends_the_environment_key_only_to_anthropic(cli: Cli, primary: FakeAnthropic) -> None:
    config = endpoints_config(primary)
    del config["endpoints"][0]["apiKey"]
    cli.write_config(config)
    cli.env["ANTHROPIC_API_KEY"] = ENV_KEY
    result = cli("check")
    assert "client key passed through" in result.stdout.splitlines()[-1]
    assert ENV_KEY not in result.stdout + result.stderr
    (seen,) = primary.requests
    assert seen.header("x-api-key") is None and seen.header("authorization") is None


def test_check_passes_when_every_endpoint_answers(cli: Cli, primary: FakeAnthropic) -> None:
    cli.write_config(endpoints_config(primary))
    result = cli("check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_names_the_extra_when_a_platform_library_lacks_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # google-auth installed without its urllib3 extra: its transport cannot import `packaging`.
    # In-process, so that the module can be taken away; scripts/check_installs does it for real.
    monkeypatch.setitem(sys.modules, "packaging", None)
    for name in ("google.auth.transport.urllib3", "addon.providers.vertex"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("endpoints: [{name: v, provider: vertex, region: us-east5, project: p}]\n")
    assert cli_module.main(["check", "-c", str(path)]) == 2
    assert capsys.readouterr().err == (
        "ccf: endpoint v: vertex needs the vertex extra (no module 'packaging'); "
        "install it: pip install 'claude-code-fallback[vertex]'\n"
    )


def test_demo_fails_over_to_the_backup(cli: Cli) -> None:
    result = cli("demo", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "answered by: backup" in result.stdout
    assert "requests seen: primary 1, backup 1" in result.stdout
    assert 'ccf_failovers_total{from_endpoint="primary",to_endpoint="backup"} 1.0' in result.stdout


def test_proxy_command_line(tmp_path: Path) -> None:
    config = load_config(None, {"CLAUDE_FALLBACK_HOME": str(tmp_path)}, {"server.port": "9000"})
    command = cli_module.proxy_command(config, tmp_path / "c.yaml", log_level="debug")
    assert command == [
        sys.executable,
        "-O",
        "-P",
        str(ROOT / "addon" / "lean" / "master.py"),
        "--set",
        "mode=reverse:https://api.anthropic.com@9000",
        "--set",
        "listen_host=127.0.0.1",
        "--set",
        "connection_strategy=lazy",
        "--set",
        "termlog_verbosity=info",
        "--set",
        f"fallback_config={tmp_path / 'c.yaml'}",
        "--set",
        "fallback_log_level=debug",
    ]
    web = cli_module.proxy_command(config, None, web=True, web_port=9001)
    assert web[3] == "from mitmproxy.tools.main import mitmweb; mitmweb()"
    assert web[4:6] == ["-s", str(ROOT / "addon" / "fallback.py")]
    assert not any(arg.startswith(("fallback_config", "fallback_log_level")) for arg in web)
    assert web[-5:] == ["web_open_browser=false", "--web-port", "9001", "--web-host", "127.0.0.1"]


def test_web_shows_the_answering_endpoint_and_the_first_endpoint_as_target(
    cli: Cli, primary: FakeAnthropic, backup: FakeAnthropic
) -> None:
    port, web_port = free_port(), free_port()
    config = endpoints_config(primary, backup, server={"port": port})
    # The first endpoint's host differs from the backup's, so a Host header left over from
    # the first (mitmproxy's reverse target) would show in the URL.
    config["endpoints"][0]["baseUrl"] = f"http://localhost:{primary.port}"
    cli.write_config(config)
    primary.behavior = Behavior(kind="status", status=529)
    with foreground(cli, f"http://127.0.0.1:{port}", "web", "--web-port", str(web_port)) as log:
        assert post_message(port) == (200, "backup")
        auth = WEB_AUTH and {"Authorization": f"Bearer {web_token(log)}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers=auth, timeout=5) as web:

            def answered() -> dict[str, Any] | None:
                flows = web.get("/flows").json()
                return next((f for f in flows if f["request"]["path"] == "/v1/messages"), None)

            request = wait_until(answered, 10, "the flow in mitmweb")["request"]
            # what mitmweb's flow list shows: scheme://pretty_host[:port]path
            shown = f"{request['scheme']}://{request['pretty_host']}:{request['port']}{request['path']}"
            assert shown == f"{backup.url}/v1/messages"
            assert dict(request["headers"])["Host"] == f"127.0.0.1:{backup.port}"
            mode = web.get("/options").json()["mode"]["value"]
            assert mode == [f"reverse:http://localhost:{primary.port}@{port}"]
    assert len(primary.requests) == 1


def test_web_keeps_the_most_recent_flows_and_its_memory_flat(cli: Cli, primary: FakeAnthropic) -> None:
    port, web_port, cap = free_port(), free_port(), 40
    cli.write_config(endpoints_config(primary, server={"port": port}))
    # Claude Code's requests carry the whole conversation: 200 KB each, as mitmweb keeps them
    body = json.dumps(
        {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "x" * 200_000}]}
    )
    url = f"http://127.0.0.1:{port}"
    args = ("web", "--web-port", str(web_port), "--max-flows", str(cap))
    with foreground(cli, url, *args) as log, httpx.Client(base_url=url, timeout=10) as client:
        auth = WEB_AUTH and {"Authorization": f"Bearer {web_token(log)}"}
        web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers=auth, timeout=10)
        sent = 0

        def send(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                sent += 1
                answer = client.post(f"/v1/messages?n={sent}", content=body, headers={"x-api-key": "k"})
                assert answer.status_code == 200

        def kept() -> list[int]:
            flows = web.get("/flows").json()
            return [
                int(f["request"]["path"].rsplit("=", 1)[1]) for f in flows if "?n=" in f["request"]["path"]
            ]

        send(2 * cap)  # past the cap, and warm
        wait_until(lambda: kept() == list(range(cap + 1, sent + 1)), 10, "the view to hold the newest")
        before = rss_bytes(cli.foreground_pid)
        send(4 * cap)  # 32 MB of bodies that an uncapped view would keep
        wait_until(lambda: kept() == list(range(sent - cap + 1, sent + 1)), 10, "the view to hold the newest")
        grown = rss_bytes(cli.foreground_pid) - before
        assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB past the cap"
        # 0 keeps every flow, as plain mitmweb does
        ran = web.post(
            "/commands/set", headers=xsrf(web), json={"arguments": ["fallback_web_max_flows", "0"]}
        )
        assert ran.status_code == 200, ran.text
        send(10)
        wait_until(lambda: len(kept()) == cap + 10, 10, "the view to keep every new flow")
        web.close()


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


def web_token(log: Path) -> str:
    """The token mitmweb 12 prints in its URL when it has no password."""
    found = wait_until(lambda: re.search(r"[?&]token=(\w+)", log.read_text()), 10, "mitmweb's token")
    return found[1]


def test_dev_without_config_forwards_to_anthropic(cli: Cli) -> None:
    port = free_port()
    cli.env["ANTHROPIC_API_KEY"] = ENV_KEY
    url = f"http://127.0.0.1:{port}"
    with foreground(cli, url, "dev", "--port", str(port)) as log:
        health = cli_module.fetch_health(url)
        assert health is not None
        (endpoint,) = health["endpoints"]
        assert (endpoint["name"], endpoint["baseUrl"]) == ("default", "https://api.anthropic.com")
        wait_until(lambda: '"event": "started"' in log.read_text(), 10, "the started event")
    text = log.read_text()
    assert f"reverse proxy to https://api.anthropic.com listening at 127.0.0.1:{port}" in text
    assert "env_key_withheld" not in text and ENV_KEY not in text


@pytest.mark.parametrize(
    ("endpoints", "target"),
    [
        (["https://user:secret@LLM.example:8443/api/anthropic/"], "https://llm.example:8443"),
        ([{"baseUrl": "https://off.example", "enabled": False}, "http://[::1]:9000"], "http://[::1]:9000"),
    ],
)
def test_reverse_target_is_the_first_enabled_endpoints_origin(
    tmp_path: Path, endpoints: list[Any], target: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"endpoints": endpoints, "server": {"port": 9000}}))
    command = cli_module.proxy_command(load_config(path, {}), path)
    assert command[command.index("--set") + 1] == f"mode=reverse:{target}@9000"


def test_start_reports_a_proxy_that_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A proxy that exits on its own cannot be arranged from outside, so this runs in-process.
    monkeypatch.setenv("CLAUDE_FALLBACK_HOME", str(tmp_path))
    for name in ("CLAUDE_FALLBACK_ENDPOINTS", "CLAUDE_FALLBACK_PORT", "CLAUDE_FALLBACK_HOST"):
        monkeypatch.delenv(name, raising=False)
    script = "import sys\nfor i in range(30): print('line', i)\nsys.exit(3)"
    monkeypatch.setattr(cli_module, "proxy_command", lambda *a, **k: [sys.executable, "-c", script])
    assert cli_module.main(["start", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "line 9\n" not in err and "line 10\n" in err and "line 29\n" in err
    assert "ccf: the proxy exited with status 3" in err
    assert not (tmp_path / "ccf.pid").exists()


def test_stop_lets_a_stream_in_flight_finish(
    cli: Cli, started: int, port: int, primary: FakeAnthropic
) -> None:
    words = " ".join(f"w{i}" for i in range(20))
    primary.behavior = Behavior(kind="ok", text=words, event_delay=0.1)  # about 2.5 s
    received: dict[str, str] = {}

    def stream() -> None:
        body = json.dumps({"model": "m", "max_tokens": 8, "stream": True, "messages": []}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/messages", body)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=20) as response:
            received["body"] = response.read().decode()

    reader = threading.Thread(target=stream)
    reader.start()
    primary.wait_for_requests(1)
    stop = cli("stop")
    reader.join(20)
    assert stop.returncode == 0, stop.stderr
    assert received["body"].rstrip().endswith('data: {"type":"message_stop"}')
    assert received["body"].count("content_block_delta") == 40  # 20 events: name and type
    assert process_gone(started)


def test_demo_accounts_spreads_sessions_over_two_subscriptions(cli: Cli) -> None:
    result = cli("demo", "--accounts", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    moved = next(line for line in lines if "runs out" in line)
    assert "-> account-a" in moved and "account-b 100%" in moved
    assert sum("session 1 goes on" in line and "-> account-a" in line for line in lines) == 1
