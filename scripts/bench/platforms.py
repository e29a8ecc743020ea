"""Benchmark Claude on the clouds as endpoints against Anthropic's own path, in one run.

What it measures and what it found: docs/performance.md, "Claude on the clouds and
OpenAI-format backups". Four columns, one per backup's platform: anthropic, bedrock,
vertex (`python -m addon.fakes.cloud bedrock|vertex`: SigV4 checked, AWS event-stream
frames, Google tokens) and openai (`python -m addon.fakes.openai`, Chat Completions); the
proxies run as `ccf` runs them, one process each.

* Failover first byte: a proxy whose primary (an Anthropic fake) answers 429 without
  retry-after, `cooldownSeconds: 0`, so every request tries it and fails over to the
  column's backup. Non-streamed POSTs, interleaved with direct requests to the primary
  (its own time to the 429) and to the backup, signed or carrying a token as the proxy's
  would (the backup's own time to first byte). Over the backup's own = (via the proxy -
  the primary's 429) - the backup's own, p50.
* CPU per event: through a proxy whose only endpoint is the column's platform, and its
  ratio to the anthropic column.
* RSS at rest of each column's proxy, after a request: a config without cloud endpoints
  loads none of their libraries (botocore, google-auth), so its figure is the proxy's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from google.auth.transport.urllib3 import Request
from google.oauth2 import service_account

from addon.providers import bedrock, cloud, vertex

from . import BenchError
from .client import BODY, HEADERS, check, post, session
from .loads import cpu_per_event, ms, percentile
from .plan import LONG_ARGS, LONG_STREAMS, LONG_WORDS
from .procfs import memory_kb
from .services import Service, Services, start_configured, start_fakes, wait_for_line

ACCESS_KEY, SECRET_KEY = "AKIABENCHPLATFORMS01", "bench/PLATFORMS/secret/0000000000000001"
REGION = "us-east-1"
PLATFORMS = ("anthropic", "bedrock", "vertex", "openai")
TARGET_OVER_MS = 10.0
TARGET_CPU = {"bedrock": 1.25, "openai": 1.3}  # x the anthropic column's CPU per event


@dataclass
class Figures:
    """What a run found, by platform: failover times to first byte (via the proxy, the
    backup's own, and the difference), CPU per 1,000 relayed events, and RSS at rest."""

    over_backup_ms: dict[str, float] = field(default_factory=dict)
    failover_p50_ms: dict[str, float] = field(default_factory=dict)
    backup_p50_ms: dict[str, float] = field(default_factory=dict)
    primary_429_p50_ms: float = 0.0
    cpu_per_1k_events_ms: dict[str, float] = field(default_factory=dict)
    rss_rest_mb: dict[str, float] = field(default_factory=dict)


# -- the fakes and the proxies ---------------------------------------------------------------


def start_all_fakes(services: Services, workdir: Path) -> dict[str, Service]:
    """Anthropic's fakes (a failing primary, a fast and a long backup), then each platform's."""
    fakes = start_fakes(
        services,
        {"failing": ["--kind", "status", "--status", "429"], "fast": [], "long": LONG_ARGS},
    )
    return {**fakes, **start_platform_fakes(services, workdir)}


def start_platform_fakes(services: Services, workdir: Path) -> dict[str, Service]:
    """A fast and a long fake of each platform; their URLs as the proxy's config names them."""
    fakes = {}
    for platform in ("bedrock", "vertex"):
        for kind, extra in (("fast", []), ("long", LONG_ARGS)):
            name = f"{platform}-{kind}"
            args = ["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY, "--api-key", ""]
            if platform == "vertex":  # each fake is its own service account
                args = ["--key-file", str(workdir / f"{name}.json")]
            command = [sys.executable, "-m", "addon.fakes.cloud", platform, "--name", name, *args, *extra]
            fakes[name] = services.spawn(f"fake-{name}", command, capture_stdout=True)
    for fake in fakes.values():
        fake.url = wait_for_line(fake, b"base_url: ").decode().removeprefix("base_url: ").strip()
    openai = {"openai-fast": [], "openai-long": LONG_ARGS}
    return {**fakes, **start_fakes(services, openai, module="addon.fakes.openai")}


def platform_env(workdir: Path) -> dict[str, str]:
    """The proxies' AWS credentials: the fakes', and nothing from the machine's own config."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(workdir / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "none"),
    }


def endpoint(platform: str, url: str) -> str:
    if platform == "bedrock":
        return f'{{name: backup, provider: bedrock, region: {REGION}, baseUrl: "{url}"}}'
    if platform == "vertex":
        return (
            f'{{name: backup, provider: vertex, region: us-east5, project: fake-project, baseUrl: "{url}"}}'
        )
    if platform == "openai":
        return f'{{name: backup, provider: openai, baseUrl: "{url}", models: {{"*": gpt-fake}}}}'
    return f'{{name: backup, baseUrl: "{url}", apiKey: ""}}'


def start_proxy(
    services: Services, name: str, endpoints: list[str], env: dict[str, str], key_file: Path
) -> Service:
    lines = [
        "endpoints:",
        *(f"  - {e}" for e in endpoints),
        "retry: {cooldownSeconds: 0}",
        "logging: {level: warn}",
    ]
    env = {**env, "GOOGLE_APPLICATION_CREDENTIALS": str(key_file)}
    return start_configured(services, name, "\n".join(lines) + "\n", env)


# -- the backups' own time to first byte -----------------------------------------------------


class Direct:
    """Requests straight to a backup, shaped and signed as the proxy sends them."""

    def __init__(self, platform: str, url: str, key_file: Path) -> None:
        self.platform, self.url = platform, url
        self.token = ""
        if platform == "vertex":
            scopes = [vertex.SCOPE]
            credentials = service_account.Credentials.from_service_account_file(str(key_file), scopes=scopes)
            credentials.refresh(Request(urllib3.PoolManager()))
            self.token = credentials.token

    def request(self) -> tuple[str, dict[str, str], bytes]:
        if self.platform == "anthropic":
            return f"{self.url}/v1/messages", HEADERS, BODY.encode()
        body = json.loads(BODY)
        if self.platform == "openai":
            chat = {"model": "gpt-fake", "max_tokens": body["max_tokens"], "messages": body["messages"]}
            return (
                f"{self.url}/chat/completions",
                {"content-type": "application/json"},
                json.dumps(chat).encode(),
            )
        model = body.pop("model")
        if self.platform == "vertex":
            body["anthropic_version"] = vertex.VERSION
            where = "projects/fake-project/locations/us-east5/publishers/anthropic/models"
            url = f"{self.url}/{where}/{cloud.vertex_model(model)}:rawPredict"
            headers = {"content-type": "application/json", "authorization": f"Bearer {self.token}"}
            return url, headers, json.dumps(body).encode()
        body["anthropic_version"] = bedrock.VERSION
        url = f"{self.url}/model/{cloud.bedrock_model(model, REGION)}/invoke"
        data = json.dumps(body).encode()
        signed = AWSRequest("POST", url, {"content-type": "application/json"}, data)
        SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "bedrock", REGION).add_auth(signed)
        return url, dict(signed.headers.items()), data


async def first_byte(client: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes) -> float:
    """Time to the response's headers of a request in the platform's own shape."""
    started = time.perf_counter()
    async with client.post(url, data=body, headers=headers) as response:
        at = time.perf_counter()
        await response.read()
        if response.status != 200:
            raise BenchError(f"{url}: HTTP {response.status}")
    return at - started


async def measure_failover(
    primary: str, directs: dict[str, Direct], proxies: dict[str, str], n: int
) -> tuple[list[float], dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved: the primary's 429 direct, each backup direct, each proxy failing over."""
    primary_429: list[float] = []
    own: dict[str, list[float]] = {p: [] for p in proxies}
    via: dict[str, list[float]] = {p: [] for p in proxies}
    async with session() as a, session() as b, session() as c:
        for i in range(10 + n):
            took = (await post(a, primary)).ttfb
            for platform, url in proxies.items():
                direct = await first_byte(b, *directs[platform].request())
                through = await post(c, url)
                check(through, 200, None, f"failover to {platform}")
                if i >= 10:
                    own[platform].append(direct)
                    via[platform].append(through.ttfb)
            if i >= 10:
                primary_429.append(took)
    return primary_429, own, via


# -- the run ---------------------------------------------------------------------------------


def run(quick: bool) -> Figures:
    figures = Figures()
    with tempfile.TemporaryDirectory(prefix="ccf-bench-platforms-") as tmp:
        workdir = Path(tmp)
        (workdir / "home").mkdir()
        services = Services(workdir)
        try:
            fakes = start_all_fakes(services, workdir)
            print("failover first byte ...", flush=True)
            failover_figures(figures, services, fakes, 40 if quick else 300)
            print(f"CPU per event, {LONG_STREAMS} streams of {LONG_WORDS} events at once ...", flush=True)
            long = {p: fakes["long" if p == "anthropic" else f"{p}-long"].url for p in PLATFORMS}
            env, key_file = platform_env(workdir), workdir / "vertex-long.json"
            relays = {
                p: start_proxy(services, f"relay-{p}", [endpoint(p, long[p])], env, key_file)
                for p in PLATFORMS
            }
            figures.cpu_per_1k_events_ms = cpu_per_event(relays, 1 if quick else 7)
        finally:
            services.stop()
    return figures


def failover_figures(figures: Figures, services: Services, fakes: dict[str, Service], n: int) -> None:
    """`n` failovers to each platform's backup against its own time, and each proxy's RSS
    at rest after them; the proxies are stopped after."""
    workdir = services.workdir
    env, key_file = platform_env(workdir), workdir / "vertex-fast.json"
    fast = {p: fakes["fast" if p == "anthropic" else f"{p}-fast"].url for p in PLATFORMS}
    failing = f'{{name: primary, baseUrl: "{fakes["failing"].url}", apiKey: ""}}'
    failovers = {
        p: start_proxy(services, f"failover-{p}", [failing, endpoint(p, fast[p])], env, key_file)
        for p in PLATFORMS
    }
    directs = {p: Direct(p, fast[p], key_file) for p in PLATFORMS}
    urls = {p: s.url for p, s in failovers.items()}
    primary_429, own, via = asyncio.run(measure_failover(fakes["failing"].url, directs, urls, n))
    figures.primary_429_p50_ms = ms(percentile(primary_429, 50))
    for p in PLATFORMS:
        figures.failover_p50_ms[p] = ms(percentile(via[p], 50))
        figures.backup_p50_ms[p] = ms(percentile(own[p], 50))
        figures.over_backup_ms[p] = (
            figures.failover_p50_ms[p] - figures.primary_429_p50_ms - figures.backup_p50_ms[p]
        )
        figures.rss_rest_mb[p] = memory_kb([failovers[p].pid], "VmRSS") / 1024
    services.stop(list(failovers.values()))


def report(figures: Figures) -> tuple[str, bool]:
    """The table, then PASS or FAIL for each target: failover first byte at most
    TARGET_OVER_MS over the backup's own, CPU per event at most TARGET_CPU x anthropic's."""
    width = 40
    lines = [f"{'':{width}}" + "".join(f"{p:>12}" for p in PLATFORMS)]

    def row(label: str, values: dict[str, float], digits: int = 1) -> None:
        lines.append(f"{label:{width}}" + "".join(f"{values[p]:>12.{digits}f}" for p in PLATFORMS))

    lines.append(f"{'primary 429, direct, p50 ms':{width}}{figures.primary_429_p50_ms:>12.1f}")
    row("via the proxy, 429 then backup, p50 ms", figures.failover_p50_ms)
    row("backup's own first byte, p50 ms", figures.backup_p50_ms)
    row("failover first byte over own, ms", figures.over_backup_ms)
    row("CPU-ms per 1,000 relayed events", figures.cpu_per_1k_events_ms)
    base = figures.cpu_per_1k_events_ms["anthropic"]
    row("  x anthropic", {p: v / base for p, v in figures.cpu_per_1k_events_ms.items()}, 2)
    row("RSS at rest, MB", figures.rss_rest_mb)
    verdicts = []
    for p in PLATFORMS:
        ok = figures.over_backup_ms[p] <= TARGET_OVER_MS
        verdicts.append((ok, f"{p}: failover first byte over the backup's own <= +{TARGET_OVER_MS:g} ms"))
    for p, limit in TARGET_CPU.items():
        ratio = figures.cpu_per_1k_events_ms[p] / base
        verdicts.append((ratio <= limit, f"{p}: CPU per event <= {limit} x anthropic"))
    lines += ["", *(f"{'PASS' if ok else 'FAIL'}  {what}" for ok, what in verdicts)]
    return "\n".join(lines), all(ok for ok, _ in verdicts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores", flush=True)
    figures = run(args.quick)
    text, _ = report(figures)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(figures.__dict__, indent=2))
    return 0
