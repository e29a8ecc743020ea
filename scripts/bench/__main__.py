"""Benchmark claude-code-fallback against mitmproxy's own floor and claude-code-router, in one run.

The command line and the run: the phases in turn, with the CPU other processes used
meanwhile, then the description, the table and the notes (and `--json`, every figure).
`--platforms`, `--fleet`, `--cache-day`, `--otel` and `--restart` run the other benchmarks
instead. The exit status is 0 when every figure was measured, 1 when a measurement broke.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import BenchError
from .ccr import CCR_CACHE, CCR_PACKAGE, Ccr, find_ccr
from .phases import PHASES, Phase, Tools
from .plan import Results, Settings, fake_specs
from .procfs import busy_cpu_seconds, own_cpu_seconds
from .report import describe, evaluate, table
from .services import MITMDUMP, Service, Services, start_fakes


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
    instead = parser.add_mutually_exclusive_group()
    instead.add_argument(
        "--platforms",
        action="store_true",
        help="instead: Bedrock, Vertex AI and OpenAI-format backups against the Anthropic path "
        "(--quick and --json apply)",
    )
    instead.add_argument(
        "--fleet",
        action="store_true",
        help="instead: the Redis-shared state against the memory backend, and how soon a "
        "cooldown reaches another instance (--quick and --json apply)",
    )
    instead.add_argument(
        "--cache-day",
        action="store_true",
        help="instead: a day of Claude Code sessions with an outage of the primary, and what the "
        "prompt cache made of it under three routings (--quick and --json apply)",
    )
    instead.add_argument(
        "--otel",
        action="store_true",
        help="instead: the proxy with OpenTelemetry off and on (every request traced), side by "
        "side: throughput, latency and CPU per request and per relayed event (--quick and --json apply)",
    )
    instead.add_argument(
        "--restart",
        action="store_true",
        help="instead: `ccf restart` under long streams and a steady load, against `ccf stop` then "
        "`ccf start`, counted at the client (--quick and --json apply)",
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
    passed = [*(["--quick"] if args.quick else []), *(["--json", str(args.json)] if args.json else [])]
    if args.platforms:
        from . import platforms  # imports botocore and google-auth, which the rest does without

        return platforms.main(passed)
    if args.fleet:
        from . import fleet

        return fleet.main(passed)
    if args.cache_day:
        from . import cache_day

        return cache_day.main(passed)
    if args.otel:
        from . import otel  # imports opentelemetry-proto, which the rest does without

        return otel.main(passed)
    if args.restart:
        from . import restart

        return restart.main(passed)
    if not MITMDUMP.exists():
        print(f"bench: {MITMDUMP} not found; run with the venv's python", file=sys.stderr)
        return 1
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in finally
    settings = Settings.make(args.quick, args.duration, args.runner, args.workers)
    ccr, why = find_ccr(args.ccr)
    found = versions(ccr, why)
    announce(settings, ccr, why, found)
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


def raise_fd_limit(wanted: int = 16384) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def versions(ccr: Ccr | None, why: str) -> dict[str, str]:
    """What the proxies run on: this interpreter and its mitmproxy; claude-code-router and node."""
    from mitmproxy.version import VERSION

    return {
        "python": platform.python_version(),
        "mitmproxy": VERSION,
        "proxies": f"Python {platform.python_version()} ({sys.executable}), mitmproxy {VERSION}",
        "ccr": f"claude-code-router {ccr.version} on node {ccr.node_version}" if ccr else f"absent ({why})",
    }


def announce(settings: Settings, ccr: Ccr | None, why: str, found: dict[str, str]) -> None:
    """What runs, before the run."""
    lean = settings.runner == "lean"
    runner = "the lean master (addon/lean/master.py), as ccf runs them" if lean else "mitmdump -s"
    print(f"proxies: {found['proxies']}; (3) and (4) run on {runner}")
    if lean:
        print(f"(5) and (6): (3) and (4) with server.workers: {settings.workers}")
    else:
        print("(5) and (6) are left out: mitmdump ignores server.workers")
    if ccr:
        print(f"ccr: {found['ccr']}, {ccr.cli.parent.parent}")
    else:
        print(f"claude-code-router {why}: its column is left out, everything else runs")


def run(settings: Settings, tools: Tools, found: dict[str, str]) -> Results:
    described = {
        "throughput": "wrk -t2 -c16" if tools.wrk else "asyncio+aiohttp client, 16 connections",
        "latency": "aiohttp, sequential on one keep-alive connection",
        "cpus": str(os.cpu_count()),
        "workers": (
            f"(5), (6): (3), (4) with server.workers: {settings.workers}; their CPU and RSS are the "
            "supervisor's and its workers' summed"
            if settings.runner == "lean"
            else "(5), (6) left out: mitmdump ignores server.workers"
        ),
        **found,
    }
    results = Results(settings, described, load_before=os.getloadavg()[0])
    with workspace() as workdir:
        services = Services(workdir)
        try:
            fakes = start_fakes(services, fake_specs())
            for phase in PHASES:
                run_phase(phase, results, services, fakes, tools)
        finally:
            services.stop()
    evaluate(results)
    return results


def run_phase(
    phase: Phase, results: Results, services: Services, fakes: dict[str, Service], tools: Tools
) -> None:
    """One phase, with its wall time and the CPU time processes outside the benchmark used
    meanwhile (the machine's, from /proc/stat, minus the benchmark's own)."""
    name = phase.__name__.removeprefix("phase_")
    started, busy, own = time.monotonic(), busy_cpu_seconds(), _own_cpu_seconds(services)
    phase(results, services, fakes, tools)
    wall = time.monotonic() - started
    other = busy_cpu_seconds() - busy - (_own_cpu_seconds(services) - own)
    results.timings[name] = wall
    results.other_cpu[name] = max(0.0, other)
    if other > 0.05 * wall:
        results.notes.append(
            f"other processes used {other:.1f} CPU-s during the {wall:.0f} s {name} "
            "phase: its figures are noisier than usual"
        )


def _own_cpu_seconds(services: Services) -> float:
    return own_cpu_seconds(service.pid for service in services.running)


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ccf-bench-") as tmp:
        path = Path(tmp)
        (path / "home").mkdir()
        yield path


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
