"""Benchmark the Redis-shared state (`state.backend: redis`) against the memory backend, in one run.

What it measures and what it found: docs/performance.md, "The fleet on Redis". A fake
upstream, a real `redis-server` on a free loopback port, and proxies run as `ccf` runs them.

* Throughput: through a proxy with `state.backend: memory` and one with `redis`, the two
  taking turns in rounds so that background load hits both alike (a healthy request never
  waits for Redis).
* Propagation: two redis-backed instances A and B share a primary that answers 429. Each
  round waits until both see the primary usable, sends one request to A (which probes the
  primary, gets the 429, cools it and publishes that) while /health of B is polled as fast
  as it answers; the delay is from the request to A until B shows the primary cooling, so
  it includes A's own attempt: an upper bound of the propagation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from . import BenchError
from .client import BODY, HEADERS
from .loads import Throughput, measure_throughput, percentile
from .plan import Settings
from .services import Service, Services, free_port, http_answers, start_configured, start_fakes

COOLDOWN = 0.3  # seconds: short, so that the rounds follow each other quickly


def config(endpoints: dict[str, str], redis_url: str | None) -> str:
    lines = ["endpoints:"]
    lines += [f'  - {{name: {name}, baseUrl: "{url}", apiKey: ""}}' for name, url in endpoints.items()]
    lines.append(f"retry: {{cooldownSeconds: {COOLDOWN}}}")
    lines.append("logging: {level: warn}")
    if redis_url:
        lines.append(f'state: {{backend: redis, redis: {{url: "{redis_url}", keyPrefix: "bench:"}}}}')
    return "\n".join(lines) + "\n"


def start_proxy(services: Services, name: str, endpoints: dict[str, str], redis_url: str | None) -> Service:
    shared = redis_url is not None
    text = config(endpoints, redis_url)
    return start_configured(services, name, text, ready=lambda url: health_state(url, shared))


def health_state(url: str, shared: bool) -> bool:
    """Serving, and for a redis-backed proxy, in touch with Redis."""
    if not http_answers(f"{url}/health"):
        return False
    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
        return not shared or json.loads(response.read()).get("state") == "redis"


def start_redis(services: Services) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = services.spawn("redis", command)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode != 0:
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"redis-server did not start:\n{server.log_tail()}")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0"


async def primary_status(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(f"{url}/health") as response:
        document = await response.json(content_type=None)
    return str(next(e["status"] for e in document["endpoints"] if e["name"] == "primary"))


async def propagation(a: str, b: str, rounds: int) -> list[float]:
    delays = []
    async with aiohttp.ClientSession() as client:
        for _ in range(rounds):
            deadline = time.monotonic() + 10
            while (await primary_status(client, a), await primary_status(client, b)) != (
                "healthy",
                "healthy",
            ):
                if time.monotonic() > deadline:
                    raise BenchError("the primary's cooldown did not end on both instances")
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            request = asyncio.ensure_future(client.post(f"{a}/v1/messages", data=BODY, headers=HEADERS))
            while await primary_status(client, b) != "cooling":
                if time.perf_counter() - started > 5:
                    raise BenchError("a cooldown on A never reached B")
            delays.append(time.perf_counter() - started)
            response = await request
            if response.headers.get("x-fake-name") != "backup":
                raise BenchError("A did not fail over to the backup")
            response.release()
    return delays


def run(quick: bool) -> tuple[dict[str, Throughput], list[float]]:
    """Throughput of the two backends, then the cooldown's delays from A to B."""
    settings = Settings.make(quick, None)
    wrk = shutil.which("wrk")
    with tempfile.TemporaryDirectory(prefix="ccf-bench-fleet-") as tmp:
        services = Services(Path(tmp))
        try:
            fakes = start_fakes(
                services,
                {"fast": [], "primary": ["--kind", "status", "--status", "429"], "backup": []},
            )
            redis_url = start_redis(services)
            memory = start_proxy(services, "memory", {"fast": fakes["fast"].url}, None)
            shared = start_proxy(services, "redis", {"fast": fakes["fast"].url}, redis_url)
            print(f"throughput ({'wrk' if wrk else 'aiohttp'}, 16 connections):", flush=True)
            urls = {"memory": memory.url, "redis": shared.url}
            throughput = measure_throughput(urls, settings, wrk, Path(tmp))
            pair = {"primary": fakes["primary"].url, "backup": fakes["backup"].url}
            a = start_proxy(services, "fleet-a", pair, redis_url)
            b = start_proxy(services, "fleet-b", pair, redis_url)
            delays = asyncio.run(propagation(a.url, b.url, 10 if quick else 100))
        finally:
            services.stop()
    return throughput, delays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    throughput, delays = run(args.quick)
    ratio = throughput["redis"].rps / throughput["memory"].rps
    p50, p99 = percentile(delays, 50) * 1000, percentile(delays, 99) * 1000
    print()
    print(f"{'figure':44} {'value':>12} {'target':>12}")
    print(f"{'throughput, memory backend':44} {throughput['memory'].rps:>8.0f} r/s")
    print(f"{'throughput, redis backend':44} {throughput['redis'].rps:>8.0f} r/s")
    print(
        f"{'  ratio redis / memory':44} {ratio:>12.2f} {'>= 0.90':>12}  {'pass' if ratio >= 0.9 else 'FAIL'}"
    )
    print(f"{'cooldown A -> B, p50 (' + str(len(delays)) + ' rounds)':44} {p50:>9.1f} ms")
    print(f"{'cooldown A -> B, p99':44} {p99:>9.1f} ms {'< 100 ms':>12}  {'pass' if p99 < 100 else 'FAIL'}")
    if args.json:
        figures = {
            "rps_memory": throughput["memory"].rps,
            "rps_redis": throughput["redis"].rps,
            "ratio": ratio,
        }
        args.json.write_text(json.dumps({**figures, "propagation_ms_p50": p50, "propagation_ms_p99": p99}))
    return 0
