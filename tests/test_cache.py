"""Where each session's prompt cache is warm (addon/state/cache.py): the tracker in-process, and
a session through the proxy between two fakes that play the prompt cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic

from addon.fakes.anthropic import Behavior, FakeAnthropic
from addon.fakes.caching import PromptCache
from addon.request import ClientRequest
from addon.sse import Usage
from addon.state.cache import TTL_1H, TTL_5M, CacheTracker, Prompt

from .conftest import Proxy, endpoints_config, wait_until

SESSION = "0b6a4f8e-3c2d-4d39-9f3e-5b1a2c3d4e5f"
SYSTEM = [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def text(words: str, ttl: str | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": words}
    if ttl is not None:
        block["cache_control"] = {"type": "ephemeral", **({"ttl": ttl} if ttl != "5m" else {})}
    return block


def request(
    messages: list[dict[str, Any]], session: str | None = SESSION, system: Any = SYSTEM
) -> ClientRequest:
    payload = {"model": "claude-opus-4-8", "system": system, "messages": messages, "stream": True}
    headers = [("content-type", "application/json")]
    if session:
        headers.append(("x-claude-code-session-id", session))
    return ClientRequest.parse("POST", "/v1/messages", headers, json.dumps(payload).encode())


def prompt(messages: list[dict[str, Any]], session: str | None = SESSION, **kw: Any) -> Prompt:
    found = Prompt.of(request(messages, session, **kw), session)
    assert found is not None
    return found


def user(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def tool_result(ttl: str | None = "5m") -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "42 lines"}
    if ttl:
        block["cache_control"] = {"type": "ephemeral"}
    return user(block)


def used(read: int = 0, written: int = 0, uncached: int = 10) -> list[Usage]:
    return [Usage(input=uncached, output=1, cache_read=read, cache_creation=written)]


def test_a_breakpoint_keeps_the_cache_five_minutes_and_one_with_ttl_1h_an_hour() -> None:
    assert prompt([user(text("hi", "5m"))]).ttl == TTL_5M
    assert prompt([user(text("hi", "1h"))]).ttl == TTL_1H
    # the last breakpoint is the one that covers the whole prefix
    system = [{**SYSTEM[0], "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    assert prompt([user(text("hi", "5m"))], system=system).ttl == TTL_5M
    assert prompt([user(text("hi"))], system=system).ttl == TTL_1H


def test_a_read_or_a_write_renews_the_cache_and_an_answer_with_neither_forgets_it() -> None:
    clock = Clock()
    tracker = CacheTracker(clock=clock)
    turn = prompt([user(text("hi", "5m"))])
    held = tracker.served(turn, "a", used(written=2000))
    assert held.warm_on("a", clock.now + TTL_5M - 1) and not held.warm_on("a", clock.now + TTL_5M)
    clock.now += 200
    tracker.served(turn, "a", used(read=2000, written=50))
    assert held.warm_on("a", clock.now + TTL_5M - 1)  # renewed from this answer on
    assert (held.tokens, held.uncached) == (2050, 10)
    tracker.served(turn, "a", used())  # neither read nor written: not cached there
    assert not held.warm_on("a", clock.now)


def test_cache_ttl_scale_multiplies_the_lifetimes() -> None:
    clock = Clock()
    tracker = CacheTracker(scale=0.01, clock=clock)
    held = tracker.served(prompt([user(text("hi", "1h"))]), "a", used(written=2000))
    assert held.warm_on("a", clock.now + 35) and not held.warm_on("a", clock.now + 36)


def test_the_cache_stays_warm_where_the_session_was_while_it_moves_on() -> None:
    clock = Clock()
    tracker = CacheTracker(clock=clock)
    turn = prompt([user(text("hi", "5m"))])
    tracker.served(turn, "a", used(written=2000))
    clock.now += 60
    held = tracker.served(turn, "b", used(written=2100))
    assert held.endpoint == "b"
    assert held.warm_on("a", clock.now) and held.warm_on("b", clock.now)
    clock.now += TTL_5M - 60
    assert not held.warm_on("a", clock.now) and held.warm_on("b", clock.now)


def test_an_answer_whose_usage_is_not_read_counts_as_warm_when_the_request_marked_a_breakpoint() -> None:
    tracker = CacheTracker(clock=Clock())
    marked = tracker.served(prompt([user(text("hi", "5m"))]), "a", [])
    assert marked.warm_on("a", 1000.0) and marked.tokens > 0
    other = prompt([user(text("hi"))], session="another", system="plain")
    assert not tracker.served(other, "a", []).warm_on("a", 1000.0)


def test_a_request_answering_tool_calls_is_in_a_tool_loop() -> None:
    assert prompt(
        [user(text("read it", "5m")), {"role": "assistant", "content": "ok"}, tool_result()]
    ).tool_loop
    assert not prompt([user(text("read it", "5m"))]).tool_loop
    mixed = user({"type": "tool_result", "tool_use_id": "t", "content": "x"}, text("and then?", "5m"))
    assert prompt([mixed]).tool_loop


def test_without_a_session_id_the_next_turn_finds_the_conversation_by_its_earlier_messages() -> None:
    tracker = CacheTracker(clock=Clock())
    first = [user(text("fix the bug", "5m"))]
    held = tracker.served(prompt(first, session=None), "a", used(written=2000))
    # Claude Code moves the breakpoint to the newest message: the older one loses its marker
    second = [user(text("fix the bug")), {"role": "assistant", "content": "done"}, user(text("thanks", "5m"))]
    turn = prompt(second, session=None)
    assert tracker.find(turn) is held
    assert tracker.find(prompt([user(text("another task", "5m"))], session=None)) is None


def test_a_request_with_neither_a_session_nor_a_breakpoint_is_not_tracked() -> None:
    assert Prompt.of(request([user(text("hi"))], session=None, system="plain"), None) is None


def test_the_tracker_keeps_the_most_recent_sessions_only() -> None:
    tracker = CacheTracker(limit=2, clock=Clock())
    for session in ("s1", "s2", "s3"):
        tracker.served(prompt([user(text("hi", "5m"))], session=session), "a", used(written=10))
    assert len(tracker) == 2
    assert tracker.find(prompt([user(text("hi"))], session="s1")) is None


# -- through the proxy ------------------------------------------------------------------------


def claude_code_turn(turns: int) -> dict[str, Any]:
    """Turn `turns` of a Claude Code session: the context so far, its breakpoint on the last message."""
    messages: list[dict[str, Any]] = []
    for i in range(turns):
        if i:
            messages.append(
                {"role": "assistant", "content": [{"type": "text", "text": f"answer {i} " * 200}]}
            )
        messages.append({"role": "user", "content": [{"type": "text", "text": f"question {i} " * 200}]})
    messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    system = [{"type": "text", "text": "You are Claude Code. " * 500, "cache_control": {"type": "ephemeral"}}]
    return {"model": "claude-opus-4-8", "max_tokens": 100, "system": system, "messages": messages}


def test_a_session_moved_by_a_failover_stays_where_its_cache_is_warm_when_the_primary_recovers(
    proxy_factory: Callable[..., Proxy], primary: FakeAnthropic, backup: FakeAnthropic
) -> None:
    primary.prompt_cache, backup.prompt_cache = PromptCache(), PromptCache()
    proxy = proxy_factory(endpoints_config(primary, backup, retry={"cooldownSeconds": 1}))
    session = {"x-claude-code-session-id": SESSION}
    client = anthropic.Anthropic(
        base_url=proxy.url, api_key="sk-ant-client", max_retries=0, default_headers=session
    )

    def turn(n: int) -> anthropic.types.Usage:
        with client.messages.stream(**claude_code_turn(n)) as stream:
            return stream.get_final_message().usage

    turn(1)
    assert turn(2).cache_read_input_tokens > 0
    primary.behavior = Behavior("status", 529)
    moved = turn(3)  # to the backup: the whole context written there
    assert moved.cache_read_input_tokens == 0 and moved.cache_creation_input_tokens > 0
    primary.behavior = Behavior()
    wait_until(lambda: proxy.endpoint("primary")["status"] == "healthy", 10, "the primary's cooldown to end")
    kept = [turn(4), turn(5)]
    assert all(u.cache_read_input_tokens > moved.cache_creation_input_tokens // 2 for u in kept)
    assert [len(primary.requests), len(backup.requests)] == [3, 3]  # the primary saw turns 1, 2 and 3's try
    # the backup wrote the context once, then only what each turn added
    assert backup.prompt_cache.writes == moved.cache_creation_input_tokens + sum(
        u.cache_creation_input_tokens for u in kept
    )
    client.messages.create(**claude_code_turn(1), extra_headers={"x-claude-code-session-id": "another"})
    assert len(primary.requests) == 4  # a new session takes the primary again
    assert proxy.metric("ccf_cache_routed_total", endpoint="backup", rule="stay_warm") == 2
    page = {e["name"]: e for e in json.loads(proxy.get("/dashboard/summary")[1])["endpoints"]}
    # the primary still holds the session's turns 1 and 2 for a few minutes, and "another"
    assert page["backup"]["warmSessions"] == 1 and page["primary"]["warmSessions"] == 2
    assert page["backup"]["cacheReadShare"] > 0.5
