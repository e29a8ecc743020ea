"""What an answer costs and how it is kept, in-process: each price rule, the `pricing:` config,
the usage an answer reports, the usage store and what `ccf usage` makes of it."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from addon.cli import usage as usage_command
from addon.config import ConfigError, Endpoint, load_config
from addon.cost.prices import PriceTable, Tokens, shipped
from addon.cost.spend import OTHER, Spend, spend_of
from addon.cost.store import SqliteBackend, UsageStore, hour_of, read_store
from addon.relay.accounting import spend_fields
from addon.sse import Event, Usage, combined, message_usage, usage_of

API = Endpoint(name="api", base_url="https://api.anthropic.com", api_key="sk-ant-api03-" + "k" * 20)
SUBSCRIPTION = Endpoint(name="max", base_url="https://api.anthropic.com", api_key="sk-ant-oat01-" + "t" * 20)
OPENAI = Endpoint(name="gpt", base_url="https://api.openai.com/v1", provider="openai")
MILLION = 1_000_000


def cost(
    endpoint: Endpoint, model: str | None, tokens: Tokens, prices: PriceTable | None = None
) -> float | None:
    return (prices or shipped()).cost(endpoint.name, endpoint.provider, model, tokens)


def spend(endpoint: Endpoint, model: str | None, usage: Usage, headers=(), prices=None) -> Spend:
    return spend_of("alice", endpoint, model, usage, headers, prices or shipped())


# -- the price rules ---------------------------------------------------------------------------


def test_a_5_minute_cache_write_costs_1_25_times_input_and_a_1_hour_write_twice() -> None:
    # claude-sonnet-4-6: $3 input
    assert cost(API, "claude-sonnet-4-6", Tokens(cache_write_5m=MILLION)) == pytest.approx(3.75)
    assert cost(API, "claude-sonnet-4-6", Tokens(cache_write_1h=MILLION)) == pytest.approx(6.0)


def test_a_cache_read_costs_a_tenth_of_input_unless_the_table_names_its_own() -> None:
    assert cost(API, "claude-sonnet-4-6", Tokens(cache_read=MILLION)) == pytest.approx(0.3)
    assert cost(API, "claude-opus-5-5", Tokens(cache_read=MILLION)) == pytest.approx(0.20)  # not 0.4


def test_a_prompt_over_the_long_context_threshold_pays_the_long_rates_on_all_its_tokens() -> None:
    # claude-sonnet-4-5: $3/$15, and $6/$22.50 once input and cache together pass 200,000
    at_threshold = Tokens(input=150_000, cache_read=50_000, output=1000)
    assert cost(API, "claude-sonnet-4-5", at_threshold) == pytest.approx(
        (150_000 * 3 + 50_000 * 0.3 + 1000 * 15) / MILLION
    )
    over = Tokens(input=150_000, cache_read=50_000, cache_write_1h=1, output=1000)
    expected = (150_000 * 6 + 50_000 * 0.6 + 1 * 12 + 1000 * 22.5) / MILLION
    assert cost(API, "claude-sonnet-4-5", over) == pytest.approx(expected)


def test_a_platforms_model_id_gets_the_price_of_the_claude_model_it_names() -> None:
    tokens = Tokens(input=100_000)  # under the long-context threshold
    for model in (
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "claude-sonnet-4-5@20250929",
        "claude-sonnet-4-5",
    ):
        assert cost(API, model, tokens) == pytest.approx(0.3), model


def test_a_subscription_answer_costs_what_the_api_would_and_is_not_billed_unless_it_is_overage() -> None:
    usage = Usage(input=1000, output=1000)
    on_key, on_subscription = (
        spend(API, "claude-sonnet-4-6", usage),
        spend(SUBSCRIPTION, "claude-sonnet-4-6", usage),
    )
    assert on_key.billed and not on_subscription.billed
    assert on_subscription.cost == on_key.cost == pytest.approx(0.018)
    overage = ((b"anthropic-ratelimit-unified-overage-in-use", b"true"),)
    assert spend(SUBSCRIPTION, "claude-sonnet-4-6", usage, overage).billed


def test_an_openai_format_endpoint_has_only_the_prices_the_config_gives_it() -> None:
    tokens = Tokens(input=MILLION)
    assert cost(OPENAI, "claude-sonnet-4-6", tokens) is None  # a Claude name, yet not Claude's price
    prices = shipped().over(
        {}, {"gpt": {"gpt-4.1": {"input": 2, "output": 8}, "*": {"input": 1, "output": 1}}}
    )
    assert cost(OPENAI, "gpt-4.1", tokens, prices) == pytest.approx(2.0)
    assert cost(OPENAI, "gpt-4.1-mini", tokens, prices) == pytest.approx(1.0)
    assert spend(OPENAI, "gpt-4.1", Usage(input=1), prices=prices).label == "gpt-4.1"
    assert spend(OPENAI, "gpt-4.1-mini", Usage(input=1), prices=prices).label == OTHER  # the `*` price


def test_a_model_without_a_price_is_counted_not_costed() -> None:
    unknown = spend(API, "claude-opus-4-9", Usage(input=7, output=3))  # a newer minor than the table knows
    assert unknown.cost is None and unknown.label == OTHER and unknown.model == "claude-opus-4-9"
    assert (unknown.tokens.input, unknown.tokens.output) == (7, 3)
    assert "cost_usd" not in {k for k, v in spend_fields([unknown]).items() if v is not None}


def test_the_config_adds_a_model_and_overrides_a_shipped_price() -> None:
    prices = shipped().over(
        {"claude-sonnet-4-6": {"input": 1, "output": 2}, "my-model": {"input": 4, "output": 8}}, {}
    )
    assert cost(
        API, "claude-sonnet-4-6", Tokens(input=MILLION, cache_write_5m=MILLION), prices
    ) == pytest.approx(2.25)
    assert cost(API, "my-model", Tokens(output=MILLION), prices) == pytest.approx(8.0)


# -- the `pricing:` section ------------------------------------------------------------------------


def config_file(tmp_path: Path, pricing: str) -> Path:
    path = tmp_path / "config.yaml"
    endpoints = "endpoints:\n  - {name: api, baseUrl: 'https://api.anthropic.com'}\n"
    path.write_text(endpoints + "pricing:\n" + pricing, encoding="utf-8")
    return path


def test_the_pricing_section_reaches_the_price_table(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        "  models:\n    my-model: {input: 1, output: 2, cacheRead: 0.5,"
        " longContext: {above: 10, input: 3, output: 4}}\n"
        "  endpoints:\n    api: {'*': {input: 9, output: 9}}\n",
    )
    pricing = load_config(path, {}).pricing
    prices = shipped().over(dict(pricing.models), {name: dict(models) for name, models in pricing.endpoints})
    assert prices.cost("other", "anthropic", "my-model", Tokens(cache_read=10)) == pytest.approx(5 / MILLION)
    assert prices.cost("other", "anthropic", "my-model", Tokens(input=11)) == pytest.approx(33 / MILLION)
    assert prices.cost("api", "anthropic", "claude-sonnet-4-6", Tokens(input=MILLION)) == pytest.approx(9.0)


@pytest.mark.parametrize(
    ("pricing", "problem"),
    [
        ("  models:\n    m: {input: 1}\n", "pricing.models.m.output: expected a number >= 0, got nothing"),
        ("  models:\n    m: {input: 1, output: -2}\n", "pricing.models.m.output: expected a number >= 0"),
        (
            "  models:\n    m: {input: 1, output: 2, cacheRaed: 1}\n",
            "pricing.models.m.cacheRaed: expected one of",
        ),
        (
            "  models:\n    m: {input: 1, output: 2, longContext: {input: 2, output: 3}}\n",
            "pricing.models.m.longContext.above: expected a number >= 0, got nothing",
        ),
        ("  models: [1, 2]\n", "pricing.models: expected a mapping of model names to prices"),
        ("  endpoints:\n    api: {m: 3}\n", "pricing.endpoints.api.m: expected a mapping {input, output"),
        (
            "  endpoints:\n    nope: {'*': {input: 1, output: 2}}\n",
            "pricing.endpoints.nope: no endpoint has this name",
        ),
    ],
)
def test_bad_prices_name_the_file_and_the_key(tmp_path: Path, pricing: str, problem: str) -> None:
    path = config_file(tmp_path, pricing)
    with pytest.raises(ConfigError) as raised:
        load_config(path, {})
    assert f"{path}: {problem}" in str(raised.value)


# -- the usage an answer reports ---------------------------------------------------------------


def test_cache_writes_are_split_by_lifetime_and_unsplit_writes_count_as_5_minutes() -> None:
    split = Event(
        "message_start",
        '{"type":"message_start","message":{"usage":{"input_tokens":5,"output_tokens":1,'
        '"cache_read_input_tokens":7,"cache_creation_input_tokens":30,'
        '"cache_creation":{"ephemeral_5m_input_tokens":10,"ephemeral_1h_input_tokens":20}}}}',
    )
    delta = Event("message_delta", '{"type":"message_delta","usage":{"output_tokens":42}}')
    assert combined([usage_of(split), usage_of(delta)]) == Usage(5, 42, 7, 30, 10, 20)  # type: ignore[list-item]
    assert message_usage(b'{"usage":{"input_tokens":1,"cache_creation_input_tokens":8}}') == Usage(
        1, 0, 0, 8, 8, 0
    )


# -- the store and `ccf usage` -------------------------------------------------------------------


def test_spend_kept_in_sqlite_is_what_ccf_usage_reads_grouped_or_not(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    answers = [
        spend(API, "claude-sonnet-4-6", Usage(10, 20, 30, 40, 15, 25)),
        spend(API, "claude-sonnet-4-6", Usage(1, 2, 0, 0, 0, 0)),
        spend(SUBSCRIPTION, "claude-opus-4-9", Usage(5, 5, 0, 0, 0, 0)),  # no price
    ]

    async def keep() -> None:
        store = UsageStore()
        await store.start(SqliteBackend(tmp_path / "usage.db"), store.events)
        for answer in answers:
            store.add(answer, at=now)
        store.add(answers[0], at=now - 2 * 86400)  # before the period asked for
        await store.stop()

    asyncio.run(keep())
    path = config_file(tmp_path, "  models: {}\nstate: {usageFile: usage.db}\n")
    where, rows = read_store(load_config(path, {}), {}, usage_command.since("24h", now))
    assert where == str(tmp_path / "usage.db")
    document = usage_command.document(rows, hour_of(now - 86400), None)
    assert document["since"] == hour_of(now - 86400)
    first, second = document["rows"]
    assert first == {
        "client": "alice",
        "endpoint": "api",
        "model": "claude-sonnet-4-6",
        "requests": 2,
        "input_tokens": 11,
        "output_tokens": 22,
        "cache_read_tokens": 30,
        "cache_write_tokens": 40,
        "cost_usd": pytest.approx((11 * 3 + 22 * 15 + 30 * 0.3 + 15 * 3.75 + 25 * 6) / MILLION),
    }
    assert (second["model"], second["requests"], second["cost_usd"]) == ("claude-opus-4-9", 1, None)
    (by_client,) = usage_command.document(rows, 0, "client")["rows"]
    assert (by_client["client"], by_client["endpoint"], by_client["model"], by_client["requests"]) == (
        "alice",
        None,
        None,
        3,
    )
    assert math.isclose(by_client["cost_usd"], first["cost_usd"])
