"""The loads a benchmark puts on a URL and what it measures of them: throughput at 16
connections (wrk, else aiohttp), latency at one connection, SSE stream timing, failover
times to first byte, CPU per relayed event, and memory with many streams open."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from . import BenchError
from .client import BODY, HEADERS, STREAM_BODY, check, event_name, get_text, post, session
from .plan import EVENTS_PER_STREAM, FAIL_NOW_NAME, FAST_NAME, LONG_STREAMS, STREAM_DELAY, Settings
from .procfs import memory_kb, process_cpu_seconds, process_tree, pss_kb
from .services import Service


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> float:
    return seconds * 1000.0


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
    """One load's outcome: answered requests per second, how many requests and errors in
    how many seconds, and the latency of a whole request under that load."""

    rps: float
    requests: int
    errors: int
    seconds: float
    p50_ms: float = math.nan
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
    """The fallback load generator: `connections` workers, each a keep-alive loop (then the
    client may be the limit for the fastest variants)."""
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
    return {key: _combined(key, runs) for key, runs in parts.items()}


def _combined(key: str, runs: list[Throughput]) -> Throughput:
    """The rounds of one load as one, printed as it comes."""
    requests = sum(t.requests for t in runs)
    errors = sum(t.errors for t in runs)
    elapsed = sum(t.seconds for t in runs)
    p50, p99 = _weighted(runs, "p50_ms"), _weighted(runs, "p99_ms")
    t = Throughput((requests - errors) / elapsed, requests, errors, elapsed, p50, p99)
    print(
        f"  throughput {key:14s} {t.rps:9.0f} req/s, p50 {t.p50_ms:6.1f} ms, "
        f"p99 {t.p99_ms:6.1f} ms ({t.errors} errors)",
        flush=True,
    )
    return t


def _weighted(runs: list[Throughput], name: str) -> float:
    """The mean of a figure of several runs, weighted by their requests."""
    requests = sum(t.requests for t in runs)
    return sum(t.requests * getattr(t, name) for t in runs) / requests if requests else math.nan


# -- latency at one connection ------------------------------------------------------------


async def measure_latency(
    urls: dict[str, str], settings: Settings, served_by: dict[str, str | None]
) -> dict[str, list[float]]:
    """Sequential requests, one keep-alive connection per variant, variants interleaved in
    blocks; each request's whole time."""
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
    """One stream's timing from the request: to its first body byte, to its first content
    event, and the gaps between consecutive events from that one on."""

    first_byte: float
    first_content: float
    gaps: list[float]


async def one_stream(client: aiohttp.ClientSession, url: str, served_by: str | None) -> StreamSample:
    """One SSE request; event arrival times are those of the chunks that completed them.

    The gaps start at the first content event: before it, the proxy holds the preamble by
    design, which bunches those events.
    """
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
    """One stream at a time, the variants in turn, after a stream each to warm up."""
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
    """The p50 times to the first event and the first content event; jitter, the p99 over
    all gaps of how far each is from the fake's STREAM_DELAY."""
    gaps = [g for s in samples for g in s.gaps]
    return {
        "ttfe_ms": ms(percentile([s.first_byte for s in samples], 50)),
        "ttfc_ms": ms(percentile([s.first_content for s in samples], 50)),
        "jitter_p99_ms": ms(percentile([abs(g - STREAM_DELAY) for g in gaps], 99)),
        "gap_p99_ms": ms(percentile(gaps, 99)),
    }


# -- failover -----------------------------------------------------------------------------


async def first_failover(url: str) -> float:
    """Time to first byte of the first request through a fresh failover proxy: it really
    fails over, cold connections included."""
    async with session() as client:
        reply = await post(client, url)
    check(reply, 200, FAST_NAME, "first failover")
    return reply.ttfb


@dataclass
class FailoverSamples:
    """Times to first byte, taken in turn: the failing primary's own 429, the backup's own
    answer, and each proxy's answer after the primary's 429."""

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
            await _check_failovers(clients[variant], url, variant, warmup + n)
    return samples


async def _check_failovers(client: aiohttp.ClientSession, url: str, variant: str, expected: int) -> None:
    """The proxy at `url` counted `expected` failovers in its /metrics."""
    metrics = await get_text(client, f"{url}/metrics")
    counted = sum(
        float(m.group(1))
        for m in re.finditer(r"^ccf_failovers_total\{[^}]*\}\s+(\S+)$", metrics, re.MULTILINE)
    )
    if counted != expected:
        raise BenchError(f"expected {expected} failovers, {variant} counted {counted:g}")


# -- CPU per relayed event ----------------------------------------------------------------


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


# -- memory with many open streams --------------------------------------------------------


@dataclass
class Memory:
    """A process tree's memory with many streams open: at rest (summed, and per process), the
    peaks of its summed RSS and PSS, how many streams were open at once, how many failed,
    and how long until all were open."""

    idle_mb: float
    idle_each_mb: list[float]  # per process at rest: for workers, the supervisor first
    peak_mb: float
    peak_pss_mb: float
    peak_open: int
    failed: int
    ramp_s: float


class OpenStreams:
    """The streams `hold_streams` opens: how many are open now and at most, how many failed,
    and an event set once `n` are open at the same moment."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.now = self.most = self.failed = 0
        self.all_open = asyncio.Event()

    async def hold(self, client: aiohttp.ClientSession, url: str, served_by: str | None) -> None:
        """One stream, open from its first body byte until it is cancelled."""
        is_open = False
        try:
            async with client.post(f"{url}/v1/messages", data=STREAM_BODY, headers=HEADERS) as response:
                if response.status != 200 or served_by not in (None, response.headers.get("x-fake-name")):
                    raise BenchError(f"stream via {url}: {response.status}")
                async for _ in response.content.iter_any():
                    if not is_open:
                        is_open = True
                        self.now += 1
                        self.most = max(self.most, self.now)
                        if self.now == self.n:
                            self.all_open.set()
            self.failed += 1  # ended on its own: it should have stalled
        except (aiohttp.ClientError, TimeoutError, BenchError):
            self.failed += 1
        finally:
            if is_open:
                self.now -= 1


class TreeMemory:
    """The peaks of a process tree's summed RSS and PSS, sampled until cancelled; the tree is
    read again now and then (a worker may have been started again)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tree = process_tree(pid)
        self.rss_kb = memory_kb(self.tree, "VmRSS")
        self.pss_kb = pss_kb(self.tree)
        self.idle_mb = self.rss_kb / 1024
        self.idle_each_mb = [memory_kb([p], "VmRSS") / 1024 for p in self.tree]

    async def sample(self) -> None:
        for i in itertools.count(1):
            self.rss_kb = max(self.rss_kb, memory_kb(self.tree, "VmRSS"))
            self.pss_kb = max(self.pss_kb, pss_kb(self.tree))
            await asyncio.sleep(0.05)
            if i % 10 == 0:  # /proc takes ms to scan
                self.tree = process_tree(self.pid)

    def peak_rss_mb(self) -> float:
        """The largest sum sampled, and for a single process also its VmHWM (which catches a
        peak between samples; summed over several processes, it would add peaks of different
        moments)."""
        if len(self.tree) == 1:
            return max(self.rss_kb, memory_kb(self.tree, "VmHWM")) / 1024
        return self.rss_kb / 1024


async def hold_streams(url: str, pid: int, n: int, served_by: str | None, hold: float) -> Memory:
    """Opens `n` SSE streams at once, holds them `hold` s once all are open, samples the
    memory of `pid` and its descendants.

    A stream counts as open from its first body byte (through the fallback addon, that is
    after its first content event). The fake keeps sending events and then stalls, so the
    streams stay open until this client closes them.
    """
    streams, memory = OpenStreams(n), TreeMemory(pid)
    async with session(connections=0, total_timeout=300) as client:
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(streams.hold(client, url, served_by)) for _ in range(n)]
        sampler = asyncio.ensure_future(memory.sample())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(streams.all_open.wait(), 60)
        ramp = time.perf_counter() - started
        await asyncio.sleep(hold)
        for task in (*tasks, sampler):
            task.cancel()
        await asyncio.gather(*tasks, sampler, return_exceptions=True)
    return Memory(
        memory.idle_mb,
        memory.idle_each_mb,
        memory.peak_rss_mb(),
        memory.pss_kb / 1024,
        streams.most,
        streams.failed,
        ramp,
    )
