"""The `ccf` command: run the proxy in the foreground or the background, and look after it.

`dev` and `web` run mitmdump or mitmweb with the addon in the foreground; `start`, `stop`,
`status` and `logs` manage one background proxy per home directory ($CLAUDE_FALLBACK_HOME,
else ~/.claude-code-fallback), found through its pid file, and `open` shows its status page;
`init`, `env`, `check` and `demo` help set it up; `usage` says what clients spent. The
options of the original Node tool (`--config/-c`, `--port/-p`, `--host/-h`, `--log-level`)
are accepted before or after the subcommand, so `-h` means `--host` and only `--help`
prints help. Exit codes: 0 ok, 1 failure, 2 usage or config error, 3 not running
(`status`, `open`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

import yaml

from .. import __version__, launch
from ..config import Config, ConfigError, Server, default_config_path, load_config
from ..cost.store import read_store
from ..fleet import handover, workers
from ..ops.flowcap import DEFAULT_MAX_FLOWS
from ..state.access import ACCESS_HEADER, DEFAULT_CLIENT
from ..state.endpoints import reason_text
from ..state.limits import parse_time
from . import restart, usage

OK, FAILURE, USAGE, NOT_RUNNING = 0, 1, 2, 3
ADDON_SCRIPT = Path(__file__).parent.parent / "fallback.py"
EXAMPLE_CONFIG = Path(__file__).parent.parent / "config.example.yaml"
START_DEADLINE = 30.0
POLL_INTERVAL = 0.05
FOLLOW_INTERVAL = 0.2
ENV_COMMENT = """\
# CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK=1: when a stream fails, Claude Code retries the
# turn without streaming; behind a failover proxy that can run the same turn twice."""


class CommandFailed(Exception):
    """A command cannot go on; `main` prints ``ccf: <message>`` and exits with `code`."""

    def __init__(self, message: str, code: int = FAILURE) -> None:
        super().__init__(message)
        self.code = code


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The validated config plus what the command line said about it."""

    config: Config
    config_path: Path | None
    log_level: str | None

    @property
    def url(self) -> str:
        return base_url(self.config.server.host, self.config.server.port)


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Load the config with the command line's overrides; a bad config is a usage error."""
    overrides = {
        key: value
        for key, value in (
            ("server.port", option(args, "port")),
            ("server.host", option(args, "host")),
            ("logging.level", option(args, "log_level")),
        )
        if value is not None
    }
    try:
        config = load_config(option(args, "config"), os.environ if env is None else env, overrides)
    except ConfigError as e:
        raise CommandFailed(str(e), USAGE) from None
    path = Path(config.source).absolute() if config.source else None
    return Settings(config, path, option(args, "log_level"))


def option(args: argparse.Namespace, name: str) -> str | None:
    """A global option, wherever it was given; None when it was not."""
    return getattr(args, name, None)


def home_dir() -> Path:
    return default_config_path(os.environ).parent


def pid_file() -> Path:
    return home_dir() / "ccf.pid"


def log_file() -> Path:
    return home_dir() / "ccf.log"


def client_host(host: str) -> str:
    """Where to connect to reach a listener on `host` (a wildcard means this machine)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def base_url(host: str, port: int) -> str:
    host = client_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# -- the proxy command line ---------------------------------------------------------------


def proxy_command(
    config: Config,
    config_path: Path | str | None,
    web: bool = False,
    *,
    log_level: str | None = None,
    web_port: int = 8081,
    web_max_flows: int | None = None,
) -> list[str]:
    """The proxy as configured: the lean master (lean/master.py), or mitmweb with the addon for `web`.

    `log_level` is passed only if given on the command line.
    """
    verbosity = "debug" if config.logging.level in ("debug", "trace") else "info"
    settings = [
        f"mode=reverse:{reverse_target(config)}@{config.server.port}",
        f"listen_host={config.server.host}",
        "connection_strategy=lazy",
        f"termlog_verbosity={verbosity}",
    ]
    if config_path is not None:
        settings.append(f"fallback_config={config_path}")
    if log_level is not None:
        settings.append(f"fallback_log_level={log_level}")
    if not web:
        return launch.command(settings)
    if web_max_flows is not None:
        settings.append(f"fallback_web_max_flows={web_max_flows}")
    # -P: no current directory on sys.path, so a stray attr.py there cannot shadow a module
    return [
        sys.executable,
        "-P",
        "-c",
        "from mitmproxy.tools.main import mitmweb; mitmweb()",
        "-s",
        str(ADDON_SCRIPT),
        *_sets([*settings, "web_open_browser=false"]),
        "--web-port",
        str(web_port),
        "--web-host",
        "127.0.0.1",
    ]


def reverse_target(config: Config) -> str:
    """The first endpoint's origin, which mitmweb shows as the proxy's target.

    mitmproxy's reverse mode takes no path. The addon uses the target only when the config
    names no endpoint, and then the first endpoint is that default, api.anthropic.com.
    """
    parts = urlsplit(config.active_endpoints[0].base_url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _sets(settings: list[str]) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def exec_proxy(
    settings: Settings, web: bool = False, web_port: int = 8081, web_max_flows: int | None = None
) -> int:
    """Replace this process with the proxy, so signals and the exit status are its own."""
    command = proxy_command(
        settings.config,
        settings.config_path,
        web,
        log_level=settings.log_level,
        web_port=web_port,
        web_max_flows=web_max_flows,
    )
    serving = f"claude-code-fallback on {settings.url} (Ctrl-C stops it)"
    if web:
        print(serving, file=sys.stderr)
    else:  # the lean master says it once it serves
        os.environ[workers.ENV_ANNOUNCE] = serving
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return FAILURE  # not reached


# -- processes and ports ------------------------------------------------------------------


def read_pid(path: Path) -> tuple[int, str | None] | None:
    """The pid and address a pid file names; None when there is no usable pid file."""
    try:
        lines = path.read_text().split()
    except OSError:
        return None
    if not lines or not lines[0].isdigit():
        return None
    return int(lines[0]), (lines[1] if len(lines) > 1 else None)


def write_pid(path: Path, pid: int, url: str) -> None:
    path.write_text(f"{pid}\n{url}\n")


def is_running(pid: int) -> bool:
    """Whether `pid` is a live proxy (not a zombie, not a reused pid of another program)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        command = (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return True  # no /proc here: trust the signal check
    # the lean master of any install or checkout: `ccf restart` may have started another's
    master = str(Path(*launch.SCRIPT.parts[-2:])).encode()
    return state != "Z" and (master in command or b"mitmproxy" in command)


def wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def port_problem(host: str, port: int) -> str | None:
    """Why the proxy could not listen on host:port, found by binding it first; None if free."""
    try:
        info = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        return f"cannot resolve host {host!r}: {e.strerror}"
    family, kind, proto, _, address = info
    with socket.socket(family, kind, proto) as probe:
        # mitmproxy sets SO_REUSEADDR too: leftover TIME_WAIT connections do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            return e.strerror or str(e)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str, timeout: float = 2.0, key: str = "") -> tuple[int, bytes] | None:
    """GET `url` without any HTTP proxy from the environment, presenting the proxy's access
    `key` if any; None when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={ACCESS_HEADER: key} if key else {})
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, http.client.HTTPException):
        return None


def fetch_health(url: str, timeout: float = 2.0, fleet: bool = False, key: str = "") -> dict[str, Any] | None:
    """The proxy's /health document (served with 200 or 503); None when it does not answer.

    Without the proxy's access `key`, a proxy that needs one answers only its status.
    """
    answer = fetch(f"{url}/health" + ("?fleet=1" if fleet else ""), timeout, key)
    if answer is None or answer[0] not in (200, 503):
        return None
    try:
        document = json.loads(answer[1])
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def wait_until_up(process: subprocess.Popen[bytes], url: str, deadline: float) -> bool:
    """Poll /health until it answers; False once the process exits or the deadline passes."""
    end = time.monotonic() + deadline
    while process.poll() is None and time.monotonic() < end:
        if (health := fetch_health(url, timeout=1.0)) is not None and health.get("status") != "starting":
            return True
        time.sleep(POLL_INTERVAL)
    return False


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (the addon drains in-flight streams), then SIGKILL after `timeout`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(path: Path, count: int) -> list[bytes]:
    """The last `count` lines of a file, read backwards so a large log costs little."""
    if count <= 0:
        return []
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        data, position = b"", end
        while position > 0 and data.count(b"\n") <= count:
            step = min(64 * 1024, position)
            position -= step
            f.seek(position)
            data = f.read(step) + data
    return data.splitlines(keepends=True)[-count:]


def tail_since(path: Path, offset: int, count: int) -> str:
    """The last `count` lines written to `path` after `offset`, as text."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            lines = f.read().splitlines()[-count:]
    except OSError:
        return ""
    return "\n".join(line.decode(errors="replace") for line in lines)


# -- commands -----------------------------------------------------------------------------


def cmd_dev(args: argparse.Namespace) -> int:
    return exec_proxy(resolve(args))


def cmd_web(args: argparse.Namespace) -> int:
    return exec_proxy(resolve(args), web=True, web_port=args.web_port, web_max_flows=args.max_flows)


def cmd_start(args: argparse.Namespace) -> int:
    settings = resolve(args)
    pids, logs = pid_file(), log_file()
    if (found := read_pid(pids)) is not None:
        pid, url = found
        if is_running(pid):
            where = f" on {url}" if url else ""
            raise CommandFailed(f"already running (pid {pid}{where}); `ccf stop` stops it")
        pids.unlink(missing_ok=True)
        print(f"removed stale pid file {pids} (pid {pid} was not running)")
    server = settings.config.server
    if problem := port_problem(server.host, server.port):
        raise CommandFailed(
            f"cannot listen on {server.host}:{server.port}: {problem}. Another program is "
            "probably using that port; pick another one with --port or server.port."
        )
    process, offset = spawn(settings)
    write_pid(pids, process.pid, settings.url)
    try:
        up = wait_until_up(process, settings.url, START_DEADLINE)
    except KeyboardInterrupt:
        up = False
    if not up:
        status = process.poll()
        why = (
            f"did not answer on {settings.url}/health within {START_DEADLINE:g} s"
            if status is None
            else f"exited with status {status}"
        )
        terminate(process, 5)
        if (read_pid(pids) or (None, None))[0] == process.pid:  # not a concurrent start's
            pids.unlink(missing_ok=True)
        print(f"last lines of {logs}:\n{tail_since(logs, offset, 20)}", file=sys.stderr)
        raise CommandFailed(f"the proxy {why}; see {logs}")
    print(f"claude-code-fallback started (pid {process.pid}) on {settings.url}")
    print(f"logs: {logs}")
    print(f"point Claude Code at it:  export ANTHROPIC_BASE_URL={settings.url}")
    return OK


def spawn(settings: Settings, env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """The proxy, in the background, writing to the log file; and where in the log it began."""
    home_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    command = proxy_command(settings.config, settings.config_path, log_level=settings.log_level)
    with log_file().open("ab") as log:
        offset = log.tell()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and the terminal it ran in
            env={**os.environ, **(env or {})},
        )
    return process, offset


def cmd_restart(args: argparse.Namespace) -> int:
    try:
        settings = resolve(args)
    except CommandFailed as e:
        raise CommandFailed(f"{e}\nnothing restarted: a proxy that runs still serves", e.code) from None
    found = read_pid(pid_file())
    ports = [settings.config.server.port]
    if found is not None and found[1] and (recorded := urlsplit(found[1]).port):
        ports.append(recorded)  # the port may be what the config changes
    held = restart.holder(ports)
    if held is None and found is not None and is_running(found[0]):  # it may be starting still
        held = restart.holder(ports, wait=5.0)
    if held is None:
        if found is not None and is_running(found[0]):
            print(f"pid {found[0]} cannot hand its port over (it predates `ccf restart`): stopping it first")
            cmd_stop(argparse.Namespace(timeout=None, now=False, **vars(args)))
        else:
            print("not running: starting")
        return cmd_start(args)
    path, old = held
    process, offset = spawn(settings, {handover.ENV_TAKEOVER: str(path)})
    deadline = START_DEADLINE + 10 * settings.config.server.workers
    try:
        new = restart.wait_for_successor(process, settings.config.server.port, deadline)
    except KeyboardInterrupt:
        new = None
    if new is None:
        status = process.poll()
        why = f"exited with status {status}" if status is not None else f"did not serve within {deadline:g} s"
        terminate(process, 5)
        print(f"last lines of {log_file()}:\n{tail_since(log_file(), offset, 20)}", file=sys.stderr)
        raise CommandFailed(f"the new proxy {why}; pid {old['pid']} still serves. See {log_file()}")
    write_pid(pid_file(), process.pid, settings.url)
    print(
        f"claude-code-fallback restarted on {settings.url}: pid {old['pid']} ({old.get('version')}) "
        f"handed the port to pid {process.pid} ({new.get('version')})"
    )
    for was in restart.draining(int(old["address"][1]), besides=process.pid):
        if was.get("pid") == old["pid"] and any(was.get(k) for k in ("streams", "choosing", "connections")):
            print(f"pid {old['pid']} finishes {restart.carried(was)}, then exits (`ccf status` shows it)")
    return OK


def cmd_stop(args: argparse.Namespace) -> int:
    pids = pid_file()
    found = read_pid(pids)
    if found is None:
        print("not running")
        return OK
    pid = found[0]
    if not is_running(pid):
        pids.unlink(missing_ok=True)
        print(f"not running (removed stale pid file for pid {pid})")
        return OK
    if args.now:
        print(f"stopping pid {pid} now: answers in flight are cut")
        os.kill(pid, signal.SIGINT)
        for was in restart.draining(urlsplit(found[1] or "").port or 0, besides=pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(was["pid"]), signal.SIGINT)
        timeout = 10.0
    else:
        timeout = args.timeout if args.timeout is not None else drain_seconds(args) + 10
        print(
            f"stopping pid {pid}: answers in flight may take up to {timeout - 10:g} s to finish "
            "(`ccf stop --now` ends them)"
        )
        os.kill(pid, signal.SIGTERM)
    if wait_for_exit(pid, timeout):
        print("stopped")
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for_exit(pid, 5)
        print(f"still running after {timeout:g} s; killed")
    pids.unlink(missing_ok=True)
    return OK


def drain_seconds(args: argparse.Namespace) -> float:
    """`server.drainSeconds` of the config, or its default when the config cannot be read now."""
    try:
        return resolve(args).config.server.drain_seconds
    except CommandFailed:
        return Server().drain_seconds


def proxy_address(settings: Settings) -> tuple[int | None, str]:
    """The background proxy's pid while it runs, and where a proxy should answer: the address
    it recorded, else the configured one (one may serve in the foreground: `ccf dev`, `ccf web`)."""
    found = read_pid(pid_file())
    if found is not None and is_running(found[0]):
        return found[0], found[1] or settings.url
    return None, settings.url


def cmd_status(args: argparse.Namespace) -> int:
    settings = resolve(args)
    pid, url = proxy_address(settings)
    health = fetch_health(url, fleet=args.fleet, key=own_key(settings.config.server))
    if health is None and pid is None:
        print("not running")
        return NOT_RUNNING
    if health is None:
        raise CommandFailed(f"pid {pid} is running but {url}/health does not answer")
    if args.json:
        print(json.dumps(health, indent=2))
        return OK
    print(f"claude-code-fallback {health.get('version', '?')}: {health.get('status', '?')}")
    print(f"  pid       {pid or '- (in the foreground, not started by `ccf start`)'}")
    print(f"  address   {url}")
    print(f"  uptime    {format_duration(float(health.get('uptimeSeconds') or 0))}")
    print(f"  streams   {health.get('activeStreams', 0)} in flight")
    if drain := health.get("drain"):
        print(f"  draining  ({drain.get('reason')}) answers in flight end by {drain.get('endsAt')}")
    for was in restart.draining(settings.config.server.port, besides=pid):
        print(f"  draining  pid {was.get('pid')} ({was.get('version')}): {restart.carried(was)}")
    if (count := (health.get("workers") or {}).get("count", 1)) > 1:
        print(f"  workers   {count} processes on one port")
    print(f"  state     {health.get('state', 'memory')}")
    print()
    rows = [["ENDPOINT", "PROVIDER", "STATUS", "5H", "7D", "RESETS IN", "LAST ERROR"]]
    rows += [endpoint_row(e) for e in health.get("endpoints", [])]
    print(format_table(rows))
    if args.fleet:
        print()
        print(fleet_table(health.get("fleet")))
    return OK


def fleet_table(fleet: object) -> str:
    """The live instances of a fleet sharing state through Redis, one line each."""
    if not isinstance(fleet, list):
        return "fleet: none (state.backend is memory, or Redis does not answer)"
    names = sorted({name for instance in fleet for name in instance.get("endpoints", {})})
    rows = [["INSTANCE", "ADDRESS", "VERSION", "UPTIME", "STREAMS", *(n.upper() for n in names)]]
    for instance in fleet:
        endpoints = instance.get("endpoints", {})
        rows.append(
            [
                str(instance.get("id", "?")),
                str(instance.get("address", "?")),
                str(instance.get("version", "?")),
                format_duration(float(instance.get("uptimeSeconds") or 0)),
                str(instance.get("activeStreams", 0)),
                *(str((endpoints.get(n) or {}).get("status", "-")) for n in names),
            ]
        )
    return format_table(rows)


def endpoint_row(endpoint: Mapping[str, Any], now: float | None = None) -> list[str]:
    status = str(endpoint.get("status", "?"))
    if status == "cooling":
        status += f" ({float(endpoint.get('cooldownSecondsLeft') or 0):.0f}s left)"
    for flag in ("saturated", "overage"):
        if endpoint.get(flag):
            status += f", {flag}"
    error = reason_text(endpoint.get("lastError"), endpoint.get("lastStatus"))
    if error and endpoint.get("lastErrorAt"):
        error = f"{error} at {endpoint['lastErrorAt']}"
    windows = endpoint.get("limits") or {}
    return [
        str(endpoint.get("name", "?")),
        str(endpoint.get("provider", "anthropic")),
        status,
        window_use(windows.get("5h")),
        window_use(windows.get("7d")),
        resets_in(windows, time.time() if now is None else now),
        str(error or "-"),
    ]


def window_use(window: Mapping[str, Any] | None) -> str:
    utilization = (window or {}).get("utilization")
    return f"{utilization:.0%}" if isinstance(utilization, int | float) else "-"


def resets_in(windows: Mapping[str, Mapping[str, Any]], now: float) -> str:
    """Time until the binding window reopens: a refused one, else the fullest one."""
    binding = sorted(
        windows.values(),
        key=lambda w: (w.get("status") in ("rejected", "exhausted"), w.get("utilization") or 0),
        reverse=True,
    )
    for window in binding:
        if when := parse_time(window.get("resetsAt")):
            return format_duration(max(0.0, when - now))
    return "-"


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def cmd_open(args: argparse.Namespace) -> int:
    """Opens the status page; when the proxy needs a key, the browser gets one once, in the URL."""
    settings = resolve(args)
    _, url = proxy_address(settings)
    if fetch_health(url) is None:
        raise CommandFailed(f"no proxy answers at {url}; start it with `ccf start`", NOT_RUNNING)
    name, key = page_key(settings.config.server, args.as_name)
    print(
        f"status page: {url}/"
        + (f" (the browser gets the key of {name!r} once, for a cookie)" if key else "")
    )
    if not webbrowser.open(f"{url}/?{urlencode({'key': key})}" if key else f"{url}/"):
        raise CommandFailed("no browser found; open the address above" + (" with ?key=..." if key else ""))
    return OK


def page_key(server: Server, name: str | None) -> tuple[str, str]:
    """Which key the browser gets: the one named, else server.accessKey, else the first of
    server.accessKeys; ("", "") when the proxy needs none."""
    keys = {client.name: client.key for client in server.access_keys}
    if server.access_key:
        keys = {DEFAULT_CLIENT: server.access_key, **keys}
    if name is None:
        return next(iter(keys.items()), ("", ""))
    if name not in keys:
        known = ", ".join(keys) or "none"
        raise CommandFailed(f"no access key named {name!r} in the config (named there: {known})")
    return name, keys[name]


def own_key(server: Server) -> str:
    """The key `ccf` presents to a proxy that needs one: the one the browser would get."""
    return page_key(server, None)[1]


def cmd_usage(args: argparse.Namespace) -> int:
    """Reads the usage store itself, not the proxy: it answers while the proxy is down."""
    settings = resolve(args)
    since = args.since if args.since is not None else usage.since("24h")
    try:
        where, rows = read_store(settings.config, os.environ, since)
    except Exception as e:  # a Redis that is away, a file that is not SQLite
        raise CommandFailed(f"cannot read the usage store: {type(e).__name__}: {e}") from None
    if args.json:
        print(json.dumps(usage.document(rows, since, args.by)))
        return OK
    print(format_table(usage.table(rows, args.by)))
    print()
    print("\n".join(usage.footer(rows, since, where)))
    return OK


def cmd_logs(args: argparse.Namespace) -> int:
    path = log_file()
    if not path.is_file():
        raise CommandFailed(f"no log file at {path}; `ccf start` writes one")
    out = sys.stdout.buffer
    out.writelines(tail(path, args.lines))
    out.flush()
    if args.follow:
        follow(path, out)
    return OK


def follow(path: Path, out: IO[bytes]) -> None:
    """Copy what is appended to `path` until Ctrl-C or SIGTERM; start over if it is replaced."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(OK))
    with contextlib.suppress(KeyboardInterrupt):
        f = path.open("rb")
        f.seek(0, os.SEEK_END)
        try:
            while True:
                if chunk := f.read(64 * 1024):
                    out.write(chunk)
                    out.flush()
                    continue
                with contextlib.suppress(OSError):
                    current = path.stat()
                    if current.st_ino != os.fstat(f.fileno()).st_ino or current.st_size < f.tell():
                        f.close()
                        f = path.open("rb")
                time.sleep(FOLLOW_INTERVAL)
        finally:
            f.close()


def cmd_init(args: argparse.Namespace) -> int:
    given = option(args, "config")
    target = Path(given).expanduser() if given else default_config_path(os.environ)
    if target.exists() and not args.force:
        raise CommandFailed(f"{target} already exists; not overwriting it (--force replaces it)")
    try:
        text = EXAMPLE_CONFIG.read_bytes()
    except OSError as e:
        raise CommandFailed(f"cannot read the example config {EXAMPLE_CONFIG}: {e}") from None
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if args.force else os.O_EXCL)
    try:
        descriptor = os.open(target, flags, 0o600)
    except FileExistsError:
        raise CommandFailed(f"{target} already exists; not overwriting it") from None
    with os.fdopen(descriptor, "wb") as f:
        f.write(text)
    os.chmod(target, 0o600)  # also when --force replaced a file with wider permissions
    ccf = f"ccf -c {shlex.quote(str(target))}" if given else "ccf"
    print(f"wrote {target}")
    print("next steps:")
    print("  1. edit it: list your endpoints in failover order, keys as ${VARIABLES}")
    print(f"  2. {ccf} check          # try each endpoint once")
    print(f"  3. {ccf} start          # run the proxy in the background")
    print(f'  4. eval "$({ccf} env)"   # point Claude Code at it')
    return OK


def cmd_env(args: argparse.Namespace) -> int:
    settings = resolve(args)
    server = settings.config.server
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
    print(f"export ANTHROPIC_BASE_URL={shlex.quote(base_url(host, server.port))}")
    print("export CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK=1")
    print(ENV_COMMENT, file=sys.stderr)
    return OK


def cmd_check(args: argparse.Namespace) -> int:
    from ..ops import checks

    config = resolve(args).config
    print(f"config: {config.source or 'none (defaults and environment)'}")
    try:
        verdicts = asyncio.run(checks.check(config, call=args.call, model=args.model or checks.CALL_MODEL))
    except ConfigError as e:  # a platform's libraries, found missing as its endpoint is checked
        raise CommandFailed(str(e), USAGE) from None
    rows = []
    for endpoint in config.endpoints:
        verdict = verdicts.get(endpoint)
        credentials = verdict.credentials if verdict else "-"
        result = verdict.result if verdict else "disabled (not checked)"
        rows.append([endpoint.name, endpoint.provider, endpoint.base_url, credentials, result])
    print(format_table(rows))
    return OK if all(v.ok for v in verdicts.values()) else FAILURE


# -- demo ---------------------------------------------------------------------------------

DEMO_TEXT = "Hello! The primary was rate limited, so the backup is answering you instead."
DEMO_REQUEST = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 256,
    "stream": True,
    "messages": [{"role": "user", "content": "Say hello."}],
}
DEMO_METRICS = (
    "ccf_requests_total",
    "ccf_upstream_attempts_total",
    "ccf_failovers_total",
    "ccf_endpoint_up",
)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.accounts:
        return demo_accounts(args)
    from ..fakes.anthropic import Behavior, FakeAnthropic

    primary, backup = FakeAnthropic("primary"), FakeAnthropic("backup")
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "30"),))
    backup.behavior = Behavior(event_delay=0.15, text=DEMO_TEXT)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ccf-demo-")))
        for fake in (primary, backup):
            stack.enter_context(fake)
        # Neither the user's keys nor their CLAUDE_FALLBACK_* settings reach the fakes.
        env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV)}
        env["CLAUDE_FALLBACK_HOME"] = str(workdir / "home")
        settings = demo_settings(args, workdir, env, {"primary": primary.url, "backup": backup.url})
        url = settings.url
        print("ccf demo: two fake Anthropic endpoints on this machine, no API key needed")
        print(f"  primary  {primary.url}  answers 429 Too Many Requests, retry-after: 30")
        print(f"  backup   {backup.url}  answers normally, word by word")
        process = stack.enter_context(demo_proxy(settings, workdir / "proxy.log", env))
        print(f"  proxy    {url}  (pid {process.pid})\n")
        print("POST /v1/messages (stream: true) through the proxy:\n")
        answered_by, text = stream_message(settings.config)
        print(f"\n\nanswered by: {answered_by}")
        print(f"requests seen: primary {len(primary.requests)}, backup {len(backup.requests)}")
        print("\nfrom /metrics:")
        metrics = fetch(f"{url}/metrics")
        for line in (metrics[1].decode() if metrics else "").splitlines():
            if line.startswith(DEMO_METRICS):
                print(f"  {line}")
    return OK if answered_by == "backup" and text else FAILURE


# (what happens, the session, the account that should answer)
DEMO_SESSIONS = [
    ("session 1 starts", "1", "account-a"),
    ("session 2 starts", "2", "account-b"),
    ("session 3 starts", "3", "account-b"),
    ("session 1 goes on", "1", "account-a"),
    ("session 2 goes on", "2", "account-b"),
    ("account-b's 5-hour window runs out; session 2 goes on", "2", "account-a"),
    ("session 3 goes on", "3", "account-a"),
]


def demo_accounts(args: argparse.Namespace) -> int:
    """Two fake subscription accounts sharing three Claude Code sessions (least-utilized)."""
    from ..fakes.anthropic import Account, FakeAnthropic, Window

    fakes = {"account-a": FakeAnthropic("account-a"), "account-b": FakeAnthropic("account-b")}
    for fake, used in zip(fakes.values(), (0.62, 0.35), strict=True):
        fake.account = Account(Window("5h", utilization=used, per_request=0.04), overage=True)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ccf-demo-")))
        for fake in fakes.values():
            stack.enter_context(fake)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV)}
        env["CLAUDE_FALLBACK_HOME"] = str(workdir / "home")
        urls = {name: fake.url for name, fake in fakes.items()}
        settings = demo_settings(args, workdir, env, urls, routing={"strategy": "least-utilized"})
        print("ccf demo --accounts: two fake subscription accounts, routing.strategy: least-utilized")
        print("  account-a  5-hour window 62 % used;  account-b  35 % used; +4 % a request\n")
        stack.enter_context(demo_proxy(settings, workdir / "proxy.log", env))
        answers = []
        for step, session, _ in DEMO_SESSIONS:
            if step.startswith("account-b's"):
                fakes["account-b"].account.set("5h", utilization=1.0)  # type: ignore[union-attr]
            headers = {"x-claude-code-session-id": f"demo-session-{session}"}
            answered_by, _ = stream_message(settings.config, headers, echo=False)
            answers.append(answered_by)
            endpoints = (fetch_health(settings.url) or {}).get("endpoints", [])
            use = "  ".join(f"{e['name']} {window_use((e.get('limits') or {}).get('5h'))}" for e in endpoints)
            print(f"  {step:<56} -> {answered_by:<10} 5h: {use}")
        print("\nNew sessions go to the emptier account; a running session stays where its prompt")
        print("cache is; a session whose account runs out moves before a byte of its answer.")
    return OK if answers == [expected for _, _, expected in DEMO_SESSIONS] else FAILURE


_PRIVATE_ENV = ("CLAUDE_FALLBACK_", "ANTHROPIC_")


def demo_settings(
    args: argparse.Namespace,
    workdir: Path,
    env: Mapping[str, str],
    endpoints: Mapping[str, str],
    **sections: Any,
) -> Settings:
    port = option(args, "port") or str(free_port())
    config = {
        "endpoints": [
            {"name": name, "baseUrl": url, "apiKey": f"demo-key-for-the-{name}-fake"}
            for name, url in endpoints.items()
        ],
        "retry": {"initialDelay": 100, "maxDelay": 1000, "cooldownSeconds": 30},
        "logging": {"format": "pretty"},
        **sections,
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    demo_args = argparse.Namespace(**{**vars(args), "config": str(path), "port": port})
    settings = resolve(demo_args, env)
    server = settings.config.server
    if problem := port_problem(server.host, server.port):
        raise CommandFailed(f"cannot listen on {server.host}:{server.port}: {problem}")
    return settings


@contextlib.contextmanager
def demo_proxy(
    settings: Settings, log_path: Path, env: Mapping[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    command = proxy_command(settings.config, settings.config_path, log_level=settings.log_level)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        if not wait_until_up(process, settings.url, START_DEADLINE):
            print(f"proxy log:\n{tail_since(log_path, 0, 20)}", file=sys.stderr)
            raise CommandFailed(f"the demo proxy did not start on {settings.url}")
        yield process
    finally:
        terminate(process, 10)


def stream_message(
    config: Config, headers: Mapping[str, str] | None = None, echo: bool = True
) -> tuple[str, str]:
    """Send the demo request, print each text delta as it arrives; (x-fake-name, text)."""
    host, port = client_host(config.server.host), config.server.port
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request(
            "POST",
            "/v1/messages",
            json.dumps(DEMO_REQUEST),
            {"content-type": "application/json", "anthropic-version": "2023-06-01", **(headers or {})},
        )
        response = connection.getresponse()
        if response.status != 200:
            body = response.read().decode(errors="replace")
            raise CommandFailed(f"the proxy answered HTTP {response.status}: {body}")
        text = []
        for event in sse_events(response):
            delta = event.get("delta") or {}
            if event.get("type") == "content_block_delta" and delta.get("type") == "text_delta":
                text.append(delta["text"])
                if echo:
                    print(delta["text"], end="", flush=True)
        return response.getheader("x-fake-name", "?"), "".join(text)
    finally:
        connection.close()


def sse_events(stream: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON `data:` payloads of a server-sent event stream, one per event."""
    data: list[str] = []
    for raw in iter(stream.readline, b""):
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            payload = json.loads("\n".join(data))
            data = []
            if isinstance(payload, dict):
                yield payload


# -- argument parsing ---------------------------------------------------------------------


def global_options() -> argparse.ArgumentParser:
    """The original tool's options, valid before or after a subcommand.

    Defaults are suppressed so that a subcommand's parser never overwrites a value given
    before the subcommand; `option` reads them.
    """
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("options")
    unset = argparse.SUPPRESS
    group.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        default=unset,
        help="config file (default: $CLAUDE_FALLBACK_HOME/config.yaml if that variable is set, "
        "else ~/.claude-code-fallback/config.yaml; none at all means api.anthropic.com)",
    )
    group.add_argument("--port", "-p", metavar="N", default=unset, help="port (default: 8765)")
    group.add_argument("--host", "-h", metavar="HOST", default=unset, help="address (default: 127.0.0.1)")
    group.add_argument(
        "--log-level", metavar="LEVEL", default=unset, help="trace, debug, info, warn or error"
    )
    group.add_argument("--help", action="help", default=unset, help="show this help and exit")
    return parser


Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Command, str]] = {
    "start": (cmd_start, "start the proxy in the background"),
    "stop": (cmd_stop, "stop the background proxy, letting in-flight requests finish"),
    "restart": (cmd_restart, "start the installed code and hand it the port: nothing refused, nothing cut"),
    "status": (cmd_status, "show whether it runs and the state of each endpoint"),
    "logs": (cmd_logs, "print the background proxy's log"),
    "open": (cmd_open, "open the status page in a browser (the URL carries an access key once)"),
    "dev": (cmd_dev, "run the proxy in the foreground"),
    "web": (cmd_web, "run the proxy in the foreground with mitmweb's UI"),
    "init": (cmd_init, "write the example config file"),
    "env": (cmd_env, "print the shell lines that point Claude Code at the proxy"),
    "check": (cmd_check, "validate the config and try each endpoint once"),
    "demo": (cmd_demo, "watch a failover between two fake endpoints, no API key needed"),
    "usage": (cmd_usage, "show what each client spent, per endpoint and model (tokens and US dollars)"),
}


# The page of the documentation (docs/ in the repository) that explains each command
PAGES = {
    **dict.fromkeys(
        ("ccf", "start", "stop", "restart", "status", "logs", "open", "dev", "web"),
        "docs/operating.md#commands",
    ),
    **dict.fromkeys(("init", "env", "check"), "docs/getting-started.md#point-claude-code-at-the-proxy"),
    "demo": "docs/getting-started.md#no-api-key-at-hand-ccf-demo",
    "usage": "docs/cost.md#ccf-usage",
}


def docs_line(name: str) -> str:
    return f"documentation: {PAGES[name]} in the repository (`mkdocs serve` shows the docs as a site)"


def build_parser() -> argparse.ArgumentParser:
    common = global_options()
    parser = argparse.ArgumentParser(
        prog="ccf",
        description="claude-code-fallback: a local proxy for Claude Code that fails over\n"
        "between Anthropic-compatible endpoints.",
        epilog=f'quick start: ccf init; ccf check; ccf start; eval "$(ccf env)"\n{docs_line("ccf")}',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub = {
        name: commands.add_parser(
            name, help=summary, description=summary, epilog=docs_line(name), add_help=False, parents=[common]
        )
        for name, (_, summary) in COMMANDS.items()
    }
    for name, parser_of in sub.items():
        parser_of.set_defaults(func=COMMANDS[name][0])
    add_options(sub)
    return parser


def add_options(sub: Mapping[str, argparse.ArgumentParser]) -> None:
    """Each command's own options."""
    sub["stop"].add_argument(
        "--timeout", type=float, metavar="S", help="seconds before SIGKILL (server.drainSeconds + 10)"
    )
    sub["stop"].add_argument(
        "--now", action="store_true", help="end answers in flight at once instead of letting them finish"
    )
    sub["status"].add_argument("--json", action="store_true", help="print the /health JSON")
    sub["status"].add_argument(
        "--fleet", action="store_true", help="also list the instances sharing state through Redis"
    )
    sub["logs"].add_argument("-n", "--lines", type=int, default=50, metavar="N", help="lines to show (50)")
    sub["logs"].add_argument("-f", "--follow", action="store_true", help="keep printing")
    sub["web"].add_argument("--web-port", type=int, default=8081, metavar="N", help="mitmweb UI port (8081)")
    sub["web"].add_argument(
        "--max-flows",
        type=int,
        metavar="N",
        help=f"flows mitmweb keeps, the most recent ({DEFAULT_MAX_FLOWS}); 0 keeps every flow",
    )
    sub["open"].add_argument(
        "--as",
        dest="as_name",
        metavar="NAME",
        help="the server.accessKeys name whose key the browser gets (default: server.accessKey, "
        "else the first named key)",
    )
    sub["init"].add_argument("--force", action="store_true", help="replace an existing file")
    sub["check"].add_argument(
        "--call", action="store_true", help="send each endpoint a real 1-token request (billed)"
    )
    sub["check"].add_argument(
        "--model", metavar="M", help="the model --call asks for (claude-haiku-4-5-20251001)"
    )
    sub["demo"].add_argument(
        "--accounts", action="store_true", help="two subscription accounts sharing sessions instead"
    )
    sub["usage"].add_argument(
        "--since",
        type=usage.since,
        metavar="PERIOD",
        help="how far back, in whole hours: 24h (the default), 7d, 30d, 2w, …",
    )
    sub["usage"].add_argument(
        "--by", choices=usage.GROUPS, help="one row per client, endpoint or model (default: per all three)"
    )
    sub["usage"].add_argument(
        "--json", action="store_true", help='print {"since": <unix>, "rows": [...]} (docs/cost.md)'
    )


def run(command: Command, args: argparse.Namespace) -> int:
    try:
        return command(args)
    except CommandFailed as e:
        print(f"ccf: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # `ccf logs | head`: the reader left; stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """`ccf`: parse the command line and run the subcommand; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return USAGE
    return run(args.func, args)


def run_foreground(argv: Sequence[str] | None = None) -> int:
    """`claude-code-fallback [options]`: the original tool's command, same as `ccf dev`."""
    parser = argparse.ArgumentParser(
        prog="claude-code-fallback",
        description="Run the claude-code-fallback proxy in the foreground (same as `ccf dev`).",
        add_help=False,
        parents=[global_options()],
    )
    return run(cmd_dev, parser.parse_args(argv))
