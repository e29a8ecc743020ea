"""Row 25: 500 concurrent SSE streams for 30 s, the primary switching to 429 half-way.

Nothing a healthy endpoint could serve may be lost: every stream completes, no client
sees an error, and the proxy's memory stays bounded. Run alone with `scripts/test -m load`.
"""

from __future__ import annotations

import asyncio
import json
import resource
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from addon.fakes.anthropic import Behavior

from .conftest import endpoints_config

STREAMS = 500
DURATION = 30.0
TEXT = " ".join(f"w{i}" for i in range(12))
BODY = json.dumps(
    {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
).encode()
RSS_LIMIT_MB = 300


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_stream(session: aiohttp.ClientSession, url: str) -> str:
    async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as response:
        if response.status != 200:
            return f"HTTP {response.status}"
        body = (await response.read()).decode()
    text = "".join(
        json.loads(line[6:])["delta"]["text"]
        for line in body.splitlines()
        if line.startswith("data: ") and '"text_delta"' in line
    )
    if text != TEXT or not body.rstrip().endswith('{"type":"message_stop"}'):
        return "incomplete stream"
    return ""


async def drive(url: str, until: float) -> tuple[int, list[str]]:
    done = 0
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < until:
                try:
                    error = await one_stream(session, url)
                except (aiohttp.ClientError, TimeoutError) as e:
                    error = f"{type(e).__name__}: {e}"
                if error:
                    errors.append(error)
                done += 1

        await asyncio.gather(*(worker() for _ in range(STREAMS)))
    return done, errors


def warnings(logs: str) -> dict[str, int]:
    """How often the proxy logged each kind of warning: event, endpoint, reason, detail."""
    counts: Counter[str] = Counter()
    for line in logs.splitlines():
        if '"level": "warning"' in line:
            fields = json.loads(line[line.index("{") :])
            keys = ("event", "endpoint", "reason", "detail", "outcome")
            counts[" ".join(str(fields[k]) for k in keys if k in fields)] += 1
    return dict(counts)


@pytest.mark.load
def test_500_streams_for_30_seconds_with_failover_half_way(proxy_factory, primary, backup):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    primary.keep = backup.keep = 0  # the fakes remember counts, not every request
    primary.behavior = backup.behavior = Behavior(kind="ok", text=TEXT, event_delay=0.15)
    config = endpoints_config(primary, backup, logging={"level": "warn"})
    # The product's connect timeout, not the tests' short one: when 500 streams move to the
    # backup at once on a busy machine, opening their connections can take over a second.
    config["timeouts"].update(connect=10000, firstByte=20000, idle=20000, total=60000)
    proxy = proxy_factory(config)
    assert proxy.process is not None
    pid = proxy.process.pid
    peak = [rss_mb(pid)]
    until = time.monotonic() + DURATION
    stop = threading.Event()

    def watch() -> None:
        switched = False
        while not stop.wait(0.25):
            peak.append(rss_mb(pid))
            if not switched and time.monotonic() > until - DURATION / 2:
                primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "60"),))
                switched = True

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        done, errors = asyncio.run(drive(proxy.url + "/v1/messages", until))
    finally:
        stop.set()
        watcher.join()
    print(f"\n{done} streams, {len(errors)} errors, peak proxy RSS {max(peak):.0f} MB")
    if errors:  # what the proxy saw, for a failure that may not come back on a rerun
        pytest.fail(f"{len(errors)} errors, first: {errors[:5]}; proxy said: {warnings(proxy.logs())}")
    assert done >= STREAMS * 3
    assert primary.request_count > STREAMS and backup.request_count > STREAMS
    assert proxy.metric("ccf_failovers_total", from_endpoint="primary", to_endpoint="backup") >= 1
    assert proxy.metric("ccf_requests_total", outcome="success") == done
    assert max(peak) < RSS_LIMIT_MB
