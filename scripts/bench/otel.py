"""Benchmark OpenTelemetry's cost: the proxy with telemetry off and on, side by side, in one run.

What it measures and what it found: docs/telemetry.md and docs/performance.md, "OpenTelemetry".
Proxies as `ccf` runs them, against the fake upstream: `off` without the `telemetry`
section, `on` with it, every request traced (`sampler: always_on`) and its spans sent to an
OTLP/HTTP collector on loopback (in this process: its CPU is not the proxy's), and `10 %`
with one request in ten traced (`traceidratio`). They take turns in rounds, so that
background load weighs on all alike.

* Throughput: small non-streamed POSTs at 16 connections (wrk, else aiohttp), with p50 and
  p99, and the proxy's CPU per request over the same rounds (its process's user + system).
* CPU per relayed event: 8 long streams at once (1,500 events each) through a proxy of
  each kind, as the main benchmark measures it.
* The spans the collector received, against the requests the traced proxies served: two a
  request (the request's and its attempt's), for one request in ten with `10 %`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from . import BenchError
from .client import BODY
from .loads import WRK_SCRIPT, Throughput, aiohttp_throughput, cpu_per_event, run_wrk
from .plan import LONG_ARGS, LONG_STREAMS, LONG_WORDS, Settings
from .procfs import process_cpu_seconds
from .services import Service, Services, start_configured, start_fakes

VARIANTS = ("off", "on", "10 %")
SAMPLERS = {"on": "always_on", "10 %": "traceidratio, samplerArg: 0.1"}


@dataclass
class Figures:
    """What a run found, by variant: throughput, its latency percentiles, CPU per request
    and per 1,000 relayed events; and the spans the collector received."""

    rps: dict[str, float] = field(default_factory=dict)
    p50_ms: dict[str, float] = field(default_factory=dict)
    p99_ms: dict[str, float] = field(default_factory=dict)
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_1k_events: dict[str, float] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    spans_received: int = 0


class Collector:
    """An OTLP/HTTP receiver on loopback that counts the spans it is sent."""

    def __init__(self) -> None:
        self.spans = 0
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                    with collector.lock:
                        collector.spans += count
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def config(upstream: str, collector: str, variant: str) -> str:
    lines = [
        "endpoints:",
        f'  - {{name: upstream, baseUrl: "{upstream}", apiKey: ""}}',
        "logging: {level: warn}",
    ]
    if sampler := SAMPLERS.get(variant):
        lines.append(f'telemetry: {{enabled: true, endpoint: "{collector}", sampler: {sampler}}}')
    return "\n".join(lines) + "\n"


def throughput(
    proxies: dict[str, Service], settings: Settings, workdir: Path
) -> dict[str, tuple[Throughput, float]]:
    """Each proxy's throughput and the CPU-s its process used meanwhile, the proxies taking
    turns in rounds of about 5 s after a warm-up; the rounds of one proxy added up."""
    wrk = shutil.which("wrk")
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT % BODY)

    def load(url: str, seconds: int) -> Throughput:
        if wrk:
            return run_wrk(wrk, url, seconds, script)
        return asyncio.run(aiohttp_throughput(url, seconds))

    for proxy in proxies.values():
        load(proxy.url, settings.warmup)
    rounds = max(2, round(settings.duration / 5))
    seconds = max(1, settings.duration // rounds)
    runs: dict[str, list[tuple[Throughput, float]]] = {name: [] for name in proxies}
    for i in range(rounds):
        for name in list(proxies)[:: 1 if i % 2 else -1]:
            before = process_cpu_seconds(proxies[name].pid)
            run = load(proxies[name].url, seconds)
            runs[name].append((run, process_cpu_seconds(proxies[name].pid) - before))
    out = {}
    for name, parts in runs.items():
        requests = sum(t.requests for t, _ in parts)
        elapsed = sum(t.seconds for t, _ in parts)
        p50 = sum(t.p50_ms * t.requests for t, _ in parts) / requests
        p99 = sum(t.p99_ms * t.requests for t, _ in parts) / requests
        errors = sum(t.errors for t, _ in parts)
        out[name] = (
            Throughput(requests / elapsed, requests, errors, elapsed, p50, p99),
            sum(c for _, c in parts),
        )
        print(f"  {name:5s} {requests / elapsed:7.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
    return out


def run(quick: bool) -> Figures:
    settings = Settings.make(quick, None)
    figures = Figures()
    collector = Collector()
    with tempfile.TemporaryDirectory(prefix="ccf-bench-otel-") as tmp:
        workdir = Path(tmp)
        (workdir / "home").mkdir()
        services = Services(workdir)
        try:
            fakes = start_fakes(services, {"fast": [], "long": LONG_ARGS})
            json_proxies = {
                v: start_configured(services, f"json-{v}", config(fakes["fast"].url, collector.url, v))
                for v in VARIANTS
            }
            generator = "wrk" if shutil.which("wrk") else "aiohttp"
            print(f"throughput ({generator}, 16 connections), the variants taking turns:", flush=True)
            loads = throughput(json_proxies, settings, workdir)
            for v, (load, cpu) in loads.items():
                figures.rps[v], figures.p50_ms[v], figures.p99_ms[v] = load.rps, load.p50_ms, load.p99_ms
                figures.requests[v] = load.requests
                figures.cpu_us_per_request[v] = cpu / load.requests * 1e6
            print(f"CPU per event, {LONG_STREAMS} streams of {LONG_WORDS} events at once ...", flush=True)
            relays = {
                v: start_configured(services, f"relay-{v}", config(fakes["long"].url, collector.url, v))
                for v in VARIANTS
            }
            figures.cpu_ms_per_1k_events = cpu_per_event(relays, 1 if quick else 5)
        finally:
            services.stop()  # the proxies' last spans leave as they stop
    collector.stop()
    figures.spans_received = collector.spans
    return figures


def report(figures: Figures) -> str:
    rows = [
        ("req/s, JSON, 16 connections", figures.rps, "{:.0f}"),
        ("p50 ms, 16 connections", figures.p50_ms, "{:.2f}"),
        ("p99 ms, 16 connections", figures.p99_ms, "{:.2f}"),
        ("CPU µs per request", figures.cpu_us_per_request, "{:.0f}"),
        ("CPU ms per 1,000 relayed events", figures.cpu_ms_per_1k_events, "{:.1f}"),
    ]
    lines = [f"{'':34}" + "".join(f"{v:>16}" for v in VARIANTS)]
    for label, values, form in rows:
        cells = [form.format(values["off"])]
        cells += [f"{form.format(values[v])} ({values[v] / values['off']:.2f}x)" for v in VARIANTS[1:]]
        lines.append(f"{label:34}" + "".join(f"{cell:>16}" for cell in cells))
    for v in VARIANTS[1:]:
        extra = figures.cpu_us_per_request[v] - figures.cpu_us_per_request["off"]
        lines.append(f"tracing, {v}: {extra:+.0f} µs of CPU per request")
    traced = figures.requests["on"] + figures.requests["10 %"]
    lines.append(
        f"spans received: {figures.spans_received}, for {traced} requests measured through traced proxies"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores", flush=True)
    try:
        figures = run(args.quick)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    print()
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(asdict(figures), indent=2))
    return 0
