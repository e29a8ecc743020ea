"""The main benchmark's phases, each with the proxies it needs in front of its fakes:
requests (failover, latency, throughput), streams, relay (CPU per event), memory and
start. Each puts its figures into the run's Results."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from . import BenchError
from .ccr import Ccr, start_ccr
from .client import HEADERS, STREAM_BODY, Reply, check, session
from .loads import (
    cpu_per_event,
    first_failover,
    hold_streams,
    measure_failover,
    measure_latency,
    measure_streams,
    measure_throughput,
    ms,
    percentile,
    stream_figures,
)
from .plan import (
    FAIL_NAME,
    FAIL_NOW_NAME,
    FAILOVERS,
    FAST_NAME,
    LONG_NAME,
    LONG_STREAMS,
    LONG_WORDS,
    RSS_STREAMS,
    SLOW_NAME,
    STREAM_NAME,
    Results,
)
from .services import ProxySpec, Service, Services, free_port, proxy_command, start_proxies, write_config


@dataclass
class Tools:
    """What a run measures with besides the proxies: wrk (when installed) and claude-code-router."""

    wrk: str | None
    ccr: Ccr | None


Phase = Callable[[Results, Services, dict[str, Service], Tools], None]


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


def served(urls: dict[str, str], name: str) -> dict[str, str | None]:
    """Which fake each variant's replies must name in `x-fake-name`; None: not checked.

    claude-code-router does not pass the upstream's headers on; its fallback is a fake that
    answers only 429, so a 200 through it is the primary's.
    """
    return {v: None if v == "ccr" else name for v in urls}


def proxy_specs(results: Results, prefix: str, upstream: Service, failing: Service) -> list[ProxySpec]:
    """mitmdump, the floor, (3) and (4), and on the lean master (5) and (6), in front of one upstream."""
    healthy = (("primary", upstream.url),)
    failover = (("primary", failing.url), ("backup", upstream.url))
    runner, workers = results.settings.runner, results.settings.workers
    specs = {
        "mitmdump": ProxySpec(f"mitmdump-{prefix}", upstream.url),
        "floor": ProxySpec(f"floor-{prefix}", upstream.url, lean=True),
        "healthy": ProxySpec(f"healthy-{prefix}", upstream.url, healthy, runner=runner),
        "failover": ProxySpec(f"failover-{prefix}", failing.url, failover, runner=runner),
        "workers": ProxySpec(f"workers-{prefix}", upstream.url, healthy, workers=workers, runner=runner),
        "failover-w": ProxySpec(
            f"failover-w-{prefix}", failing.url, failover, workers=workers, runner=runner
        ),
    }
    return [specs[v] for v in results.settings.mitm_variants()]


def variant_urls(
    results: Results, direct: str, proxies: dict[str, Service], prefix: str, ccr: Service | None
) -> dict[str, str]:
    """Every variant's URL, in the table's order; no ccr when it is absent."""
    urls = {"direct": direct, **({"ccr": ccr.url} if ccr else {})}
    urls.update({v: proxies[f"{v}-{prefix}"].url for v in results.settings.mitm_variants()})
    return urls


def proxy_services(
    results: Results, proxies: dict[str, Service], prefix: str, ccr: Service | None
) -> dict[str, Service]:
    """The processes measured in a phase, by variant: ccr when present, then mitmproxy's."""
    mitm = {v: proxies[f"{v}-{prefix}"] for v in results.settings.mitm_variants()}
    return {**({"ccr": ccr} if ccr else {}), **mitm}


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
    proxies = start_proxies(services, [*proxy_specs(results, prefix, upstream, failing), *extra])
    ccr = start_phase_ccr(results, services, tools, upstream, failing)
    try:
        yield proxies, ccr
    finally:
        services.stop([*proxies.values(), *([ccr] if ccr else [])])


# -- requests: failover, latency, throughput ----------------------------------------------


def phase_requests(results: Results, services: Services, fakes: dict[str, Service], tools: Tools) -> None:
    """Failover times, then latency at one connection, then throughput at 16 connections.

    Besides the phase's proxies, another (4) and (6) whose primary answers 429 without
    retry-after, with `cooldownSeconds: 0`, so that every request through them fails over.
    """
    failing_now, backup = fakes[FAIL_NOW_NAME].url, fakes[FAST_NAME].url
    endpoints = (("primary", failing_now), ("backup", backup))
    runner, workers = results.settings.runner, results.settings.workers
    probes = {  # for the failover distribution of (4) and (6)
        "failover": ProxySpec("failover-probe", failing_now, endpoints, cooldown=0, runner=runner),
        "failover-w": ProxySpec(
            "failover-w-probe", failing_now, endpoints, cooldown=0, workers=workers, runner=runner
        ),
    }
    probes = {v: spec for v, spec in probes.items() if v in results.settings.mitm_variants()}
    upstreams = (fakes[FAST_NAME], fakes[FAIL_NAME])
    with serving(results, services, tools, upstreams, "fast", tuple(probes.values())) as (proxies, ccr):
        urls = variant_urls(results, fakes[FAST_NAME].url, proxies, "fast", ccr)
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
    """From the primary's 429 to the backup's first byte: a proxy's time to first byte minus
    the primary's own time to its 429; the reference, direct, is the backup's own."""
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
    """p50 and p99 at one connection, and "added": minus direct's, so the client's cost cancels out."""
    latency = asyncio.run(measure_latency(urls, results.settings, served(urls, FAST_NAME)))
    for variant, values in latency.items():
        for p in (50, 99):
            results.put(f"lat_p{p}_ms", variant, ms(percentile(values, p)))
    for variant in urls:
        for p in (50, 99):
            row = results.figures[f"lat_p{p}_ms"]
            results.put(f"added_p{p}_ms", variant, _sub(row[variant], row["direct"]))


# -- streams, relay, memory, start --------------------------------------------------------


def phase_streams(results: Results, services: Services, fakes: dict[str, Service], tools: Tools) -> None:
    """Stream timing; "added" figures are minus direct's, so the fake's and the client's own
    timer noise cancel out."""
    upstreams = (fakes[STREAM_NAME], fakes[FAIL_NAME])
    with serving(results, services, tools, upstreams, "stream") as (proxies, ccr):
        urls = variant_urls(results, fakes[STREAM_NAME].url, proxies, "stream", ccr)
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


def phase_relay(results: Results, services: Services, fakes: dict[str, Service], tools: Tools) -> None:
    """CPU a proxy spends per event it relays: what a laptop pays for every token of a session."""
    upstreams = (fakes[LONG_NAME], fakes[FAIL_NAME])
    with serving(results, services, tools, upstreams, "long") as (proxies, ccr):
        measured = proxy_services(results, proxies, "long", ccr)
        print(f"CPU per event, {LONG_STREAMS} streams of {LONG_WORDS} events at once ...", flush=True)
        for variant in [v for v in measured if v in FAILOVERS]:
            asyncio.run(_trip_primary(measured[variant].url, LONG_NAME))
        for variant, cost in cpu_per_event(measured, results.settings.relay_rounds).items():
            results.put("cpu_per_1k_events_ms", variant, cost)
        cpu = results.figures["cpu_per_1k_events_ms"]
        for variant, one in (("workers", "healthy"), ("failover-w", "failover")):
            if cpu.get(variant) is not None and cpu.get(one):
                results.put("cpu_vs_one_process", variant, cpu[variant] / cpu[one])  # type: ignore[operator]


def phase_memory(results: Results, services: Services, fakes: dict[str, Service], tools: Tools) -> None:
    """Memory with RSS_STREAMS streams open through a fresh instance of every variant but direct."""
    upstreams = (fakes[SLOW_NAME], fakes[FAIL_NAME])
    with serving(results, services, tools, upstreams, "slow") as (proxies, ccr):
        for variant, proxy in proxy_services(results, proxies, "slow", ccr).items():
            print(f"{RSS_STREAMS} open streams via {variant} ...", flush=True)
            served_by = None if variant == "ccr" else SLOW_NAME  # as `served` says
            if served_by:  # (ccr's primary is the slow fake: nothing to trip)
                asyncio.run(_trip_primary(proxy.url, SLOW_NAME))
            memory_figures(results, variant, proxy, served_by)


def memory_figures(results: Results, variant: str, proxy: Service, served_by: str | None) -> None:
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


def phase_start(results: Results, services: Services, fakes: dict[str, Service], tools: Tools) -> None:
    """How soon a fresh proxy answers once its port accepts a connection, and serves: what a
    client (or a load balancer's probe) meets right after `ccf start` or a restart."""
    upstream = fakes[FAST_NAME].url
    runner, workers = results.settings.runner, results.settings.workers
    specs = {"healthy": ProxySpec("start-healthy", upstream, (("primary", upstream),), runner=runner)}
    if runner == "lean":
        specs["workers"] = ProxySpec("start-workers", upstream, (("primary", upstream),), workers=workers)
    print("first answers after a start ...", flush=True)
    for variant, spec in specs.items():
        answers, serves = [], []
        for i in range(results.settings.starts):
            answer, served_ms = first_answers(services, replace(spec, name=f"{spec.name}-{i}"))
            answers.append(answer)
            serves.append(served_ms)
        results.put("start_answer_ms", variant, percentile(answers, 50))
        results.put("start_served_ms", variant, percentile(serves, 50))


PHASES: tuple[Phase, ...] = (phase_requests, phase_streams, phase_relay, phase_memory, phase_start)


def first_answers(services: Services, spec: ProxySpec) -> tuple[float, float]:
    """(ms from the port accepting to the first HTTP answer to GET /health, of any status: a
    supervisor whose workers are still starting answers 503 `starting` at once; ms to the
    first 200, when a worker serves)."""
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
            status = _health_status(port)
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


def _health_status(port: int) -> int:
    """The status of GET /health on `port`; 0 for no HTTP answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


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
