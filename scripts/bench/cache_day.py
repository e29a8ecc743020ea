"""A day of Claude Code sessions through the proxy, with an outage of the primary in the middle.

What it measures and what it found: docs/performance.md, "A day with an outage, and the
prompt cache". Two fake accounts that play the API's prompt cache (`fakes.caching`), a
proxy as `ccf` runs it, and a client that plays 20 Claude Code sessions of 40 requests
each over a four-hour day: a system prompt and tools of 20,000 tokens, a context that
grows by each answer and tool result, its breakpoint on the last message, tool loops
between the user's prompts, a pause now and then long enough for a cache to go cold.
Time runs `--speed` times faster (480: the day takes 30 s), and `routing.cacheTtlScale`
and the fakes' cache lifetimes are scaled alike. From 35% of the day the primary answers
one request in three with 529, from 40% every one, and from 55% it is well again.

The same day runs four times, each with its own proxy and fakes: without the outage, and
with it under three routings: cache-aware (`cacheAware: true`), today's (`cacheAware:
false`: back to the primary once its cooldown ends) and plain per-request failover (no
cooldown, no session kept: every request tries the primary first, as a gateway without
memory does). Without an outage the three route alike, every request to the primary, so
one day without it is the yardstick of all three. Each is priced with the shipped price
table (Claude Opus 4.8, both endpoints API keys); an answer's output is the assistant turn
the day appends to the context.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from addon import sse
from addon.cost.prices import Tokens, shipped
from addon.fakes.anthropic import Behavior, FakeAnthropic
from addon.fakes.caching import CHARS_PER_TOKEN, PromptCache

from . import BenchError
from .client import HEADERS
from .services import Services, start_configured

MODEL = "claude-opus-4-8"
DAY = 4 * 3600.0  # seconds of the day played
DEGRADED, DOWN, RECOVERED = 0.35, 0.40, 0.55  # fractions of the day: one in three fails; all; none
COOLDOWN = 300.0  # retry.cooldownSeconds as a day knows it (the default), scaled like the rest
MARK = {"type": "ephemeral"}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"]
WORDS += ["tests", "run", "and", "files", "change"]
SHARE_TARGET, SPEND_TARGET = 0.90, 0.10


@dataclass(frozen=True)
class Step:
    """One request of a session: the wait before it (seconds of the day, after the previous
    answer), the assistant turn that answered the previous request, and the user turn it adds."""

    wait: float
    answer: dict[str, Any] | None
    user: dict[str, Any]


@dataclass(frozen=True)
class Session:
    name: str
    start: float
    system: list[dict[str, Any]]
    steps: list[Step]


@dataclass
class Tally:
    """What one day's answers said, as its client read them."""

    requests: int = 0
    failed: int = 0
    input: int = 0
    read: int = 0
    written_5m: int = 0
    written_1h: int = 0
    output: int = 0
    by_endpoint: dict[str, int] = field(default_factory=dict)

    @property
    def prompt(self) -> int:
        return self.input + self.read + self.written_5m + self.written_1h

    def spend(self) -> float:
        price = shipped().price("primary", "anthropic", MODEL)
        assert price is not None
        tokens = Tokens(self.input, self.output, self.read, self.written_5m, self.written_1h)
        return price.rates.cost(tokens)


@dataclass(frozen=True)
class Variant:
    name: str
    outage: bool
    routing: dict[str, Any]
    cooldown: bool = True


VARIANTS = (
    Variant("no outage", False, {"cacheAware": True}),
    Variant("cache-aware", True, {"cacheAware": True}),
    Variant("today's routing", True, {"cacheAware": False}),
    Variant("per-request failover", True, {"cacheAware": False}, cooldown=False),
)


def filler(rng: random.Random, tokens: int, tag: str) -> str:
    """About `tokens` tokens of text (four characters each), unique to `tag`."""
    words = [tag]
    size = len(tag)
    while size < tokens * CHARS_PER_TOKEN:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)


def tools() -> list[dict[str, Any]]:
    """Claude Code's tools, the same in every session: 8,000 tokens."""
    rng = random.Random(0)
    names = ["Bash", "Read", "Edit", "Write", "Glob", "Grep", "Task", "WebFetch"]
    return [
        {
            "name": name,
            "description": filler(rng, 1000, name),
            "input_schema": {"type": "object", "properties": {"arg": {"type": "string"}}},
        }
        for name in names
    ]


def day(sessions: int, requests: int, seed: int = 7) -> list[Session]:
    """The day's sessions: starts spread over the day, each a row of prompts and tool loops."""
    played = []
    for s in range(sessions):
        rng = random.Random(seed * 1000 + s)
        system = [{"type": "text", "text": filler(rng, 12_000, f"project {s % 5}"), "cache_control": MARK}]
        steps: list[Step] = []
        loop = 0  # tool calls left in the current loop
        answer: dict[str, Any] | None = None
        for i in range(requests):
            tag = f"session {s} step {i}"
            if loop:
                loop -= 1
                # the model's time to answer, then the tool's
                wait = rng.uniform(5, 25) + rng.uniform(1, 10)
                result = {"type": "tool_result", "tool_use_id": f"toolu_{s}_{i}"}
                result["content"] = filler(rng, rng.randint(500, 4000), tag)
                user = {"role": "user", "content": [result]}
            else:
                loop = rng.randint(2, 6)
                wait = rng.uniform(20, 150) if i else 0.0  # the user reads, thinks, types
                if i and rng.random() < 0.08:
                    wait = rng.uniform(8, 30) * 60  # a meeting, lunch: the cache goes cold
                user = {"role": "user", "content": [{"type": "text", "text": filler(rng, 100, tag)}]}
            steps.append(Step(wait, answer, user))
            reply: list[dict[str, Any]] = [{"type": "text", "text": filler(rng, 200, tag + " answer")}]
            if loop:
                reply.append({"type": "tool_use", "id": f"toolu_{s}_{i + 1}", "name": "Read", "input": {}})
            answer = {"role": "assistant", "content": reply}
        length = sum(step.wait for step in steps) + 30 * requests
        played.append(Session(f"bench-{s:02d}", rng.uniform(0, max(0.0, DAY - length)), system, steps))
    return played


def body(session: Session, shared_tools: list[dict[str, Any]], messages: list[dict[str, Any]]) -> bytes:
    """The request of the session so far: its breakpoint on the last message, as Claude Code puts it."""
    last = dict(messages[-1])
    last["content"] = [*last["content"][:-1], {**last["content"][-1], "cache_control": MARK}]
    payload = {
        "model": MODEL,
        "max_tokens": 32_000,
        "stream": True,
        "tools": shared_tools,
        "system": session.system,
        "messages": [*messages[:-1], last],
    }
    return json.dumps(payload).encode()


def usage_of(stream: bytes) -> sse.Usage:
    """The input side of a stream's usage, as the proxy reads it (its `message_start`)."""
    for event in sse.EventReader().feed(stream):
        if event.name == "message_start" and (usage := sse.usage_of(event)) is not None:
            return usage
    raise BenchError("a stream without message_start")


async def play(session: Session, url: str, speed: float, tally: Tally, client: aiohttp.ClientSession) -> None:
    """One session: each request after its wait, sent once (a failure is counted, and the
    session goes on as Claude Code would, after its own retries)."""
    shared_tools = tools()
    messages: list[dict[str, Any]] = []
    await asyncio.sleep(session.start / speed)
    headers = {**HEADERS, "x-claude-code-session-id": session.name}
    for step in session.steps:
        await asyncio.sleep(step.wait / speed)
        if step.answer is not None:
            messages.append(step.answer)
            tally.output += len(json.dumps(step.answer["content"])) // CHARS_PER_TOKEN
        messages.append(step.user)
        tally.requests += 1
        async with client.post(
            f"{url}/v1/messages", data=body(session, shared_tools, messages), headers=headers
        ) as r:
            data = await r.read()
            if r.status != 200:
                tally.failed += 1
                continue
            endpoint = r.headers.get("x-fake-name", "?")
        usage = usage_of(data)
        tally.by_endpoint[endpoint] = tally.by_endpoint.get(endpoint, 0) + 1
        tally.input += usage.input
        tally.read += usage.cache_read
        tally.written_5m += usage.cache_write_5m
        tally.written_1h += usage.cache_write_1h


async def outage(primary: FakeAnthropic, speed: float) -> None:
    """The primary's bad hour: one request in three refused, then all, then none."""
    overloaded = Behavior("status", 529)
    await asyncio.sleep(DAY * DEGRADED / speed)
    primary.script = [overloaded, Behavior(), Behavior()] * 10_000
    await asyncio.sleep(DAY * (DOWN - DEGRADED) / speed)
    primary.behavior, primary.script = overloaded, []
    await asyncio.sleep(DAY * (RECOVERED - DOWN) / speed)
    primary.behavior = Behavior()


def config(fakes: dict[str, FakeAnthropic], variant: Variant, speed: float) -> str:
    routing = {**variant.routing, "cacheTtlScale": round(1 / speed, 6)}
    cooldown = COOLDOWN / speed if variant.cooldown else 0
    lines = ["endpoints:"]
    lines += [f'  - {{name: {name}, baseUrl: "{fake.url}", apiKey: ""}}' for name, fake in fakes.items()]
    lines.append(f"retry: {{cooldownSeconds: {cooldown:.6f}}}")
    lines.append(f"routing: {json.dumps(routing)}")
    lines.append("logging: {level: warn}")
    return "\n".join(lines) + "\n"


async def run_day(url: str, sessions: list[Session], speed: float, primary: FakeAnthropic | None) -> Tally:
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as client:
        background = [asyncio.ensure_future(outage(primary, speed))] if primary is not None else []
        try:
            await asyncio.gather(*(play(s, url, speed, tally, client) for s in sessions))
        finally:
            for task in background:
                task.cancel()
    return tally


def routed_by_rules(url: str) -> int:
    """How many requests the cache rules sent elsewhere than the strategy would have."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ccf_cache_routed_total{")
        )
    )


def run(variant: Variant, sessions: list[Session], speed: float, workdir: Path) -> tuple[Tally, int]:
    fakes = {name: FakeAnthropic(name).start_in_thread() for name in ("primary", "backup")}
    services = Services(workdir)
    try:
        for fake in fakes.values():
            fake.keep = 0  # bodies of hundreds of KB: count them, do not keep them
            fake.prompt_cache = PromptCache(ttl_scale=1 / speed)
        proxy = start_configured(
            services, variant.name.replace(" ", "-").replace("'", ""), config(fakes, variant, speed)
        )
        primary = fakes["primary"] if variant.outage else None
        tally = asyncio.run(run_day(proxy.url, sessions, speed, primary))
        return tally, routed_by_rules(proxy.url)
    finally:
        services.stop()
        for fake in fakes.values():
            fake.stop_thread()


def table(results: dict[str, tuple[Tally, int]], sessions: int) -> str:
    yardstick = results["no outage"][0].spend()
    rows = [
        f"{'':32}" + "".join(f"{name:>22}" for name in results),
        "-" * (32 + 22 * len(results)),
    ]

    def row(label: str, cell: Any) -> None:
        rows.append(f"{label:32}" + "".join(f"{cell(t, n):>22}" for t, n in results.values()))

    row("requests answered / failed", lambda t, n: f"{t.requests - t.failed} / {t.failed}")
    row(
        "  on primary / backup",
        lambda t, n: f"{t.by_endpoint.get('primary', 0)} / {t.by_endpoint.get('backup', 0)}",
    )
    row("  kept by the cache rules", lambda t, n: f"{n}")
    row("input tokens read from cache", lambda t, n: f"{t.read / t.prompt:.1%}")
    row(
        "cache writes per session",
        lambda t, n: f"{(t.written_5m + t.written_1h) / sessions / 1000:.0f}k tokens",
    )
    row("spend", lambda t, n: f"${t.spend():.2f}")
    row("  vs the day without outage", lambda t, n: f"{t.spend() / yardstick - 1:+.1%}")
    return "\n".join(rows)


def verdict(results: dict[str, tuple[Tally, int]]) -> list[str]:
    aware, yardstick = results["cache-aware"][0], results["no outage"][0]
    share, extra = aware.read / aware.prompt, aware.spend() / yardstick.spend() - 1
    return [
        f"cache-aware, share read from cache: {share:.1%} (target >= {SHARE_TARGET:.0%}): "
        + ("pass" if share >= SHARE_TARGET else "FAIL"),
        f"cache-aware, spend over the day without outage: {extra:+.1%} (target within {SPEND_TARGET:.0%}): "
        + ("pass" if abs(extra) <= SPEND_TARGET else "FAIL"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 6 sessions of 20 requests")
    parser.add_argument("--speed", type=float, default=480.0, help="how much faster than real time (480)")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    sessions = day(6, 20) if args.quick else day(20, 40)
    print(
        f"{len(sessions)} sessions x {len(sessions[0].steps)} requests over {DAY / 3600:g} h, "
        f"{args.speed:g} x real time ({DAY / args.speed:.0f} s a day); primary: 1 in 3 refused from "
        f"{DEGRADED:.0%} of the day, all from {DOWN:.0%}, well from {RECOVERED:.0%}",
        flush=True,
    )
    results: dict[str, tuple[Tally, int]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ccf-bench-cache-") as tmp:
        (Path(tmp) / "home").mkdir()
        for variant in VARIANTS:
            print(f"  {variant.name} ...", flush=True)
            results[variant.name] = run(variant, sessions, args.speed, Path(tmp))
    print()
    print(table(results, len(sessions)))
    print()
    print("\n".join(verdict(results)))
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        document = {name: {**asdict(t), "spend": t.spend(), "kept": n} for name, (t, n) in results.items()}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0
