"""The fake's prompt cache (addon/fakes/caching.py): in-process, and through the anthropic SDK."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic

from addon.fakes.anthropic import FakeAnthropic
from addon.fakes.caching import TTL_5M, PromptCache

MARK = {"type": "ephemeral"}
SYSTEM = [{"type": "text", "text": "You are Claude Code. " * 200, "cache_control": MARK}]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def conversation(turns: int, ttl: str | None = None) -> dict[str, Any]:
    """A conversation of `turns` user turns, its breakpoint on the last, as Claude Code sends it."""
    messages: list[dict[str, Any]] = []
    for i in range(turns):
        if i:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {i} " * 50}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": f"question {i} " * 50}]})
    marker = {**MARK, "ttl": ttl} if ttl else MARK
    messages[-1]["content"][-1]["cache_control"] = marker
    return {"model": "claude-opus-4-8", "max_tokens": 10, "system": SYSTEM, "messages": messages}


def test_the_first_turn_writes_and_the_next_reads_it_and_writes_what_is_new() -> None:
    cache = PromptCache(clock=Clock())
    first = cache.use(conversation(1))
    assert first["cache_read_input_tokens"] == 0 and first["cache_creation_input_tokens"] > 1000
    second = cache.use(conversation(2))
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert 0 < second["cache_creation_input_tokens"] < first["cache_creation_input_tokens"]
    assert second["cache_creation"] == {
        "ephemeral_5m_input_tokens": second["cache_creation_input_tokens"],
        "ephemeral_1h_input_tokens": 0,
    }
    assert second["input_tokens"] == 0  # nothing after the breakpoint
    assert (cache.reads, cache.writes) == (
        second["cache_read_input_tokens"],
        first["cache_creation_input_tokens"] + second["cache_creation_input_tokens"],
    )


def test_the_cache_expires_after_its_ttl_times_the_scale_and_a_read_renews_it() -> None:
    clock = Clock()
    cache = PromptCache(ttl_scale=0.1, clock=clock)
    cache.use(conversation(1))
    clock.now += TTL_5M * 0.1 - 1
    assert cache.use(conversation(2))["cache_read_input_tokens"] > 0
    clock.now += TTL_5M * 0.1 - 1  # past the first write's lifetime, within the read's
    assert cache.use(conversation(3))["cache_read_input_tokens"] > 0
    clock.now += TTL_5M * 0.1
    cold = cache.use(conversation(4))
    assert cold["cache_read_input_tokens"] == 0 and cold["cache_creation_input_tokens"] > 0


def test_a_one_hour_breakpoint_writes_one_hour_tokens() -> None:
    usage = PromptCache(clock=Clock()).use(conversation(1, ttl="1h"))
    assert usage["cache_creation"]["ephemeral_5m_input_tokens"] > 0  # the system's own 5m breakpoint
    assert usage["cache_creation"]["ephemeral_1h_input_tokens"] > 0


def test_a_prefix_further_back_than_the_lookback_is_not_found() -> None:
    cache = PromptCache(clock=Clock())
    cache.use(conversation(1))
    assert cache.use(conversation(10))["cache_read_input_tokens"] > 0  # 18 blocks back: found
    cache.clear()
    cache.use(conversation(1))
    system = PromptCache(clock=Clock()).use({**conversation(1), "messages": []})
    # 22 blocks back: only the system prompt, at its own breakpoint, is found
    assert cache.use(conversation(12))["cache_read_input_tokens"] == system["cache_creation_input_tokens"]


def test_answers_report_the_cache_in_usage_streamed_and_whole(fakes: Callable[[str], FakeAnthropic]) -> None:
    fake = fakes("caching")
    fake.prompt_cache = PromptCache()
    client = anthropic.Anthropic(base_url=fake.url, api_key="sk-ant-test", max_retries=0)
    whole = client.messages.create(**conversation(1))
    with client.messages.stream(**conversation(2)) as stream:
        streamed = stream.get_final_message()
    assert whole.usage.cache_read_input_tokens == 0 and whole.usage.cache_creation_input_tokens
    assert streamed.usage.cache_read_input_tokens == whole.usage.cache_creation_input_tokens
    assert streamed.usage.cache_creation is not None
    assert (
        streamed.usage.cache_creation.ephemeral_5m_input_tokens == streamed.usage.cache_creation_input_tokens
    )
    fake.prompt_cache = None  # the fake as it always was: ten input tokens, no cache
    plain = client.messages.create(**conversation(2))
    assert (plain.usage.input_tokens, plain.usage.cache_read_input_tokens) == (10, 0)
