"""The processes a run measures: fake upstreams and proxies, each its own process (so the
load generator, the proxies and the fakes never share a GIL), started on free loopback
ports, polled until they serve, and stopped with whatever they started."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from addon import launch

from . import REPO, BenchError
from .procfs import listening_ports, process_tree, start_time

MITMDUMP = Path(sys.executable).parent / "mitmdump"
FALLBACK_ADDON = REPO / "addon" / "fallback.py"
STREAM_ADDON = Path(__file__).resolve().parent / "stream_addon.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_env(home: Path) -> dict[str, str]:
    """The environment without variables that would override the proxy's config file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_FALLBACK_", "ANTHROPIC_"))}
    env["CLAUDE_FALLBACK_HOME"] = str(home)
    return env


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the bench dies without cleaning up (Linux)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Service:
    """One started process: its name, its log file (stderr, and stdout unless captured) and
    the URL it serves on once known."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Services:
    """Owns every subprocess of the run; `stop()` ends them, whatever happened."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Service] = []

    def spawn(
        self, name: str, command: list[str], capture_stdout: bool = False, env: dict[str, str] | None = None
    ) -> Service:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                command,
                cwd=REPO,
                env={**proxy_env(self.workdir / "home"), **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else sink,
                stderr=sink,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops the rest
                preexec_fn=die_with_parent,
            )
        service = Service(name, proc, log)
        self.running.append(service)
        return service

    def stop(self, services: list[Service] | None = None) -> None:
        """Ends `services` (default: all), and what they started (a supervisor's workers)
        should it outlive them."""
        targets = list(self.running if services is None else services)
        started: dict[int, tuple[str, str | None]] = {}  # descendant: its service, its start time
        for service in targets:
            if service.proc.poll() is None:
                for pid in process_tree(service.pid)[1:]:
                    started[pid] = (service.name, start_time(pid))
                service.proc.terminate()
        for service in targets:
            self._reap(service)
        for pid, (name, at) in started.items():
            if at is not None and start_time(pid) == at:  # the same process, still running
                tail = next(s.log_tail() for s in targets if s.name == name)
                print(f"bench: process {pid}, started by {name}, outlived it: killed; its log ends:\n{tail}")
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def _reap(self, service: Service) -> None:
        """Waits for a terminated `service` (killing it after 5 s) and forgets it."""
        try:
            service.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            service.proc.kill()
            service.proc.wait()
        if service.proc.stdout:
            service.proc.stdout.close()
        if service in self.running:
            self.running.remove(service)


def wait_for_line(service: Service, prefix: bytes, timeout: float = 15.0) -> bytes:
    """The first stdout line of `service` that starts with `prefix`."""
    assert service.proc.stdout is not None
    deadline = time.monotonic() + timeout
    fd = service.proc.stdout.fileno()
    buffer = b""
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            break
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                break
            buffer += data
            for line in buffer.splitlines():
                if line.startswith(prefix):
                    return line
    raise BenchError(f"{service.name} did not start:\n{service.log_tail()}")


def start_fakes(
    services: Services, specs: dict[str, list[str]], module: str = "addon.fakes.anthropic"
) -> dict[str, Service]:
    """Starts one fake process per spec (in parallel) and waits until each listens."""
    fakes = {}
    for name, args in specs.items():
        command = [sys.executable, "-m", module, "--port", "0", "--name", name, *args]
        fakes[name] = services.spawn(f"fake-{name}", command, capture_stdout=True)
    for fake in fakes.values():
        line = wait_for_line(fake, b"listening on ")
        fake.url = line.decode().removeprefix("listening on ").strip()
    return fakes


@dataclass(frozen=True)
class ProxySpec:
    """One mitmproxy to start: the stream-only addon towards `target`, or the fallback addon
    with `endpoints`, run as `runner` says: "lean" (as `ccf` runs it) or "mitmdump"."""

    name: str
    target: str
    endpoints: tuple[tuple[str, str], ...] = ()  # (name, baseUrl); empty: the stream-only addon
    cooldown: float = 3600.0
    lean: bool = False  # the stream-only addon in the lean master (the floor), not in mitmdump
    workers: int = 1  # server.workers: > 1, a supervisor and that many worker processes
    runner: str = "lean"  # the fallback addon in the lean master, or under `mitmdump -s`

    @property
    def is_fallback(self) -> bool:
        return bool(self.endpoints)


def write_config(spec: ProxySpec, path: Path) -> None:
    lines = ["endpoints:"]
    for name, url in spec.endpoints:
        lines.append(f'  - {{name: {name}, baseUrl: "{url}", apiKey: ""}}')
    lines.append(f"retry: {{cooldownSeconds: {spec.cooldown:g}}}")
    if spec.workers > 1:
        lines.append(f"server: {{workers: {spec.workers}}}")
    lines.append("logging: {level: warn}")
    path.write_text("\n".join(lines) + "\n")


def proxy_command(spec: ProxySpec, port: int, config: Path | None) -> list[str]:
    """How to start `spec` on `port`; `config`, the fallback addon's config file, or None."""
    common = ["listen_host=127.0.0.1", "connection_strategy=lazy", "termlog_verbosity=warn"]
    lean = [f"mode=reverse:{spec.target}@{port}", *common]
    if config is None and spec.lean:  # the floor: the stream-only addon in the lean master
        return [sys.executable, *launch.PYTHON_FLAGS, str(STREAM_ADDON), *_sets(lean)]
    if config is not None and spec.runner == "lean":  # as `ccf start` runs it
        return launch.command([*lean, f"fallback_config={config}"])
    mode = f"reverse:{spec.target}@{port}"
    command = [str(MITMDUMP), "-q", "--mode", mode, *_sets([*common, "flow_detail=0"])]
    if config is None:
        return [*command, "-s", str(STREAM_ADDON)]
    return [*command, "-s", str(FALLBACK_ADDON), "--set", f"fallback_config={config}"]


def _sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def http_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            response.read()
        return True
    except urllib.error.HTTPError:
        return True  # an HTTP answer of any status: the listener is serving
    except OSError:
        return False


def proxy_ready(service: Service, port: int, spec: ProxySpec) -> bool:
    """Serving HTTP, and for the fallback addon, its `running` hook done (the bridge listens).

    mitmproxy opens its listener before addons' `running` hooks run; the addon starts its
    bridge and upstream client there, so a request in between would find no client.
    /health is answered locally by the fallback addon (forwarded to the fake by the floor),
    so polling it never touches the failing primary. With workers, the supervisor binds the
    port before it starts them and has no bridge; each worker has one, and until then the
    port accepts connections that no one serves, so /health alone would say too little.
    """
    if spec.workers > 1:
        workers = process_tree(service.pid)[1:]
        bridged = len(workers) >= spec.workers and all(listening_ports(w) - {port} for w in workers)
        return bridged and http_answers(f"{service.url}/health")
    if not http_answers(f"{service.url}/health"):
        return False
    return not spec.is_fallback or bool(listening_ports(service.pid) - {port})


def start_proxies(services: Services, specs: list[ProxySpec], attempts: int = 3) -> dict[str, Service]:
    """Starts the mitmproxy processes in parallel, then polls each until it is ready; one
    that lost a race for its port is started again on another."""
    pending = {spec.name: spec for spec in specs}
    started: dict[str, Service] = {}
    for _ in range(attempts):
        launched = {name: launch_proxy(services, spec) for name, spec in pending.items()}
        for name, (service, port) in launched.items():
            deadline = time.monotonic() + 30
            while service.proc.poll() is None and time.monotonic() < deadline:
                if proxy_ready(service, port, pending[name]):
                    started[name] = service
                    break
                time.sleep(0.02)
            else:
                if "address already in use" not in service.log_tail().lower():
                    raise BenchError(f"{name} did not start:\n{service.log_tail()}")
                services.stop([service])  # lost a race for the port: try another one
        pending = {n: s for n, s in pending.items() if n not in started}
        if not pending:
            return started
    raise BenchError(f"could not start {', '.join(pending)}")


def launch_proxy(services: Services, spec: ProxySpec) -> tuple[Service, int]:
    """Starts `spec` on a free port (with its config file, for the fallback addon)."""
    config = None
    if spec.is_fallback:
        config = services.workdir / f"{spec.name}.yaml"
        write_config(spec, config)
    port = free_port()
    service = services.spawn(spec.name, proxy_command(spec, port, config))
    service.url = f"http://127.0.0.1:{port}"
    return service, port


def start_configured(
    services: Services,
    name: str,
    config: str,
    env: dict[str, str] | None = None,
    ready: Callable[[str], bool] | None = None,
) -> Service:
    """The proxy as `ccf` runs it, with the config file `config`, polled until `ready` says
    so of its URL (default: it answers GET /health)."""
    path = services.workdir / f"{name}.yaml"
    path.write_text(config)
    port = free_port()
    command = proxy_command(ProxySpec(name, "http://127.0.0.1:9"), port, path)
    service = services.spawn(name, command, env=env)
    service.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not (ready(service.url) if ready else http_answers(f"{service.url}/health")):
        if service.proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{name} did not start:\n{service.log_tail()}")
        time.sleep(0.05)
    return service
