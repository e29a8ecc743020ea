"""Restart the proxy under load, with `ccf restart` and the old way (`ccf stop`, then `ccf start`).

What it measures and what it found: docs/performance.md, "Restarts under load". A fake
upstream (in a thread of this process) streams a known text slowly to the requests that ask
for a long answer (60 s; `--quick`, 8 s) and answers every other request at once; the
proxy runs as `ccf start` runs it, each variant in its own home and on its own port. The
client opens 50 long streams (`--quick`, 20), each on its own connection, and sends new
requests at a steady 20 a second for the whole run: half of them short streams, half not
streamed, half on new connections and half on one kept-alive session. Once the long
streams are half way, the proxy restarts:

* (a) the old way: `ccf stop` (which lets the answers in flight finish), then `ccf start`;
* (b) `ccf restart`, one process;
* (c) `ccf restart` with `server.workers: 2`;
* (d) `ccf restart` after a config change that needs one (`server.workers` 1 to 2);
* (e) `ccf restart` run from a second checkout, a copy of `addon/` with another version.

Every answer is counted at the client: complete (a 200 with the whole text, a stream to its
`message_stop`), a cut stream (a 200 whose stream stopped short or whose text differs), a
refused connection (ECONNREFUSED), or an error (any other status, any other failure). Also
the restart command's wall time, the longest gap between two complete answers of the
steady load, and when the old process exited. The new process must hold the port, with the
workers and the version the variant asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from addon import __version__
from addon.fakes.anthropic import Behavior, FakeAnthropic
from addon.fakes.server import SeenRequest
from addon.fleet import handover

from . import REPO, BenchError
from .client import BODY, HEADERS, STREAM_BODY, event_name
from .procfs import process_tree, start_time
from .services import free_port

EVENT_DELAY = 0.5  # seconds between two events of a long stream
LONG_MARK = "a long answer, please"  # what a long stream's request says
LONG_BODY = json.dumps(
    {
        "model": "claude-sonnet-4-6",
        "max_tokens": 1024,
        "stream": True,
        "messages": [{"role": "user", "content": LONG_MARK}],
    }
)
SHORT_TEXT = "Hello from the fake, in a few words."
RATE = 20.0  # new requests a second, all through the run
NEWER = f"{__version__}.post1"  # the version the second checkout says it is
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


@dataclass(frozen=True)
class Settings:
    seconds: float  # a long stream, from its first event to its last
    streams: int  # long streams opened at the start
    tail: float  # seconds of steady load once the long streams and the restart are over

    @classmethod
    def make(cls, quick: bool) -> Settings:
        return cls(8.0, 20, 3.0) if quick else cls(60.0, 50, 5.0)

    @property
    def long_text(self) -> str:
        """A stream of `seconds`: its events are its words and 5 more, EVENT_DELAY apart."""
        words = round(self.seconds / EVENT_DELAY) - 5
        return "".join(f"w{i} " for i in range(words)).rstrip()


@dataclass(frozen=True)
class Variant:
    key: str
    name: str
    workers: int = 1
    workers_after: int | None = None  # the config's server.workers, changed just before the restart
    newer: bool = False  # restart from a second checkout that says it is NEWER
    restart: bool = True  # False: `ccf stop`, then `ccf start`

    @property
    def expected_workers(self) -> int:
        return self.workers_after or self.workers


VARIANTS = (
    Variant("stop-start", "(a) stop, then start", restart=False),
    Variant("restart", "(b) restart"),
    Variant("restart-w2", "(c) restart, 2 workers", workers=2),
    Variant("workers-1-2", "(d) restart, workers 1 -> 2", workers_after=2),
    Variant("newer", "(e) restart, new version", newer=True),
)


class Upstream(FakeAnthropic):
    """Streams `long` to a request that asks for a long answer; answers any other at once."""

    def __init__(self, long: Behavior) -> None:
        super().__init__("upstream")
        self.long = long
        self.short = Behavior(text=SHORT_TEXT)
        self.keep = 0  # count requests, remember none: memory stays flat

    def _record(self, seen: SeenRequest) -> Behavior:
        super()._record(seen)
        try:
            asks = json.loads(seen.body)["messages"][0]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            asks = None
        return self.long if asks == LONG_MARK else self.short


# -- the client -----------------------------------------------------------------------------


@dataclass
class Tally:
    """What the client saw of every answer."""

    sent: int = 0
    complete: int = 0
    cut: int = 0
    refused: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # non-200 answers, by status
    failures: int = 0  # no answer: a reset, a timeout, a body that ended short
    long_complete: int = 0
    samples: dict[str, list[str]] = field(default_factory=dict)  # what went wrong: the first few of each kind
    steady_done: list[float] = field(default_factory=list)  # when each steady answer completed
    origin: float = 0.0  # when the restart begins: the samples' times are from there

    @property
    def errors(self) -> int:
        return sum(self.statuses.values()) + self.failures

    def note(self, kind: str, what: str) -> None:
        seen = self.samples.setdefault(kind, [])
        if len(seen) < 3:
            seen.append(f"{time.monotonic() - self.origin:+.2f} s: {what}")


async def one(client: aiohttp.ClientSession, url: str, body: str, text: str, how: str, tally: Tally) -> None:
    """One request, read to its end and counted; `how` names it (long, short stream, json...)."""
    stream = "json" not in how
    tally.sent += 1
    try:
        async with client.post(f"{url}/v1/messages", data=body, headers=HEADERS) as response:
            try:
                data = await response.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                if response.status == 200 and stream:
                    tally.cut += 1
                    tally.note("cut", f"{how}: {type(e).__name__}: {e}")
                else:
                    tally.failures += 1
                    tally.note(type(e).__name__, f"{how}: status {response.status}, body ended: {e}")
                return
    except aiohttp.ClientConnectorError as e:
        if e.os_error.errno == errno.ECONNREFUSED:
            tally.refused += 1
            tally.note("refused", how)
        else:
            tally.failures += 1
            tally.note(type(e).__name__, f"{how}: {e}")
        return
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        tally.failures += 1
        tally.note(type(e).__name__, f"{how}: {e}")
        return
    if response.status != 200:
        key = str(response.status)
        tally.statuses[key] = tally.statuses.get(key, 0) + 1
        tally.note(str(response.status), f"{how}: {data[:120]!r}")
    elif whole_stream(data, text) if stream else whole_message(data, text):
        tally.complete += 1
        if how == "long":
            tally.long_complete += 1
        else:
            tally.steady_done.append(time.monotonic())
    elif stream:
        tally.cut += 1
        tally.note("cut", f"{how}: ends {data[-120:]!r}")
    else:
        tally.failures += 1
        tally.note("incomplete", f"{how}: {data[-120:]!r}")


def whole_stream(data: bytes, text: str) -> bool:
    """Ends with `message_stop`, and its text deltas make `text`."""
    blocks = [b for b in data.replace(b"\r\n", b"\n").split(b"\n\n") if b.strip()]
    if not blocks or event_name(blocks[-1]) != "message_stop":
        return False
    pieces = []
    for block in blocks:
        if event_name(block) == "content_block_delta":
            line = next(x for x in block.split(b"\n") if x.startswith(b"data:"))
            pieces.append(json.loads(line[5:])["delta"].get("text", ""))
    return "".join(pieces) == text


def whole_message(data: bytes, text: str) -> bool:
    try:
        return bool(json.loads(data)["content"][0]["text"] == text)
    except (ValueError, KeyError, IndexError, TypeError):
        return False


@dataclass
class Outcome:
    """One variant's run, at the client and around it."""

    variant: str
    tally: Tally
    restart_seconds: float
    longest_gap: float
    old_gone_after: float | None  # seconds from the restart's start to the old process's exit
    before: dict[str, Any]
    after: dict[str, Any]
    said: str  # what the restart command printed
    log: list[str] = field(default_factory=list)  # ccf.log's warnings and errors


async def under_load(url: str, settings: Settings, act: Callable[[], str], old_pids: list[int]) -> Outcome:
    """The long streams and the steady load; `act` (the restart) once the streams are half way."""
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=settings.seconds * 3 + 60, sock_read=120)
    fresh = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout, auto_decompress=False
    )
    kept = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=8), timeout=timeout, auto_decompress=False
    )
    async with fresh, kept:
        started = time.monotonic()
        tally.origin = started + settings.seconds / 2
        text = settings.long_text
        longs = [
            asyncio.ensure_future(one(fresh, url, LONG_BODY, text, "long", tally))
            for _ in range(settings.streams)
        ]
        until = [float("inf")]
        steady_load = asyncio.ensure_future(steady(url, fresh, kept, tally, until))
        await asyncio.sleep(max(0.0, tally.origin - time.monotonic()))
        began = time.monotonic()
        gone = asyncio.ensure_future(watch_exit(old_pids))
        try:
            said = await asyncio.to_thread(act)
        except BaseException:
            gone.cancel()
            raise
        finally:
            seconds = time.monotonic() - began
            await asyncio.gather(*longs)
            until[0] = time.monotonic() + settings.tail
            await steady_load
        ended = time.monotonic()
        try:
            exited: float | None = await asyncio.wait_for(gone, 30)
        except TimeoutError:
            exited = None
    gap = longest_gap(tally.steady_done, started, ended)
    return Outcome("", tally, seconds, gap, exited - began if exited else None, {}, {}, said)


async def steady(
    url: str,
    fresh: aiohttp.ClientSession,
    kept: aiohttp.ClientSession,
    tally: Tally,
    until: list[float],
) -> None:
    """RATE new requests a second until `until[0]`: in turn a short stream and a JSON answer,
    on a new connection and on the kept-alive session."""
    running: set[asyncio.Task[None]] = set()
    at = time.monotonic()
    i = 0
    while at < until[0]:
        stream, on_fresh = i % 2 == 0, (i // 2) % 2 == 0
        how = f"{'short stream' if stream else 'json'}, {'new connection' if on_fresh else 'kept-alive'}"
        body = STREAM_BODY if stream else BODY
        task = asyncio.ensure_future(one(fresh if on_fresh else kept, url, body, SHORT_TEXT, how, tally))
        running.add(task)
        task.add_done_callback(running.discard)
        i += 1
        at += 1 / RATE
        await asyncio.sleep(max(0.0, at - time.monotonic()))
    if running:
        await asyncio.gather(*running)


async def watch_exit(pids: list[int]) -> float:
    """When the last of `pids` is gone (a zombie counts as gone)."""
    while any(start_time(pid) is not None for pid in pids):
        await asyncio.sleep(0.1)
    return time.monotonic()


def longest_gap(done: list[float], start: float, end: float) -> float:
    """The longest time without a complete answer, from `start` to `end`."""
    moments = [start, *sorted(done), end]
    return max(b - a for a, b in itertools.pairwise(moments))


# -- ccf, in a home of its own ----------------------------------------------------------------


class Home:
    """One variant's `CLAUDE_FALLBACK_HOME`, its config, its port and the `ccf` commands run in it."""

    def __init__(self, path: Path, upstream: str, workers: int) -> None:
        self.path = path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path.mkdir(parents=True)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CLAUDE_FALLBACK_", "ANTHROPIC_")) and k.lower() not in PROXY_VARIABLES
        }
        self.env["CLAUDE_FALLBACK_HOME"] = str(path)
        self.upstream = upstream
        # The checkout whose code serves now: a `ccf` of another one takes its proxy for a
        # stranger (its command line names that checkout's lean master), so it runs `ccf stop`.
        self.checkout = REPO
        self.configure(workers)

    def configure(self, workers: int) -> None:
        config = self.path / "config.yaml"
        config.write_text(
            "endpoints:\n"
            f'  - {{name: upstream, baseUrl: "{self.upstream}", apiKey: ""}}\n'
            f"server: {{port: {self.port}, workers: {workers}}}\n"
            "logging: {level: info}\n"
        )
        config.chmod(0o600)

    def ccf(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> str:
        """Runs `python -m addon.cli ARGS` from the checkout `cwd` (default: the one that serves);
        its output, or BenchError."""
        command = [sys.executable, "-m", "addon.cli", *args]
        try:
            result = subprocess.run(
                command,
                cwd=cwd or self.checkout,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"`ccf {' '.join(args)}` took over {timeout:g} s") from e
        if result.returncode != 0:
            said = result.stdout + result.stderr
            raise BenchError(f"`ccf {' '.join(args)}` exited {result.returncode}:\n{said}")
        return result.stdout

    def holder(self) -> dict[str, Any]:
        """What the process that holds the port says of itself."""
        status = handover.status_of(handover.control_path(self.port, self.env))
        if status is None:
            raise BenchError(f"nothing answers on the control socket of port {self.port}")
        return status

    def pids(self) -> list[int]:
        """Every proxy of this home: the pid file's, and each that answers on its control socket."""
        found = []
        with contextlib.suppress(OSError, ValueError, IndexError):
            found.append(int((self.path / "ccf.pid").read_text().split()[0]))
        for path in handover.all_paths(self.env):
            if (status := handover.status_of(path)) is not None:
                found.append(int(status["pid"]))
        return list(dict.fromkeys(found))

    def stop(self) -> None:
        """Stops every proxy of this home (`ccf stop --now`), and kills what is left of them."""
        started = {p: start_time(p) for pid in self.pids() for p in process_tree(pid)}
        with contextlib.suppress(BenchError):
            self.ccf("stop", "--now", timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(start_time(p) == at for p, at in started.items() if at):
            time.sleep(0.1)
        for pid, at in started.items():
            if at is not None and start_time(pid) == at:  # the same process, still there
                print(f"bench: pid {pid} of {self.path.name} outlived `ccf stop --now`: killed")
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def notable(self, most: int = 40) -> list[str]:
        """The lines of ccf.log above the info level (warnings, errors, tracebacks)."""
        try:
            lines = (self.path / "ccf.log").read_text(errors="replace").splitlines()
        except OSError:
            return []
        quiet = ('"level": "info"', '"level": "debug"', " listening at ")
        return [line for line in lines if not any(q in line for q in quiet)][:most]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.path / "ccf.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def second_checkout(workdir: Path) -> Path:
    """A copy of this checkout's `addon/` that says it is NEWER: what an upgrade installs."""
    copy = workdir / "newer"
    shutil.copytree(REPO / "addon", copy / "addon", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "addon" / "__init__.py"
    text, count = re.subn(r'^__version__ = ".*"$', f'__version__ = "{NEWER}"', init.read_text(), flags=re.M)
    if count != 1:
        raise BenchError(f"no __version__ line in {init}")
    init.write_text(text)
    return copy


def run_variant(variant: Variant, settings: Settings, upstream: str, workdir: Path) -> Outcome:
    home = Home(workdir / variant.key, upstream, variant.workers)
    try:
        home.ccf("start", timeout=90)
        before = home.holder()
        checkout = second_checkout(workdir) if variant.newer else REPO

        def act() -> str:
            if not variant.restart:
                return home.ccf("stop", timeout=settings.seconds + 60) + home.ccf("start", timeout=90)
            if variant.workers_after:
                home.configure(variant.workers_after)
            said = home.ccf("restart", cwd=checkout)
            home.checkout = checkout
            return said

        old = process_tree(int(before["pid"]))
        outcome = asyncio.run(under_load(home.url, settings, act, old))
        outcome.variant, outcome.before = variant.key, before
        outcome.after, outcome.log = home.holder(), home.notable()
        check(variant, outcome)
        return outcome
    except BenchError as e:
        log = home.path / "ccf.log"
        raise BenchError(f"{variant.name}: {e}\nlast lines of {log}:\n{home.log_tail()}") from e
    finally:
        home.stop()


def check(variant: Variant, outcome: Outcome) -> None:
    """The new process holds the port, with the workers and the version the variant asks for."""
    before, after = outcome.before, outcome.after
    wanted = (variant.expected_workers, NEWER if variant.newer else __version__)
    if after["pid"] == before["pid"] or (after.get("workers"), after.get("version")) != wanted:
        raise BenchError(
            f"after the restart: pid {after['pid']} with {after.get('workers')} workers, version "
            f"{after.get('version')}; before: pid {before['pid']}; expected a new pid with {wanted}"
        )
    if outcome.tally.long_complete + outcome.tally.cut < 1:
        raise BenchError("no long stream got an answer: the load did not run")


def run(settings: Settings) -> list[Outcome]:
    long = Behavior(text=settings.long_text, event_delay=EVENT_DELAY)
    upstream = Upstream(long).start_in_thread()
    outcomes = []
    try:
        with tempfile.TemporaryDirectory(prefix="ccf-bench-restart-") as tmp:
            for variant in VARIANTS:
                print(f"  {variant.name} ...", flush=True)
                outcomes.append(run_variant(variant, settings, upstream.url, Path(tmp)))
    finally:
        upstream.stop_thread()
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    names = {v.key: v.name for v in VARIANTS}
    head = f"{'variant':30} {'complete':>13} {'cut':>5} {'refused':>8} {'errors':>7} "
    head += f"{'restart':>9} {'longest gap':>12} {'old exits':>10}"
    rows = [head]
    for o in outcomes:
        t = o.tally
        gone = f"{o.old_gone_after:.1f} s" if o.old_gone_after is not None else "-"
        rows.append(
            f"{names[o.variant]:30} {f'{t.complete}/{t.sent}':>13} {t.cut:>5} {t.refused:>8} {t.errors:>7} "
            f"{o.restart_seconds:>7.2f} s {o.longest_gap:>10.2f} s {gone:>10}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short smoke run: streams of 8 s")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    settings = Settings.make(args.quick)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in finally
    print(
        f"{settings.streams} streams of {settings.seconds:g} s and {RATE:g} new requests a second; "
        f"the restart once the streams are half way ({os.cpu_count()} CPUs)",
        flush=True,
    )
    started = time.monotonic()
    try:
        outcomes = run(settings)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    print()
    print(table(outcomes))
    print()
    for o in outcomes:
        for kind, seen in o.tally.samples.items():
            print(f"{o.variant}, {kind}, from the restart's start: " + "; ".join(seen))
        print(f"{o.variant}: {' '.join(o.said.split())}")
        failed = o.tally.cut or o.tally.refused or o.tally.errors
        if failed and o.variant != "stop-start" and o.log:
            print(f"{o.variant}, ccf.log above info:\n  " + "\n  ".join(o.log))
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        document = {
            "settings": {**asdict(settings), "rate": RATE, "cpus": os.cpu_count()},
            "variants": [
                {
                    **{k: v for k, v in asdict(o).items() if k != "tally"},
                    **{k: v for k, v in asdict(o.tally).items() if k != "steady_done"},
                    "errors": o.tally.errors,
                }
                for o in outcomes
            ],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0
