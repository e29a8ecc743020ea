"""Benchmark claude-code-fallback against mitmproxy's own floor and claude-code-router, in one run.

Run from the repository root:

    .venv/bin/python scripts/bench.py [--quick] [--duration S] [--json out.json] [--ccr DIR]
                                      [--runner lean|mitmdump] [--workers N]

The proxies run with the interpreter that runs this script (and its mitmproxy; the header
prints both), so running it with another venv's python measures that one. Every server is
its own process, so the load generator, the proxies and the fake upstreams
(`python -m addon.fakeapi`) never share a GIL. Eight paths are compared:

  (1) direct     the client talks to the fake upstream: the limit;
  ccr            claude-code-router (`@musistudio/claude-code-router`), a peer: `ccr start`
                 in the foreground, one node process, with its primary provider the fake,
                 its `fallback` provider a fake that answers 429, both through its
                 `Anthropic` transformer (requests and SSE passed on unchanged);
  (2) mitmdump   `mitmdump --mode reverse:...` with `scripts/bench_stream_addon.py`, an addon
                 that only sets `flow.response.stream = True`: what mitmdump itself costs;
  floor          the same addon in the lean master (`python -O -P scripts/bench_stream_addon.py
                 --set mode=reverse:...`): mitmproxy's proxy core without mitmdump's default
                 addons, the floor a proxy on mitmproxy's streaming path cannot go below;
  (3) healthy    the proxy as `ccf` runs it (the lean master, addon/lean.py; `--runner
                 mitmdump` uses `mitmdump -s addon/fallback.py` instead), its only
                 endpoint answering;
  (4) failover   the same with a primary that answers every request with 429
                 (`retry-after: 1`) and `cooldownSeconds: 3600`, so once the first request
                 has failed over, the primary is skipped and the backup serves everything;
  (5) workers    (3) with `server: {workers: N}` (`--workers N`, default 2): the lean master
                 started is a supervisor that binds the port and runs N worker processes on
                 it, which share endpoint state through it;
  (6) failover w (4) with the same workers (the primary's cooldown is shared, so once one
                 worker has failed over, every worker skips it).

(5) and (6) only run on the lean master: with `--runner mitmdump` they are left out
(mitmdump ignores server.workers). The CPU time and RSS of a proxy are those of its process
tree, the started process and its descendants summed (for (5) and (6) the supervisor and
its workers; for the others, one process).

The mitmproxy processes run with `connection_strategy=lazy` and `termlog_verbosity=warn`
(mitmdump also with `-q` and `flow_detail=0`). claude-code-router is installed as its
users do, `npm install @musistudio/claude-code-router@2.0.0` (pinned, so that runs compare
the same peer), into ~/.cache/claude-code-fallback/bench/ccr (reused when it holds that
version; `--ccr DIR` names an existing install of any version). Without node or npm, or
when the install fails, a line says why, its column is left out and its targets are not
judged; everything else runs. It does not pass the upstream's headers on, so a reply
through it is not checked for the fake's name; its fallback only answers 429, so a 200 is
its primary's. What is measured, and how:

* Throughput: POST /v1/messages at 16 connections, small non-streaming JSON and, as its own
  load, `"stream": true` (the fake answers with a short SSE stream), with wrk (`wrk -t2 -c16
  -d<S>s -s post.lua`) when it is installed, else an asyncio aiohttp client with 16
  keep-alive connections (then the client may be the limit for (1)); the tool used is
  printed. Besides req/s, wrk's p50 and p99 latency of a whole request under that load
  (over the rounds, weighted by requests). After a warm-up, the loads (every variant, JSON
  and SSE) take turns in rounds of about 5 s, so a change in background load hits all of
  them alike.
* Latency at 1 connection: sequential POSTs on one keep-alive aiohttp connection, the
  variants interleaved in blocks; p50/p99 of the whole request. "Added" is variant minus
  direct, so the client's own cost cancels out.
* Streaming: the fake sends 20 words as SSE events 20 ms apart; one stream at a time,
  variants in turn. Per stream: time to the first body byte (first SSE event), time to
  the first `content_block_delta` (first content event), and the gaps between consecutive
  events from that delta on (before it, the proxy holds the preamble by design, which
  bunches those events). Jitter is the p99 over all those gaps of |gap - 20 ms|; "added
  jitter" is a variant's p99 minus the direct p99, so the fake's and the client's own
  timer noise cancel out.
* Failover (the proxy only): the first request through a fresh (4), and one through a
  fresh (6) (the one that actually fails over, cold connections included), is timed on its
  own. For a distribution, another instance of (4) and one of (6) have a primary answering
  429 without retry-after and `cooldownSeconds: 0`, so every request tries the primary (as
  the half-open probe), gets the 429 and fails over; each proxy's failover counter must
  agree. Their requests are interleaved with
  direct ones to the primary and to the backup. Time from the primary's 429 to the
  backup's first byte = the proxy's time to first byte minus the primary's own direct time
  to its 429; the reference is the backup's own direct time to first byte.
* CPU per event: 8 streams at once, each 1,500 text deltas 2 ms apart (a long answer), through
  every variant but (1) in turn (the order alternating from round to round), a warm-up round
  and then three; the user + system CPU time (from /proc) of the proxy's process tree per
  1,000 events delivered, the median of the rounds. A descendant that ended counts once its
  parent has reaped it.
* Memory: 500 SSE streams opened at once through fresh instances of every variant but (1);
  the fake sends 40 events 0.25 s apart and then stalls, so the streams stay open until
  the client leaves. Once all 500 have delivered a first byte they are held a few seconds
  more while the VmRSS of the proxy's process tree (for ccr, the node process's), summed
  over its processes, is sampled from /proc; peak = the largest sampled sum, and for a
  single process max(that, its VmHWM) (a sum of VmHWMs would add peaks of different
  moments). A sum of RSS counts every shared page (libraries, the interpreter) once per
  process, so the peak of the tree's summed PSS (/proc/<pid>/smaps_rollup: a page shared
  by k processes counts 1/k in each) is printed too: what several processes cost the
  machine. How many streams were open at the same moment is printed, so a short count
  shows.
* Start: fresh instances of (3) and (5), three starts each: from the moment the port
  accepts a connection, the time to the first HTTP answer to GET /health (any status: a
  supervisor whose workers are still starting answers 503 `starting` at once) and to the
  first 200 (a worker serves); the medians. With workers, the RSS at rest of the largest
  process and of the supervisor are printed beside (3)'s, and the CPU per event as a
  ratio to the one-process column.
* Noise: the CPU time that processes outside the benchmark used during each phase (from
  /proc/stat minus the benchmark's own processes) is printed, with a note when it is high.

The table has a line per figure; under req/s, p99 at 16 connections, p50 latency, first
content event, CPU per event and peak RSS, lines "x floor" and "x ccr" give every
variant's ratio to the floor and to ccr from the same run. Targets (PASS/FAIL, h: (3),
f: (4), w: (5), fw: (6)):

* against ccr, for (3) to (6): req/s >= ccr's, JSON and SSE; p99 at 16 connections <= ccr's,
  JSON and SSE;
* against the floor, for (3) and (4): JSON req/s >= 0.90 x the floor's; p50 latency at 1
  connection <= the floor's + 1 ms; time to first content event <= the floor's + 1 ms (the
  preamble hold adds nothing measurable);
* (4) against (3) and (6) against (5): req/s >= 0.95 x, JSON and SSE;
* workers against one process, in the same run: CPU per event of (5) <= 1.2 x (3)'s and
  of (6) <= 1.2 x (4)'s; the largest worker at rest <= (3) at rest + 8 MB; the first
  answer after the port accepts <= 1 s, for (3) and (5);
* memory with 500 streams, each configuration on its own: one process, (3) and (4), peak
  RSS <= 115 MB; workers, (5) and (6), peak PSS <= ccr's in the same run (a sum of RSS
  counts the shared interpreter and libraries once per process; PSS counts what the
  processes cost the machine together);
* fixed, for (3) and (4) (the failover one for (4)): added jitter p99 <= 1 ms; 429 ->
  backup first byte (p50) <= the backup's own time to first byte + 5 ms.

`--quick` shortens everything (a few minutes) for smoke runs; `--json` writes every
figure; `--platforms` runs scripts/bench_platforms.py instead (Claude on Bedrock and
Vertex AI, and OpenAI-format endpoints, against the Anthropic path). The exit status is
0 when every figure was measured, 1 when a measurement broke.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import math
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from addon import lean as lean_master  # noqa: E402  (the repository's, as ccf starts it)

MITMDUMP = Path(sys.executable).parent / "mitmdump"
FALLBACK_ADDON = REPO / "addon" / "fallback.py"
RUNNER = "lean"  # how (3) to (6) run: "lean" (ccf's master) or "mitmdump" (-s addon/fallback.py)
WORKERS = 2  # server.workers of (5) and (6): --workers
STREAM_ADDON = REPO / "scripts" / "bench_stream_addon.py"
CCR_PACKAGE = "@musistudio/claude-code-router"
CCR_VERSION = "2.0.0"  # pinned: runs on different days measure the same peer
CCR_CACHE = Path.home() / ".cache" / "claude-code-fallback" / "bench" / "ccr"
CCR_MODEL = "claude-sonnet-4-6"

VARIANTS = ("direct", "ccr", "mitmdump", "floor", "healthy", "failover", "workers", "failover-w")
MITM_VARIANTS = VARIANTS[2:]  # started by `start_proxies`
WORKER_VARIANTS = ("workers", "failover-w")  # (3) and (4) with server.workers: only on the lean master
SINGLE = ("healthy", "failover")  # the proxy as it runs by default, one process
FAILOVERS = frozenset(("failover", "failover-w"))  # a primary that answers 429
PROXIES = (*SINGLE, *WORKER_VARIANTS)
COLUMNS = {
    "direct": "(1) direct",
    "ccr": "ccr",
    "mitmdump": "(2) mitmdump",
    "floor": "floor",
    "healthy": "(3) proxy",
    "failover": "(4) failover",
    "workers": "(5) workers",
    "failover-w": "(6) failover w",
}
LABELS = {"healthy": "h", "failover": "f", "workers": "w", "failover-w": "fw"}  # in a target's result
BODY = json.dumps(
    {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
)
STREAM_BODY = json.dumps(
    {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
)
HEADERS = {
    "content-type": "application/json",
    "anthropic-version": "2023-06-01",
    "x-api-key": "sk-ant-bench-000000000000",
}
STREAM_WORDS = 20
STREAM_DELAY = 0.02
RSS_STREAMS = 500
RSS_DELAY = 0.25
RSS_EVENTS = 40  # sent RSS_DELAY apart, then the stream stalls (stays open) until the client leaves
EVENTS_PER_STREAM = STREAM_WORDS + 6  # message_start, block start, ping, deltas, stop, delta, stop
FAIL_NAME, FAST_NAME, STREAM_NAME, SLOW_NAME = "failing", "fast", "stream", "slow"
LONG_NAME = "long"
LONG_WORDS = 1500  # a long answer: one text delta per word, LONG_DELAY apart
LONG_DELAY = 0.002
LONG_STREAMS = 8  # at once, as a few sessions and their subagents would
LONG_ARGS = ["--text", " ".join(f"w{i}" for i in range(LONG_WORDS)), "--event-delay", str(LONG_DELAY)]
FAIL_NOW_NAME = "failing-now"


class BenchError(RuntimeError):
    """A measurement could not be taken (a process died, a response was wrong)."""


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    latency_requests: int
    latency_block: int
    streams: int
    failover_samples: int
    rss_hold: float
    relay_rounds: int
    starts: int

    @classmethod
    def make(cls, quick: bool, duration: int | None) -> Settings:
        quick_run = cls(2, 1, 300, 100, 4, 60, 1.0, 1, 1)
        # six 5 s rounds per load: with two, a comparison of two columns within 5% could flip
        base = quick_run if quick else cls(30, 2, 2000, 200, 16, 400, 4.0, 3, 3)
        return base if duration is None else cls(**{**asdict(base), "duration": duration})


# -- statistics ---------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> float:
    return seconds * 1000.0


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(wanted: int = 16384) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


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
            try:
                service.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait()
            if service.proc.stdout:
                service.proc.stdout.close()
            if service in self.running:
                self.running.remove(service)
        for pid, (name, at) in started.items():
            if at is not None and start_time(pid) == at:  # the same process, still running
                tail = next(s.log_tail() for s in targets if s.name == name)
                print(f"bench: process {pid}, started by {name}, outlived it: killed; its log ends:\n{tail}")
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


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
    services: Services, specs: dict[str, list[str]], module: str = "addon.fakeapi"
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
    """One mitmproxy to start: the stream-only addon towards `target`, or the fallback addon."""

    name: str
    target: str
    endpoints: tuple[tuple[str, str], ...] = ()  # (name, baseUrl); empty: the stream-only addon
    cooldown: float = 3600.0
    lean: bool = False  # the stream-only addon in the lean master (the floor), not in mitmdump
    workers: int = 1  # server.workers: > 1, a supervisor and that many worker processes

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
    common = ["listen_host=127.0.0.1", "connection_strategy=lazy", "termlog_verbosity=warn"]
    lean = [f"mode=reverse:{spec.target}@{port}", *common]
    if config is None and spec.lean:  # the floor: the stream-only addon in the lean master
        return [sys.executable, *lean_master.PYTHON_FLAGS, str(STREAM_ADDON), *_sets(lean)]
    if config is not None and RUNNER == "lean":  # as `ccf start` runs it
        return lean_master.command([*lean, f"fallback_config={config}"])
    mode = f"reverse:{spec.target}@{port}"
    command = [str(MITMDUMP), "-q", "--mode", mode, *_sets([*common, "flow_detail=0"])]
    if config is None:
        return [*command, "-s", str(STREAM_ADDON)]
    return [*command, "-s", str(FALLBACK_ADDON), "--set", f"fallback_config={config}"]


def _sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on, from /proc (no extra dependency)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor's workers), from the parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree = [pid]
    for parent in tree:  # grows as it goes: breadth first
        tree.extend(children.get(parent, ()))
    return tree


def start_time(pid: int) -> str | None:
    """When process `pid` started (in clock ticks since boot), None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


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
    """Starts the mitmproxy processes in parallel, then polls each until it is ready."""
    pending = {spec.name: spec for spec in specs}
    started: dict[str, Service] = {}
    for _ in range(attempts):
        launched: dict[str, tuple[Service, int]] = {}
        for spec in pending.values():
            config = None
            if spec.is_fallback:
                config = services.workdir / f"{spec.name}.yaml"
                write_config(spec, config)
            port = free_port()
            service = services.spawn(spec.name, proxy_command(spec, port, config))
            service.url = f"http://127.0.0.1:{port}"
            launched[spec.name] = (service, port)
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


# -- claude-code-router -------------------------------------------------------------------


@dataclass(frozen=True)
class Ccr:
    """An installed claude-code-router: its CLI, run with node."""

    node: str
    cli: Path
    version: str
    node_version: str


@dataclass
class Tools:
    """What a run measures with besides the proxies: wrk (when installed) and claude-code-router."""

    wrk: str | None
    ccr: Ccr | None


def ccr_package(directory: Path) -> Path | None:
    """claude-code-router in `directory`: an npm project, a global prefix, or the package itself."""
    for package in (
        directory / "node_modules" / CCR_PACKAGE,
        directory / "lib" / "node_modules" / CCR_PACKAGE,
        directory,
    ):
        if (package / "dist" / "cli.js").is_file() and (package / "package.json").is_file():
            return package
    return None


def install_ccr(directory: Path) -> str:
    """`npm install` claude-code-router into `directory`, as its users do; why not, if it failed."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed"
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "package.json"
    if not manifest.exists():  # else npm installs into the nearest project above `directory`
        manifest.write_text('{"name": "ccf-bench-ccr", "private": true}\n')
    print(f"installing {CCR_PACKAGE} into {directory} ...", flush=True)
    command = [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", f"{CCR_PACKAGE}@{CCR_VERSION}"]
    try:
        result = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "npm install took more than 10 minutes"
    if result.returncode != 0:
        said = [x.removeprefix("npm error").strip() for x in (result.stderr + result.stdout).splitlines()]
        code = next((x.removeprefix("code ") for x in said if x.startswith("code ")), "")
        message = next((x for x in said if x and not x.startswith(("code ", "syscall ", "errno "))), "")
        why = ": ".join(x for x in (code, message) if x)
        return f"npm install failed ({why or f'exit status {result.returncode}'})"
    return ""


def package_version(package: Path) -> str:
    try:
        return str(json.loads((package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return ""


def find_ccr(directory: Path | None) -> tuple[Ccr | None, str]:
    """claude-code-router in `directory` (--ccr), else in the cache, installed there when absent.

    Returns it, or None and why not, to follow "claude-code-router ".
    """
    node = shutil.which("node")
    if node is None:
        return None, "cannot run: node is not installed"
    package = ccr_package(directory or CCR_CACHE)
    if package is None and directory is not None:
        return None, f"was not found: {directory} holds no {CCR_PACKAGE} with dist/cli.js"
    if directory is None and (package is None or package_version(package) != CCR_VERSION):
        why = install_ccr(CCR_CACHE)
        package = ccr_package(CCR_CACHE)
        if package is None:
            why = why or f"npm install left no {CCR_PACKAGE}/dist/cli.js in {CCR_CACHE}"
            return None, f"could not be installed: {why}"
    version = package_version(package)
    if not version:
        return None, f"cannot be used: {package / 'package.json'} gives no version"
    try:
        node_version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cannot be used: `node --version` failed ({e})"
    return Ccr(node, package / "dist" / "cli.js", version, node_version.stdout.strip()), ""


def ccr_config(port: int, primary: str, backup: str) -> dict[str, Any]:
    """Its config: Anthropic passed through to `primary`, with `backup` as its fallback."""

    def provider(name: str, url: str) -> dict[str, Any]:
        return {
            "name": name,
            "api_base_url": f"{url}/v1/messages",
            "api_key": "sk-ant-bench",
            "models": [CCR_MODEL],
            "transformer": {"use": ["Anthropic"]},
        }

    return {
        "PORT": port,
        "HOST": "127.0.0.1",
        "LOG": False,
        "Providers": [provider("primary", primary), provider("backup", backup)],
        "Router": {"default": f"primary,{CCR_MODEL}"},
        "fallback": {"default": [f"backup,{CCR_MODEL}"]},
    }


def start_ccr(
    services: Services, ccr: Ccr, name: str, primary: str, backup: str, attempts: int = 3
) -> Service:
    """`ccr start` in the foreground, one node process, with a HOME of its own for its config."""
    home = services.workdir / f"{name}-home"
    (home / ".claude-code-router").mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        port = free_port()
        config = json.dumps(ccr_config(port, primary, backup), indent=2)
        (home / ".claude-code-router" / "config.json").write_text(config)
        service = services.spawn(name, [ccr.node, str(ccr.cli), "start"], env={"HOME": str(home)})
        service.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while service.proc.poll() is None and time.monotonic() < deadline:
            if http_answers(f"{service.url}/health"):
                return service
            time.sleep(0.05)
        tail = service.log_tail()
        services.stop([service])
        if "eaddrinuse" not in tail.lower():
            raise BenchError(f"{name} did not start:\n{tail}")
    raise BenchError(f"could not start {name}")


def start_phase_ccr(
    results: Results, services: Services, tools: Tools, upstream: Service, failing: Service
) -> Service | None:
    """claude-code-router for a phase, its primary `upstream`, its fallback the failing fake.

    None when it is absent; when it will not start, it is left out from then on.
    """
    if tools.ccr is None:
        return None
    try:
        return start_ccr(services, tools.ccr, f"ccr-{upstream.name}", upstream.url, failing.url)
    except BenchError as e:
        print(f"claude-code-router could not be started, so it is left out: {e}", flush=True)
        results.notes.append(f"claude-code-router could not be started, so it is left out: {e}")
        tools.ccr = None
        return None


def busy_cpu_seconds() -> float:
    """CPU time all processes on the machine have used so far (from /proc/stat)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(services: Services) -> float:
    """CPU time of the bench, its reaped children (wrk, stopped proxies) and live services
    (each with its descendants: a supervisor's workers)."""
    mine = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = mine.ru_utime + mine.ru_stime + reaped.ru_utime + reaped.ru_stime
    for service in services.running:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += process_cpu_seconds(service.pid)
    return total


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` and its descendants have used so far (from /proc).

    A descendant that has ended counts once its parent has reaped it (a supervisor reaps its
    workers), through the parent's cutime and cstime.
    """
    ticks = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            if member == pid:
                raise
            continue  # a descendant that ended meanwhile
        ticks += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kb(pids: list[int], field_name: str, source: str = "status") -> int:
    """The sum of a /proc/<pid>/`source` figure (status: VmRSS, VmHWM; smaps_rollup: Pss) over `pids`."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    total += int(line.split()[1])
                    break
    return total


def pss_kb(pids: list[int]) -> int:
    """Their proportional set size: a page shared by k processes counts 1/k in each."""
    return memory_kb(pids, "Pss", "smaps_rollup")


# -- HTTP client helpers ------------------------------------------------------------------


def session(connections: int = 1, total_timeout: float = 60.0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=total_timeout),
        auto_decompress=False,
    )


@dataclass
class Reply:
    ttfb: float  # request sent -> status line and headers parsed
    total: float  # request sent -> body read
    status: int
    served_by: str


async def post(client: aiohttp.ClientSession, url: str, body: str = BODY) -> Reply:
    started = time.perf_counter()
    async with client.post(f"{url}/v1/messages", data=body, headers=HEADERS) as response:
        headers_at = time.perf_counter()
        await response.read()
        done = time.perf_counter()
        served_by = response.headers.get("x-fake-name", "")
        return Reply(headers_at - started, done - started, response.status, served_by)


def served(urls: dict[str, str], name: str) -> dict[str, str | None]:
    """Which fake each variant's replies must name in `x-fake-name`; None: not checked.

    claude-code-router does not pass the upstream's headers on; its fallback is a fake that
    answers only 429, so a 200 through it is the primary's.
    """
    return {v: None if v == "ccr" else name for v in urls}


def check(reply: Reply, status: int, served_by: str | None, what: str) -> None:
    if reply.status != status or served_by not in (None, reply.served_by):
        raise BenchError(
            f"{what}: expected {status} from {served_by!r}, got {reply.status} from {reply.served_by!r}"
        )


async def get_text(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url) as response:
        return await response.text()


# -- throughput ---------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["content-type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.headers["x-api-key"] = "sk-ant-bench-000000000000"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, ' ..
    '"status": %%d, "timeout": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Throughput:
    rps: float
    requests: int
    errors: int
    seconds: float
    p50_ms: float = math.nan  # latency of a whole request under this load
    p99_ms: float = math.nan


def run_wrk(wrk: str, url: str, seconds: int, script: Path) -> Throughput:
    command = [wrk, "-t2", "-c16", f"-d{seconds}s", "-s", str(script), f"{url}/v1/messages"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH ")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(f"wrk failed against {url}:\n{result.stdout}\n{result.stderr}")
    summary = json.loads(line.removeprefix("BENCH "))
    errors = sum(summary[k] for k in ("connect", "read", "write", "status", "timeout"))
    seconds = summary["duration_us"] / 1e6
    p50, p99 = summary["p50_us"] / 1000, summary["p99_us"] / 1000
    return Throughput(summary["requests"] / seconds, summary["requests"], errors, seconds, p50, p99)


async def aiohttp_throughput(url: str, seconds: float, body: str = BODY, connections: int = 16) -> Throughput:
    """The fallback load generator: `connections` workers, each a keep-alive loop."""
    counts = [0, 0]
    totals: list[float] = []
    async with session(connections) as client:
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                try:
                    reply = await post(client, url, body)
                    counts[reply.status != 200] += 1
                    totals.append(reply.total)
                except (aiohttp.ClientError, TimeoutError):
                    counts[1] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    p50, p99 = ms(percentile(totals, 50)), ms(percentile(totals, 99))
    return Throughput(counts[0] / elapsed, counts[0] + counts[1], counts[1], elapsed, p50, p99)


def measure_throughput(
    urls: dict[str, str],
    settings: Settings,
    wrk: str | None,
    workdir: Path,
    bodies: dict[str, str] | None = None,
) -> dict[str, Throughput]:
    """Each load warmed up, then run in rounds of about 5 s, the loads taking turns, so that a
    change in background load during the run hits every one alike. A load is a key of `urls`;
    `bodies` gives its request body (default: BODY). The latency percentiles of the rounds
    are averaged, weighted by their requests."""
    scripts: dict[str, Path] = {}

    def load(key: str, seconds: int) -> Throughput:
        body = (bodies or {}).get(key, BODY)
        if not wrk:
            return asyncio.run(aiohttp_throughput(urls[key], seconds, body))
        if body not in scripts:
            scripts[body] = workdir / f"post{len(scripts)}.lua"
            scripts[body].write_text(WRK_SCRIPT % body)
        return run_wrk(wrk, urls[key], seconds, scripts[body])

    for key in urls:
        load(key, settings.warmup)
    rounds = max(1, round(settings.duration / 5))
    seconds = max(1, settings.duration // rounds)
    parts: dict[str, list[Throughput]] = {k: [] for k in urls}
    order = list(urls)
    for i in range(rounds):
        for key in order[i % len(order) :] + order[: i % len(order)]:
            parts[key].append(load(key, seconds))
    results = {}
    for key, runs in parts.items():
        requests = sum(t.requests for t in runs)
        errors = sum(t.errors for t in runs)
        elapsed = sum(t.seconds for t in runs)
        p50, p99 = _weighted(runs, "p50_ms"), _weighted(runs, "p99_ms")
        results[key] = t = Throughput((requests - errors) / elapsed, requests, errors, elapsed, p50, p99)
        print(
            f"  throughput {key:14s} {t.rps:9.0f} req/s, p50 {t.p50_ms:6.1f} ms, "
            f"p99 {t.p99_ms:6.1f} ms ({t.errors} errors)",
            flush=True,
        )
    return results


def _weighted(runs: list[Throughput], name: str) -> float:
    """The mean of a figure of several runs, weighted by their requests."""
    requests = sum(t.requests for t in runs)
    return sum(t.requests * getattr(t, name) for t in runs) / requests if requests else math.nan


# -- latency at one connection ------------------------------------------------------------


async def measure_latency(
    urls: dict[str, str], settings: Settings, served_by: dict[str, str | None]
) -> dict[str, list[float]]:
    """Sequential requests, one keep-alive connection per variant, variants interleaved."""
    samples: dict[str, list[float]] = {v: [] for v in urls}
    async with contextlib.AsyncExitStack() as stack:
        clients = {v: await stack.enter_async_context(session()) for v in urls}
        for variant, url in urls.items():
            for _ in range(50):
                check(await post(clients[variant], url), 200, served_by[variant], variant)
        for _ in range(0, settings.latency_requests, settings.latency_block):
            for variant, url in urls.items():
                for _ in range(settings.latency_block):
                    reply = await post(clients[variant], url)
                    check(reply, 200, served_by[variant], variant)
                    samples[variant].append(reply.total)
    return samples


# -- streaming ----------------------------------------------------------------------------


@dataclass
class StreamSample:
    first_byte: float
    first_content: float
    gaps: list[float]


def event_name(block: bytes) -> str:
    """The `event:` field of one SSE block ('' when it has none)."""
    return next((x[6:].strip() for x in block.split(b"\n") if x.startswith(b"event:")), b"").decode()


async def one_stream(client: aiohttp.ClientSession, url: str, served_by: str | None) -> StreamSample:
    """One SSE request; event arrival times are those of the chunks that completed them."""
    started = time.perf_counter()
    names: list[str] = []
    times: list[float] = []
    first_byte = 0.0
    buffer = b""
    async with client.post(f"{url}/v1/messages", data=STREAM_BODY, headers=HEADERS) as response:
        if response.status != 200 or served_by not in (None, response.headers.get("x-fake-name")):
            raise BenchError(f"stream via {url}: {response.status} from the wrong upstream")
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            first_byte = first_byte or now
            buffer += chunk
            *blocks, buffer = buffer.split(b"\n\n")
            for block in blocks:
                names.append(event_name(block))
                times.append(now)
    if len(names) != EVENTS_PER_STREAM or names[-1] != "message_stop":
        raise BenchError(f"stream via {url}: got events {names}")
    first = names.index("content_block_delta")
    gaps = [b - a for a, b in zip(times[first:], times[first + 1 :], strict=False)]
    return StreamSample(first_byte - started, times[first] - started, gaps)


async def measure_streams(
    urls: dict[str, str], settings: Settings, served_by: dict[str, str | None]
) -> dict[str, list[StreamSample]]:
    samples: dict[str, list[StreamSample]] = {v: [] for v in urls}
    async with contextlib.AsyncExitStack() as stack:
        clients = {v: await stack.enter_async_context(session()) for v in urls}
        for variant, url in urls.items():
            await one_stream(clients[variant], url, served_by[variant])  # warm-up
        for _ in range(settings.streams):
            for variant, url in urls.items():
                samples[variant].append(await one_stream(clients[variant], url, served_by[variant]))
    return samples


def stream_figures(samples: list[StreamSample]) -> dict[str, float]:
    gaps = [g for s in samples for g in s.gaps]
    return {
        "ttfe_ms": ms(percentile([s.first_byte for s in samples], 50)),
        "ttfc_ms": ms(percentile([s.first_content for s in samples], 50)),
        "jitter_p99_ms": ms(percentile([abs(g - STREAM_DELAY) for g in gaps], 99)),
        "gap_p99_ms": ms(percentile(gaps, 99)),
    }


# -- failover -----------------------------------------------------------------------------


async def first_failover(url: str) -> float:
    """Time to first byte of the first request through a fresh (4) or (6): it really fails over."""
    async with session() as client:
        reply = await post(client, url)
    check(reply, 200, FAST_NAME, "first failover")
    return reply.ttfb


@dataclass
class FailoverSamples:
    primary_429: list[float] = field(default_factory=list)  # direct to the failing primary
    backup: list[float] = field(default_factory=list)  # direct to the backup
    failover: dict[str, list[float]] = field(default_factory=dict)  # via each proxy, 429 then the backup


async def measure_failover(failing: str, backup: str, proxies: dict[str, str], n: int) -> FailoverSamples:
    """Times to first byte, the kinds interleaved; every request through `proxies` (by variant)
    fails over.

    A proxy's primary answers 429 without retry-after and `cooldownSeconds` is 0, so the
    primary is usable again at once and each request tries it (as the half-open probe),
    gets the 429 and fails over; the proxy's failover counter confirms it (with workers,
    /metrics sums theirs).
    """
    samples = FailoverSamples(failover={v: [] for v in proxies})
    warmup = 10
    async with contextlib.AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(session()) for _ in range(2)]
        clients = {v: await stack.enter_async_context(session()) for v in proxies}
        for i in range(warmup + n):
            r429 = await post(a, failing)
            check(r429, 429, FAIL_NOW_NAME, "primary direct")
            ok = await post(b, backup)
            check(ok, 200, FAST_NAME, "backup direct")
            moved = {}
            for variant, url in proxies.items():
                moved[variant] = await post(clients[variant], url)
            for variant, reply in moved.items():
                check(reply, 200, FAST_NAME, f"failover via {variant}")
            if i >= warmup:
                samples.primary_429.append(r429.ttfb)
                samples.backup.append(ok.ttfb)
                for variant, reply in moved.items():
                    samples.failover[variant].append(reply.ttfb)
        for variant, url in proxies.items():
            metrics = await get_text(clients[variant], f"{url}/metrics")
            counted = sum(
                float(m.group(1))
                for m in re.finditer(r"^ccf_failovers_total\{[^}]*\}\s+(\S+)$", metrics, re.MULTILINE)
            )
            if counted != warmup + n:
                raise BenchError(f"expected {warmup + n} failovers, {variant} counted {counted:g}")
    return samples


# -- memory with many open streams --------------------------------------------------------


@dataclass
class Memory:
    idle_mb: float
    idle_each_mb: list[float]  # per process at rest: for workers, the supervisor first
    peak_mb: float
    peak_pss_mb: float
    peak_open: int
    failed: int
    ramp_s: float


async def hold_streams(url: str, pid: int, n: int, served_by: str | None, hold: float) -> Memory:
    """Opens `n` SSE streams at once, holds them `hold` s once all are open, samples RSS.

    A stream counts as open from its first body byte (through the fallback addon, that is
    after its first content event). The fake keeps sending events and then stalls, so the
    streams stay open until this client closes them. RSS is that of `pid` and its
    descendants summed; the peak is the largest sum sampled, and for a single process also
    its VmHWM (which catches a peak between samples; summed over several processes, it
    would add peaks of different moments).
    """
    opened = asyncio.Event()
    count = [0, 0, 0]  # open now, most open at once, failed
    tree = process_tree(pid)
    peak_kb = [memory_kb(tree, "VmRSS"), pss_kb(tree)]
    idle_mb = peak_kb[0] / 1024
    idle_each = [memory_kb([p], "VmRSS") / 1024 for p in tree]

    async def stream(client: aiohttp.ClientSession) -> None:
        is_open = False
        try:
            async with client.post(f"{url}/v1/messages", data=STREAM_BODY, headers=HEADERS) as response:
                if response.status != 200 or served_by not in (None, response.headers.get("x-fake-name")):
                    raise BenchError(f"stream via {url}: {response.status}")
                async for _ in response.content.iter_any():
                    if not is_open:
                        is_open = True
                        count[0] += 1
                        count[1] = max(count[1], count[0])
                        if count[0] == n:
                            opened.set()
            count[2] += 1  # ended on its own: it should have stalled
        except (aiohttp.ClientError, TimeoutError, BenchError):
            count[2] += 1
        finally:
            if is_open:
                count[0] -= 1

    async def sample() -> None:
        nonlocal tree
        for i in itertools.count(1):
            peak_kb[0] = max(peak_kb[0], memory_kb(tree, "VmRSS"))
            peak_kb[1] = max(peak_kb[1], pss_kb(tree))
            await asyncio.sleep(0.05)
            if i % 10 == 0:  # a worker may have been started again; /proc takes ms to scan
                tree = process_tree(pid)

    async with session(connections=0, total_timeout=300) as client:
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(stream(client)) for _ in range(n)]
        sampler = asyncio.ensure_future(sample())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(opened.wait(), 60)
        ramp = time.perf_counter() - started
        await asyncio.sleep(hold)
        for task in (*tasks, sampler):
            task.cancel()
        await asyncio.gather(*tasks, sampler, return_exceptions=True)
    if len(tree) == 1:
        peak_kb[0] = max(peak_kb[0], memory_kb(tree, "VmHWM"))
    return Memory(idle_mb, idle_each, peak_kb[0] / 1024, peak_kb[1] / 1024, count[1], count[2], ramp)


# -- the run ------------------------------------------------------------------------------


@dataclass
class Results:
    settings: Settings
    tools: dict[str, str]
    figures: dict[str, dict[str, float | None]] = field(default_factory=dict)
    targets: dict[str, dict[str, bool]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    other_cpu: dict[str, float] = field(default_factory=dict)  # CPU-s used by other processes
    load_before: float = 0.0

    def put(self, figure: str, variant: str, value: float | None) -> None:
        self.figures.setdefault(figure, {v: None for v in VARIANTS})[variant] = value


def fake_specs(settings: Settings) -> dict[str, list[str]]:
    words = " ".join(f"word{i}" for i in range(STREAM_WORDS))
    slow_words = " ".join(f"word{i}" for i in range(RSS_EVENTS))
    return {
        FAST_NAME: [],
        FAIL_NAME: ["--kind", "status", "--status", "429", "--header", "retry-after: 1"],
        FAIL_NOW_NAME: ["--kind", "status", "--status", "429"],
        STREAM_NAME: ["--text", words, "--event-delay", str(STREAM_DELAY)],
        SLOW_NAME: [
            *("--kind", "stall", "--after-events", str(RSS_EVENTS), "--text", slow_words),
            *("--event-delay", str(RSS_DELAY)),
        ],
        LONG_NAME: LONG_ARGS,
    }


def mitm_variants() -> tuple[str, ...]:
    """The variants `start_proxies` runs: (5) and (6) only on the lean master (mitmdump
    ignores server.workers)."""
    return tuple(v for v in MITM_VARIANTS if RUNNER == "lean" or v not in WORKER_VARIANTS)


def proxy_specs(prefix: str, upstream: Service, failing: Service) -> list[ProxySpec]:
    """mitmdump, the floor, (3) and (4), and on the lean master (5) and (6), in front of one upstream."""
    healthy = (("primary", upstream.url),)
    failover = (("primary", failing.url), ("backup", upstream.url))
    specs = {
        "mitmdump": ProxySpec(f"mitmdump-{prefix}", upstream.url),
        "floor": ProxySpec(f"floor-{prefix}", upstream.url, lean=True),
        "healthy": ProxySpec(f"healthy-{prefix}", upstream.url, healthy),
        "failover": ProxySpec(f"failover-{prefix}", failing.url, failover),
        "workers": ProxySpec(f"workers-{prefix}", upstream.url, healthy, workers=WORKERS),
        "failover-w": ProxySpec(f"failover-w-{prefix}", failing.url, failover, workers=WORKERS),
    }
    return [specs[v] for v in mitm_variants()]


def variant_urls(
    direct: str, proxies: dict[str, Service], prefix: str, ccr: Service | None
) -> dict[str, str]:
    """Every variant's URL, in the table's order; no ccr when it is absent."""
    urls = {"direct": direct, **({"ccr": ccr.url} if ccr else {})}
    urls.update({v: proxies[f"{v}-{prefix}"].url for v in mitm_variants()})
    return urls


def proxy_services(proxies: dict[str, Service], prefix: str, ccr: Service | None) -> dict[str, Service]:
    """The processes measured in a phase, by variant: ccr when present, then mitmproxy's."""
    return {**({"ccr": ccr} if ccr else {}), **{v: proxies[f"{v}-{prefix}"] for v in mitm_variants()}}


@contextlib.contextmanager
def serving(
    results: Results,
    services: Services,
    tools: Tools,
    fakes: tuple[Service, Service],
    prefix: str,
    extra: tuple[ProxySpec, ...] = (),
) -> Iterator[tuple[dict[str, Service], Service | None]]:
    """A phase's proxies (and ccr, when present) in front of (upstream, failing), stopped after."""
    upstream, failing = fakes
    proxies = start_proxies(services, [*proxy_specs(prefix, upstream, failing), *extra])
    ccr = start_phase_ccr(results, services, tools, upstream, failing)
    try:
        yield proxies, ccr
    finally:
        services.stop([*proxies.values(), *([ccr] if ccr else [])])


def phase_requests(results: Results, services: Services, fakes: dict[str, Service], tools: Tools) -> None:
    failing_now, backup = fakes[FAIL_NOW_NAME].url, fakes[FAST_NAME].url
    endpoints = (("primary", failing_now), ("backup", backup))
    probes = {  # for the failover distribution of (4) and (6)
        "failover": ProxySpec("failover-probe", failing_now, endpoints, cooldown=0),
        "failover-w": ProxySpec("failover-w-probe", failing_now, endpoints, cooldown=0, workers=WORKERS),
    }
    probes = {v: spec for v, spec in probes.items() if v in mitm_variants()}
    upstreams = (fakes[FAST_NAME], fakes[FAIL_NAME])
    with serving(results, services, tools, upstreams, "fast", tuple(probes.values())) as (proxies, ccr):
        urls = variant_urls(fakes[FAST_NAME].url, proxies, "fast", ccr)
        print("failover ...", flush=True)
        # The first request through (4) and (6) must be the first one each ever forwards.
        for variant in probes:
            results.put("failover_first_ms", variant, ms(asyncio.run(first_failover(urls[variant]))))
        probe_urls = {v: proxies[spec.name].url for v, spec in probes.items()}
        failover_figures(results, failing_now, backup, probe_urls)
        print("latency at 1 connection ...", flush=True)
        latency_figures(results, urls)
        print(f"throughput at 16 connections, JSON and SSE ({results.tools['throughput']}) ...", flush=True)
        throughput_figures(results, urls, tools.wrk, services.workdir)


def throughput_figures(results: Results, urls: dict[str, str], wrk: str | None, workdir: Path) -> None:
    """Each variant with small JSON requests and with short SSE streams, all taking turns."""
    loads = {f"{v} {kind}": url for v, url in urls.items() for kind in ("json", "sse")}
    bodies = {key: STREAM_BODY for key in loads if key.endswith(" sse")}
    for key, t in measure_throughput(loads, results.settings, wrk, workdir, bodies).items():
        variant, kind = key.split()
        suffix = "_sse" if kind == "sse" else ""
        results.put(f"rps{suffix}", variant, t.rps)
        results.put(f"c16{suffix}_p50_ms", variant, t.p50_ms)
        results.put(f"c16{suffix}_p99_ms", variant, t.p99_ms)
        if t.errors:
            results.notes.append(f"throughput {key}: {t.errors} of {t.requests} failed")


def failover_figures(results: Results, failing: str, backup: str, proxies: dict[str, str]) -> None:
    n = results.settings.failover_samples
    samples = asyncio.run(measure_failover(failing, backup, proxies, n))
    for p in (50, 99):
        primary_429 = ms(percentile(samples.primary_429, p))
        backup_ttfb = ms(percentile(samples.backup, p))
        results.put(f"primary_429_p{p}_ms", "direct", primary_429)
        results.put(f"failover_ttfb_p{p}_ms", "direct", backup_ttfb)
        results.put(f"failover_gap_p{p}_ms", "direct", backup_ttfb)
        for variant, values in samples.failover.items():
            failover = ms(percentile(values, p))
            results.put(f"failover_ttfb_p{p}_ms", variant, failover)
            results.put(f"failover_gap_p{p}_ms", variant, failover - primary_429)


def latency_figures(results: Results, urls: dict[str, str]) -> None:
    latency = asyncio.run(measure_latency(urls, results.settings, served(urls, FAST_NAME)))
    for variant, values in latency.items():
        for p in (50, 99):
            results.put(f"lat_p{p}_ms", variant, ms(percentile(values, p)))
    for variant in urls:
        for p in (50, 99):
            row = results.figures[f"lat_p{p}_ms"]
            results.put(f"added_p{p}_ms", variant, _sub(row[variant], row["direct"]))


def phase_streams(results: Results, services: Services, fakes: dict[str, Service], tools: Tools) -> None:
    upstreams = (fakes[STREAM_NAME], fakes[FAIL_NAME])
    with serving(results, services, tools, upstreams, "stream") as (proxies, ccr):
        urls = variant_urls(fakes[STREAM_NAME].url, proxies, "stream", ccr)
        print("streaming ...", flush=True)
        for variant in [v for v in urls if v in FAILOVERS]:
            asyncio.run(_trip_primary(urls[variant], STREAM_NAME))
        samples = asyncio.run(measure_streams(urls, results.settings, served(urls, STREAM_NAME)))
        for variant, values in samples.items():
            for figure, value in stream_figures(values).items():
                results.put(figure, variant, value)
        for variant in urls:
            for figure in ("ttfc", "jitter_p99"):
                row = results.figures[f"{figure}_ms"]
                results.put(f"{figure}_added_ms", variant, _sub(row[variant], row["direct"]))


def phase_memory(results: Results, services: Services, fakes: dict[str, Service], tools: Tools) -> None:
    upstreams = (fakes[SLOW_NAME], fakes[FAIL_NAME])
    with serving(results, services, tools, upstreams, "slow") as (proxies, ccr):
        measured = proxy_services(proxies, "slow", ccr)
        for variant, proxy in measured.items():
            print(f"{RSS_STREAMS} open streams via {variant} ...", flush=True)
            served_by = None if variant == "ccr" else SLOW_NAME  # as `served` says
            if served_by:  # (ccr's primary is the slow fake: nothing to trip)
                asyncio.run(_trip_primary(proxy.url, SLOW_NAME))
            memory = asyncio.run(
                hold_streams(proxy.url, proxy.pid, RSS_STREAMS, served_by, results.settings.rss_hold)
            )
            results.put("rss_idle_mb", variant, memory.idle_mb)
            # a worker's own, beside one process's: what each worker loads or keeps beyond it
            results.put("rss_idle_process_mb", variant, max(memory.idle_each_mb))
            if len(memory.idle_each_mb) > 1:
                results.put("rss_idle_supervisor_mb", variant, memory.idle_each_mb[0])
            results.put("rss_peak_mb", variant, memory.peak_mb)
            results.put("pss_peak_mb", variant, memory.peak_pss_mb)
            results.put("open_streams", variant, memory.peak_open)
            results.put("open_ramp_s", variant, memory.ramp_s)
            if memory.failed or memory.peak_open < RSS_STREAMS:
                results.notes.append(
                    f"memory {variant}: {memory.peak_open} streams open at once, "
                    f"{memory.failed} failed (wanted {RSS_STREAMS})"
                )


def phase_relay(results: Results, services: Services, fakes: dict[str, Service], tools: Tools) -> None:
    """CPU a proxy spends per event it relays: what a laptop pays for every token of a session."""
    upstreams = (fakes[LONG_NAME], fakes[FAIL_NAME])
    with serving(results, services, tools, upstreams, "long") as (proxies, ccr):
        measured = proxy_services(proxies, "long", ccr)
        print(f"CPU per event, {LONG_STREAMS} streams of {LONG_WORDS} events at once ...", flush=True)
        for variant in [v for v in measured if v in FAILOVERS]:
            asyncio.run(_trip_primary(measured[variant].url, LONG_NAME))
        for variant, cost in cpu_per_event(measured, results.settings.relay_rounds).items():
            results.put("cpu_per_1k_events_ms", variant, cost)
        cpu = results.figures["cpu_per_1k_events_ms"]
        for variant, one in (("workers", "healthy"), ("failover-w", "failover")):
            if cpu.get(variant) is not None and cpu.get(one):
                results.put("cpu_vs_one_process", variant, cpu[variant] / cpu[one])  # type: ignore[operator]


def phase_start(results: Results, services: Services, fakes: dict[str, Service], tools: Tools) -> None:
    """How soon a fresh proxy answers once its port accepts a connection, and serves: what a
    client (or a load balancer's probe) meets right after `ccf start` or a restart."""
    upstream = fakes[FAST_NAME].url
    specs = {"healthy": ProxySpec("start-healthy", upstream, (("primary", upstream),))}
    if RUNNER == "lean":
        specs["workers"] = ProxySpec("start-workers", upstream, (("primary", upstream),), workers=WORKERS)
    print("first answers after a start ...", flush=True)
    for variant, spec in specs.items():
        answers, serves = [], []
        for i in range(results.settings.starts):
            answer, served_ms = first_answers(services, replace(spec, name=f"{spec.name}-{i}"))
            answers.append(answer)
            serves.append(served_ms)
        results.put("start_answer_ms", variant, percentile(answers, 50))
        results.put("start_served_ms", variant, percentile(serves, 50))


def first_answers(services: Services, spec: ProxySpec) -> tuple[float, float]:
    """(ms from the port accepting to the first HTTP answer to GET /health, of any status;
    ms to the first 200)."""
    config = services.workdir / f"{spec.name}.yaml"
    write_config(spec, config)
    port = free_port()
    service = services.spawn(spec.name, proxy_command(spec, port, config))
    try:
        deadline = time.monotonic() + 30
        while not _accepts(port):
            if service.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{spec.name} did not listen:\n{service.log_tail()}")
            time.sleep(0.005)
        accepted = time.perf_counter()
        first = None
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
                    status = response.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                status = 0
            if status and first is None:
                first = time.perf_counter()
            if status == 200:
                assert first is not None
                return ms(first - accepted), ms(time.perf_counter() - accepted)
            if time.monotonic() > deadline:
                raise BenchError(f"{spec.name} never served:\n{service.log_tail()}")
            time.sleep(0.005)
    finally:
        services.stop([service])


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def cpu_per_event(proxies: dict[str, Service], rounds: int) -> dict[str, float]:
    """Each proxy's CPU-ms per 1,000 events of `LONG_STREAMS` long streams, the median over
    `rounds` after a warm-up; each round visits the proxies in turn, alternating direction,
    so that a change in background load weighs on all of them alike."""
    costs: dict[str, list[float]] = {name: [] for name in proxies}
    for round_ in range(rounds + 1):
        for name in list(proxies)[:: 1 if round_ % 2 else -1]:
            proxy = proxies[name]
            before = process_cpu_seconds(proxy.pid)
            events = asyncio.run(relay_streams(proxy.url, LONG_STREAMS))
            if round_:  # the first round warms up
                costs[name].append((process_cpu_seconds(proxy.pid) - before) / events * 1e6)
    return {name: percentile(values, 50) for name, values in costs.items()}


async def relay_streams(url: str, n: int) -> int:
    """`n` long streams at once, read to their end; how many events they brought."""

    async def one(client: aiohttp.ClientSession) -> int:
        async with client.post(f"{url}/v1/messages", data=STREAM_BODY, headers=HEADERS) as response:
            if response.status != 200:
                raise BenchError(f"long stream via {url}: HTTP {response.status}")
            body = await response.read()
        if event_name(body.rstrip().rsplit(b"\n\n", 1)[-1]) != "message_stop":
            raise BenchError(f"long stream via {url} ended early")
        return body.count(b"\n\n")

    async with session(connections=0, total_timeout=120) as client:
        return sum(await asyncio.gather(*(one(client) for _ in range(n))))


async def _trip_primary(url: str, served_by: str) -> None:
    """GET /v1/models once: through (4) or (6) it fails over and puts the primary in cooldown
    (with workers, for all of them: they share endpoint state).

    (Not a POST /v1/messages: the stalling fake would answer that with an endless stream.)
    """
    async with session() as client, client.get(f"{url}/v1/models", headers=HEADERS) as response:
        await response.read()
        reply = Reply(0, 0, response.status, response.headers.get("x-fake-name", ""))
    check(reply, 200, served_by, f"warm-up via {url}")


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# -- targets and the table ----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Each of `columns` must have `figure` `op` scale x the `base` variant's figure + offset
    (`offset` alone when there is no base); not judged when the base was not measured."""

    figure: str
    text: str  # as the table prints it
    op: str  # ">=" or "<="
    base: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    columns: tuple[str, ...] = PROXIES

    @property
    def key(self) -> str:
        return f"{self.figure} {self.text}"


RSS_LIMIT_MB = 115.0
TARGETS = (
    Target("rps", ">=0.90 x floor", ">=", "floor", 0.9, columns=SINGLE),
    Target("rps", ">=ccr", ">=", "ccr"),
    Target("rps", ">=0.95 x (3)", ">=", "healthy", 0.95, columns=("failover",)),
    Target("rps", ">=0.95 x (5)", ">=", "workers", 0.95, columns=("failover-w",)),
    Target("rps_sse", ">=ccr", ">=", "ccr"),
    Target("rps_sse", ">=0.95 x (3)", ">=", "healthy", 0.95, columns=("failover",)),
    Target("rps_sse", ">=0.95 x (5)", ">=", "workers", 0.95, columns=("failover-w",)),
    Target("c16_p99_ms", "<=ccr", "<=", "ccr"),
    Target("c16_sse_p99_ms", "<=ccr", "<=", "ccr"),
    Target("lat_p50_ms", "<=floor+1 ms", "<=", "floor", offset=1.0, columns=SINGLE),
    Target("ttfc_ms", "<=floor+1 ms", "<=", "floor", offset=1.0, columns=SINGLE),
    Target("jitter_p99_added_ms", "<=1 ms", "<=", offset=1.0, columns=SINGLE),
    Target("failover_gap_p50_ms", "<=backup TTFB+5", "<=", "direct", offset=5.0, columns=("failover",)),
    Target("rss_peak_mb", f"<={RSS_LIMIT_MB:g} MB", "<=", offset=RSS_LIMIT_MB, columns=SINGLE),
    # several processes are judged by what they cost the machine together, against ccr's
    Target("pss_peak_mb", "<=ccr", "<=", "ccr", columns=WORKER_VARIANTS),
    Target("cpu_per_1k_events_ms", "<=1.2 x (3)", "<=", "healthy", 1.2, columns=("workers",)),
    Target("cpu_per_1k_events_ms", "<=1.2 x (4)", "<=", "failover", 1.2, columns=("failover-w",)),
    Target("rss_idle_process_mb", "<=(3)+8 MB", "<=", "healthy", offset=8.0, columns=WORKER_VARIANTS),
    Target("start_answer_ms", "<=1000 ms", "<=", offset=1000.0, columns=("healthy", "workers")),
)


def evaluate(results: Results) -> None:
    """PASS/FAIL per target for its columns (of (3) to (6)); the limits come from the same run."""
    for target in TARGETS:
        row = results.figures.get(target.figure, {})
        base = 0.0 if target.base is None else row.get(target.base)
        if base is None:
            continue
        limit = target.scale * base + target.offset
        verdicts = {v: _cmp(row.get(v), limit, target.op) for v in target.columns}
        results.targets[target.key] = {v: ok for v, ok in verdicts.items() if ok is not None}
    if not measured(results, "ccr"):
        results.notes.append("claude-code-router was not measured: the targets against ccr are not judged")


def measured(results: Results, variant: str) -> bool:
    return any(row.get(variant) is not None for row in results.figures.values())


def _cmp(value: float | None, limit: float, op: str) -> bool | None:
    if value is None or math.isnan(limit):
        return None
    return value >= limit if op == ">=" else value <= limit


@dataclass(frozen=True)
class Row:
    figure: str
    label: str
    digits: int
    ratios: bool  # followed by rows of its ratios to the floor and to ccr
    note: str = ""  # in the target column, for a figure without a target


ROWS = (
    Row("rps", "req/s JSON, 16 conn", 0, True),
    Row("rps_sse", "req/s SSE, 16 conn", 0, True),
    Row("c16_p50_ms", "JSON p50 ms, 16 conn", 1, False),
    Row("c16_p99_ms", "JSON p99 ms, 16 conn", 1, True),
    Row("c16_sse_p50_ms", "SSE p50 ms, 16 conn", 1, False),
    Row("c16_sse_p99_ms", "SSE p99 ms, 16 conn", 1, True),
    Row("lat_p50_ms", "latency p50 ms, 1 conn", 2, True),
    Row("lat_p99_ms", "latency p99 ms, 1 conn", 2, False),
    Row("added_p50_ms", "  added p50 ms vs (1)", 2, False),
    Row("added_p99_ms", "  added p99 ms vs (1)", 2, False),
    Row("ttfe_ms", "SSE first event ms (p50)", 1, False, "(held by design)"),
    Row("ttfc_ms", "SSE first content event ms", 2, True),
    Row("ttfc_added_ms", "  first content vs (1) ms", 2, False),
    Row("jitter_p99_ms", "SSE jitter p99 |gap-20ms| ms", 2, False),
    Row("jitter_p99_added_ms", "  added jitter p99 ms", 2, False),
    Row("primary_429_p50_ms", "primary's own 429 ms, p50", 2, False),
    Row("failover_ttfb_p50_ms", "TTFB p50 ms: backup|failover", 2, False),
    Row("failover_gap_p50_ms", "429->backup 1st byte ms p50", 2, False),
    Row("failover_gap_p99_ms", "429->backup 1st byte ms p99", 2, False),
    Row("failover_first_ms", "first failover TTFB ms, cold", 2, False),
    Row("cpu_per_1k_events_ms", "CPU ms per 1000 SSE events", 0, True),
    Row("cpu_vs_one_process", "  x (3) or (4), one process", 2, False),
    Row("rss_idle_mb", "RSS idle MB", 1, False),
    Row("rss_idle_process_mb", "  largest process at rest", 1, False),
    Row("rss_idle_supervisor_mb", "  the supervisor at rest", 1, False),
    Row("start_answer_ms", "start: port -> 1st answer ms", 0, False),
    Row("start_served_ms", "start: port -> served ms", 0, False),
    Row("rss_peak_mb", f"RSS peak MB, {RSS_STREAMS} streams", 1, True),
    Row("pss_peak_mb", f"PSS peak MB, {RSS_STREAMS} streams", 1, True),
    Row("open_streams", "  streams open at once", 0, False),
    Row("open_ramp_s", "  s until all were open", 1, False),
)
LABEL, CELL, TARGET = 28, 10, 16  # column widths


def _fmt(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or not base or math.isnan(value) or math.isnan(base):
        return "-"
    return f"{value / base:.2f}"


def _verdict(results: Results, target: Target) -> str:
    verdicts = results.targets.get(target.key)
    if verdicts is None:
        return "no ccr" if target.base == "ccr" else ""
    return " ".join(f"{LABELS[v]}:{'PASS' if ok else 'FAIL'}" for v, ok in verdicts.items())


def _line(label: str, cells: list[str], widths: list[int], target: str = "", result: str = "") -> str:
    text = f"{label:{LABEL}s}" + "".join(f"{c:>{w}s}" for c, w in zip(cells, widths, strict=True))
    return f"{text}  {target:{TARGET}s} {result}".rstrip()


def table(results: Results) -> str:
    """One line per figure, then its ratios to the floor and to ccr; targets to the right."""
    shown = [v for v in VARIANTS if v not in ("ccr", *WORKER_VARIANTS) or measured(results, v)]
    heads = [COLUMNS[v].split(" ", 1) if COLUMNS[v].startswith("(") else ["", COLUMNS[v]] for v in shown]
    widths = [max(CELL, len(name) + 2) for _, name in heads]
    head = _line("figure", [name for _, name in heads], widths, "target", "result")
    lines = [_line("", [number for number, _ in heads], widths), head, "-" * len(head)]
    for row in ROWS:
        values = results.figures.get(row.figure)
        if values is None:
            continue
        body = [(row.label, [_fmt(values[v], row.digits) for v in shown])]
        if row.ratios:
            bases = [b for b in ("floor", "ccr") if b in shown]
            body += [(f"  x {b}", [_ratio(values[v], values[b]) for v in shown]) for b in bases]
        targets = [t for t in TARGETS if t.figure == row.figure and set(t.columns) & set(shown)]
        judged = [(t.text, _verdict(results, t)) for t in targets]
        judged = judged or [(row.note, "")]
        body += [("", [""] * len(shown))] * (len(judged) - len(body))
        for i, (label, cells) in enumerate(body):
            lines.append(_line(label, cells, widths, *(judged[i] if i < len(judged) else ("", ""))))
    return "\n".join(lines)


def describe(results: Results) -> str:
    s, tools = results.settings, results.tools
    return (
        f"machine: {tools['cpus']} cores; proxies: {tools['proxies']}; ccr: {tools['ccr']}\n"
        f"throughput: {tools['throughput']}, small JSON and short SSE requests, {s.duration} s per "
        f"load after {s.warmup} s warm-up, loads taking turns; latency: aiohttp, "
        f"{s.latency_requests} sequential requests per variant on one keep-alive connection\n"
        f"streams: {s.streams} per variant, {STREAM_WORDS} words {ms(STREAM_DELAY):.0f} ms apart; "
        f"failover: {s.failover_samples} samples; memory: {RSS_STREAMS} streams held "
        f"{s.rss_hold:g} s once all are open, events {RSS_DELAY:g} s apart\n"
        "ccr: claude-code-router, primary healthy, fallback a 429 fake; (2) mitmdump + stream-only "
        "addon; floor: that addon in the lean master;\n(3) fallback addon healthy, (4) fallback "
        "addon with a 429 primary in cooldown; x floor, x ccr: ratio to that column;\n"
        f"{tools['workers']}\n"
        "a figure's targets are listed on its lines, result h: (3), f: (4), w: (5), fw: (6)\n"
        "failover rows: (1) is the backup's own time to first byte, (4) and (6) a proxy that tries "
        "its 429 primary on every request; 429->backup = (4) or (6) minus the primary's own 429 time\n"
        f"load average before the run: {results.load_before:.2f}; phases (wall s / CPU-s used "
        "by other processes): "
        + ", ".join(f"{k} {v:.0f}/{results.other_cpu.get(k, 0):.1f}" for k, v in results.timings.items())
    )


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ccf-bench-") as tmp:
        path = Path(tmp)
        (path / "home").mkdir()
        yield path


def versions(ccr: Ccr | None, why: str) -> dict[str, str]:
    """What the proxies run on: this interpreter and its mitmproxy; claude-code-router and node."""
    from mitmproxy.version import VERSION

    return {
        "python": platform.python_version(),
        "mitmproxy": VERSION,
        "proxies": f"Python {platform.python_version()} ({sys.executable}), mitmproxy {VERSION}",
        "ccr": f"claude-code-router {ccr.version} on node {ccr.node_version}" if ccr else f"absent ({why})",
    }


def run(settings: Settings, tools: Tools, found: dict[str, str]) -> Results:
    described = {
        "throughput": "wrk -t2 -c16" if tools.wrk else "asyncio+aiohttp client, 16 connections",
        "latency": "aiohttp, sequential on one keep-alive connection",
        "cpus": str(os.cpu_count()),
        "workers": (
            f"(5), (6): (3), (4) with server.workers: {WORKERS}; their CPU and RSS are the "
            "supervisor's and its workers' summed"
            if RUNNER == "lean"
            else "(5), (6) left out: mitmdump ignores server.workers"
        ),
        **found,
    }
    results = Results(settings, described, load_before=os.getloadavg()[0])
    with workspace() as workdir:
        services = Services(workdir)
        try:
            fakes = start_fakes(services, fake_specs(settings))
            for phase in (phase_requests, phase_streams, phase_relay, phase_memory, phase_start):
                name = phase.__name__.removeprefix("phase_")
                started, busy, own = time.monotonic(), busy_cpu_seconds(), own_cpu_seconds(services)
                phase(results, services, fakes, tools)
                wall = time.monotonic() - started
                other = busy_cpu_seconds() - busy - (own_cpu_seconds(services) - own)
                results.timings[name] = wall
                results.other_cpu[name] = max(0.0, other)
                if other > 0.05 * wall:
                    results.notes.append(
                        f"other processes used {other:.1f} CPU-s during the {wall:.0f} s {name} "
                        "phase: its figures are noisier than usual"
                    )
        finally:
            services.stop()
    evaluate(results)
    return results


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short smoke run (a few minutes)")
    parser.add_argument(
        "--duration", type=_positive, help="seconds of load per throughput variant (default 30, quick 2)"
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument(
        "--runner",
        choices=("lean", "mitmdump"),
        default="lean",
        help="run (3) and (4) as `ccf` does, on the lean master (default), "
        "or as `mitmdump -s addon/fallback.py` (then without (5) and (6))",
    )
    parser.add_argument(
        "--workers",
        type=_positive,
        default=2,
        metavar="N",
        help="server.workers of (5) and (6), (3) and (4) with worker processes (default 2)",
    )
    parser.add_argument(
        "--platforms",
        action="store_true",
        help="instead: Bedrock, Vertex AI and OpenAI-format backups against the Anthropic path "
        "(scripts/bench_platforms.py; --quick and --json apply)",
    )
    parser.add_argument(
        "--ccr",
        type=Path,
        metavar="DIR",
        help=f"an existing install of {CCR_PACKAGE} (default: npm-install it into {CCR_CACHE})",
    )
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    if args.platforms:
        import bench_platforms

        return bench_platforms.main(
            [*(["--quick"] if args.quick else []), *(["--json", str(args.json)] if args.json else [])]
        )
    if not MITMDUMP.exists():
        print(f"bench: {MITMDUMP} not found; run with the venv's python", file=sys.stderr)
        return 1
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in finally
    settings = Settings.make(args.quick, args.duration)
    global RUNNER, WORKERS
    RUNNER, WORKERS = args.runner, args.workers
    ccr, why = find_ccr(args.ccr)
    found = versions(ccr, why)
    runner = "the lean master (addon/lean.py), as ccf runs them" if RUNNER == "lean" else "mitmdump -s"
    print(f"proxies: {found['proxies']}; (3) and (4) run on {runner}")
    if RUNNER == "lean":
        print(f"(5) and (6): (3) and (4) with server.workers: {WORKERS}")
    else:
        print("(5) and (6) are left out: mitmdump ignores server.workers")
    if ccr:
        print(f"ccr: {found['ccr']}, {ccr.cli.parent.parent}")
    else:
        print(f"claude-code-router {why}: its column is left out, everything else runs")
    started = time.monotonic()
    try:
        results = run(settings, Tools(shutil.which("wrk"), ccr), found)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    print()
    print(describe(results))
    print()
    print(table(results))
    for note in results.notes:
        print(f"note: {note}")
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        document = _no_nan(asdict(results))
        args.json.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return 0


def _no_nan(value: Any) -> Any:
    """JSON has no NaN: a figure that could not be computed becomes null."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


if __name__ == "__main__":
    sys.exit(main())
