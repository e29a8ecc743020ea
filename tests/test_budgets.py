"""Budgets (cost/budgets.py): in-process with a clock of the test's, then through real proxies.

Each window resets at its own boundary in the configured time zone; a client over a cap is
refused with Claude Code's gateway's 429 `billing_error` before anything goes upstream,
while another client passes; 80 % of a cap is a header and one log line; and a fleet (two
proxies on one redis-server) or a proxy's workers (their hub) add up to one spend.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from addon.config import Budget, ClientKey, ConfigError, Endpoint, RedisSettings, Server
from addon.cost.budgets import PROXY, REMAINING_HEADER, Budgets
from addon.cost.prices import Tokens, shipped
from addon.fakes.anthropic import Behavior
from addon.fleet.shared_state import shared_state
from addon.logs import EventLog
from addon.state.endpoints import EndpointPool

from .conftest import endpoints_config, wait_until
from .test_config import load
from .test_dashboard import CHROMIUM, CHROMIUM_ARGS, needs_chromium
from .test_hub import served

UTC = ZoneInfo("UTC")
NEW_YORK = ZoneInfo("America/New_York")


def at(text: str, zone: ZoneInfo = UTC) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budgets(clock: Clock, zone: str = "UTC", proxy: Budget | None = None, **clients: Budget) -> Budgets:
    keys = tuple(ClientKey(name, f"key-{name}", budget) for name, budget in clients.items())
    server = Server(access_keys=keys, budget=proxy or Budget(), budget_timezone=zone)
    kept = Budgets(EventLog(), clock)
    kept.configure(server)
    return kept


def events(kept: Budgets) -> list[tuple[str, dict[str, Any]]]:
    said: list[tuple[str, dict[str, Any]]] = []
    kept.events.listeners.append(lambda event, fields: said.append((event, dict(fields))))
    return said


# -- the config -------------------------------------------------------------------------------


def test_budgets_are_read_from_the_keys_and_the_server(tmp_path: Path):
    text = (
        "server:\n  budgetTimezone: America/New_York\n  budget: {monthly: 3000}\n  accessKeys:\n"
        "    - {name: alice, key: k-alice-1234, budget: {daily: 20, weekly: 80}}\n"
        "    - {name: bob, key: k-bob-1234}\n"
    )
    server = load(tmp_path, text).server
    assert server.budget == Budget(monthly=3000.0) and server.budget_timezone == "America/New_York"
    alice, bob = server.access_keys
    assert (alice.name, alice.budget.limits()) == ("alice", {"daily": 20.0, "weekly": 80.0})
    assert (bob.name, bob.key, bob.budget.limits()) == ("bob", "k-bob-1234", {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: {budget: {daily: -5}}", r"server\.budget\.daily: expected a number >= 0, got integer -5"),
        ("server: {budget: {hourly: 5}}", r"server\.budget\.hourly: unknown key; expected one of daily"),
        (
            "server: {accessKeys: [{name: a, key: k-a, budget: {weekly: lots}}]}",
            r"server\.accessKeys\[0\]\.budget\.weekly: expected a number >= 0, got string 'lots'",
        ),
        (
            "server: {accessKeys: [{name: a, key: k-a, budget: {hourly: 1}}]}",
            r"server\.accessKeys\[0\]\.budget\.hourly: expected one of the keys daily, weekly, monthly",
        ),
        (
            "server: {accessKeys: [{name: a, key: k-a, budget: 5}]}",
            r"server\.accessKeys\[0\]\.budget: expected a mapping, got integer",
        ),
        (
            "server: {budgetTimezone: Mars/Olympus}",
            r"server\.budgetTimezone: expected an IANA time zone name",
        ),
    ],
)
def test_a_bad_budget_names_the_file_and_the_key(tmp_path: Path, text: str, message: str):
    with pytest.raises(ConfigError, match=r"config\.yaml: " + message):
        load(tmp_path, text + "\n")


def test_a_reload_keeps_the_spend_and_takes_the_new_caps():
    clock = Clock(at("2026-12-07T10:00"))
    kept = budgets(clock, alice=Budget(daily=10.0))
    kept.spend("alice", 10.0)
    assert kept.refusal("alice") is not None
    kept.configure(Server(access_keys=(ClientKey("alice", "key-alice", Budget(daily=15.0)),)))
    assert kept.refusal("alice") is None
    assert kept.document()["clients"]["alice"]["daily"]["spentUsd"] == 10.0
    kept.configure(Server(access_keys=(ClientKey("alice", "key-alice"),)))
    assert kept.document()["clients"] == {}  # no cap, nothing to show


# -- windows ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "spent_at", "last_moment", "resets"),
    [
        ("daily", "2026-12-07T10:00", "2026-12-07T23:59:59", "2026-12-08T00:00"),
        # a Wednesday; the ISO week ends on Sunday night
        ("weekly", "2026-12-09T10:00", "2026-12-13T23:59:59", "2026-12-14T00:00"),
        ("monthly", "2026-12-31T10:00", "2026-12-31T23:59:59", "2027-01-01T00:00"),
        ("monthly", "2028-02-03T10:00", "2028-02-29T23:59:59", "2028-03-01T00:00"),
    ],
)
def test_each_window_refuses_until_its_end_and_not_after(window, spent_at, last_moment, resets):
    clock = Clock(at(spent_at))
    kept = budgets(clock, alice=Budget(**{window: 10.0}))
    kept.spend("alice", 6.0)
    assert kept.refusal("alice") is None
    kept.spend("alice", 4.0)
    over = kept.refusal("alice")
    assert over is not None and (over.scope, over.window, over.spent, over.limit) == ("alice", window, 10, 10)
    assert over.resets_at == datetime.fromisoformat(resets).replace(tzinfo=UTC).isoformat()
    clock.now = at(last_moment)
    assert kept.refusal("alice") is not None
    clock.now = at(resets)
    assert kept.refusal("alice") is None
    assert kept.document()["clients"]["alice"][window]["spentUsd"] == 0


def test_a_daily_reset_leaves_the_week_and_the_month_counting():
    clock = Clock(at("2026-12-07T22:00"))  # a Monday
    kept = budgets(clock, alice=Budget(daily=5.0, weekly=12.0, monthly=100.0))
    kept.spend("alice", 5.0)
    assert kept.refusal("alice").window == "daily"
    clock.now = at("2026-12-08T09:00")
    assert kept.refusal("alice") is None
    kept.spend("alice", 5.0)
    assert kept.refusal("alice").window == "daily"
    clock.now = at("2026-12-09T09:00")
    kept.spend("alice", 2.0)
    over = kept.refusal("alice")  # the week's 12 are spent: refused until Monday, not midnight
    assert (over.window, over.spent, over.resets_at) == ("weekly", 12.0, "2026-12-14T00:00:00+00:00")
    assert kept.document()["clients"]["alice"]["monthly"]["spentUsd"] == 12.0


def test_a_budget_in_new_york_resets_at_new_york_midnight():
    clock = Clock(at("2026-12-07T23:30", NEW_YORK))  # 04:30 on the 8th in UTC
    kept = budgets(clock, "America/New_York", alice=Budget(daily=1.0))
    kept.spend("alice", 1.0)
    over = kept.refusal("alice")
    assert over.resets_at == "2026-12-08T00:00:00-05:00"
    assert "It resets at 2026-12-08T00:00:00-05:00." in over.message
    clock.now = at("2026-12-08T04:59:59")  # UTC's day turned hours ago; New York's has not
    assert kept.refusal("alice") is not None
    clock.now = at("2026-12-08T05:00")
    assert kept.refusal("alice") is None
    # in UTC the same spend would have been forgiven at UTC's midnight, 19:00 in New York
    utc = budgets(Clock(at("2026-12-07T23:30", NEW_YORK)), alice=Budget(daily=1.0))
    utc.spend("alice", 1.0)
    assert utc.refusal("alice").resets_at == "2026-12-09T00:00:00+00:00"


def test_a_week_in_new_york_starts_on_monday_at_its_midnight_across_a_clock_change():
    clock = Clock(at("2026-11-01T12:00", NEW_YORK))  # a Sunday: the clocks went back at 2:00
    kept = budgets(clock, "America/New_York", alice=Budget(weekly=1.0))
    kept.spend("alice", 1.0)
    assert kept.refusal("alice").resets_at == "2026-11-02T00:00:00-05:00"
    clock.now = at("2026-11-02T00:00", NEW_YORK)
    assert kept.refusal("alice") is None


# -- who is refused, and with what ---------------------------------------------------------------


def test_the_refusal_is_claude_codes_billing_error_and_names_budget_spend_limit_and_reset():
    kept = budgets(Clock(at("2026-12-07T10:00")), alice=Budget(daily=20.0))
    kept.spend("alice", 20.13)
    assert kept.refusal("alice", "POST", "/v1/messages?beta=true") is not None
    assert kept.refusal("alice", "POST", "/v1/messages/batches") is not None
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/messages/count_tokens"), ("HEAD", "/")]:
        assert kept.refusal("alice", method, path) is None  # costs nothing: passes
    failure = kept.refusal("alice").failure()
    assert failure.status == 429
    assert dict(failure.headers) == {b"content-type": b"application/json", b"x-should-retry": b"false"}
    assert json.loads(failure.body) == {
        "type": "error",
        "error": {
            "type": "billing_error",
            "message": "Client alice's daily budget is spent: $20.13 of $20.00. "
            "It resets at 2026-12-08T00:00:00+00:00.",
        },
    }


def test_one_clients_spend_leaves_another_alone_and_the_proxys_cap_stops_everyone():
    clock = Clock(at("2026-12-07T10:00"))
    kept = budgets(clock, proxy=Budget(monthly=50.0), alice=Budget(daily=10.0), bob=Budget(daily=10.0))
    kept.spend("alice", 10.0)
    assert kept.refusal("alice").scope == "alice"
    assert kept.refusal("bob") is None and kept.refusal("carol") is None
    kept.spend("carol", 40.0)  # a client without a cap of its own
    for client in ("alice", "bob", "carol"):
        over = kept.refusal(client)
        assert over.scope == "alice" if client == "alice" else over.scope == PROXY
    assert kept.refusal("bob").message == (
        "The proxy's monthly budget is spent: $50.00 of $50.00. It resets at 2027-01-01T00:00:00+00:00."
    )


def test_over_several_caps_the_one_that_holds_longest_is_named():
    kept = budgets(Clock(at("2026-12-07T10:00")), alice=Budget(daily=1.0, monthly=1.0))
    kept.spend("alice", 1.0)
    assert kept.refusal("alice").window == "monthly"


def test_a_cap_of_zero_refuses_from_the_start():
    kept = budgets(Clock(at("2026-12-07T10:00")), alice=Budget(daily=0.0))
    assert kept.refusal("alice").spent == 0


# -- the warning -------------------------------------------------------------------------------


def test_eighty_percent_is_one_log_line_per_window_crossing_and_a_header_of_what_is_left():
    clock = Clock(at("2026-12-07T10:00"))
    kept = budgets(clock, alice=Budget(daily=10.0, monthly=100.0))
    said = events(kept)
    kept.spend("alice", 7.9)
    assert kept.headers("alice") == () and said == []
    kept.spend("alice", 0.1)
    assert kept.headers("alice") == ((REMAINING_HEADER, b"2.0000"),)
    assert kept.headers("bob") == ()
    kept.spend("alice", 1.0)
    assert [name for name, _ in said] == ["budget_warning"]  # once, however much more is spent
    assert said[0][1] == {
        "client": "alice",
        "window": "daily",
        "spent_usd": 8.0,
        "limit_usd": 10.0,
        "resets_at": "2026-12-08T00:00:00+00:00",
    }
    kept.spend("alice", 1.0)
    assert [name for name, _ in said] == ["budget_warning", "budget_spent"]
    assert kept.headers("alice") == ((REMAINING_HEADER, b"0.0000"),)
    clock.now = at("2026-12-08T10:00")
    assert kept.headers("alice") == ()  # a new day: nothing to warn of
    kept.spend("alice", 8.0)
    assert [name for name, _ in said] == ["budget_warning", "budget_spent", "budget_warning"]
    assert said[-1][1]["window"] == "daily"


def test_the_header_gives_the_tightest_budget_the_clients_or_the_proxys():
    kept = budgets(Clock(at("2026-12-07T10:00")), proxy=Budget(daily=20.0), alice=Budget(daily=100.0))
    kept.spend("alice", 17.0)
    assert kept.headers("alice") == ((REMAINING_HEADER, b"3.0000"),)
    assert kept.headers("bob") == ((REMAINING_HEADER, b"3.0000"),)


def test_used_ratios_are_what_the_gauge_shows():
    kept = budgets(Clock(at("2026-12-07T10:00")), proxy=Budget(weekly=40.0), alice=Budget(daily=10.0))
    kept.spend("alice", 9.0)
    assert sorted(kept.used()) == [("*", "weekly", 0.225), ("alice", "daily", 0.9)]


# -- shared: the workers' hub ------------------------------------------------------------------


def test_two_workers_add_up_to_one_spend_through_the_hub(tmp_path: Path):
    """The code a fleet runs (RedisState, Budgets.sync), between two workers, over the hub."""

    async def run() -> None:
        hub, url = await served(tmp_path)
        clock = Clock(at("2026-12-07T10:00"))
        workers = [budgets(clock, alice=Budget(daily=10.0)) for _ in range(2)]
        states = [
            shared_state("memory", RedisSettings(), EventLog(), 1.0, workers_store=url) for _ in workers
        ]
        endpoints = (Endpoint(name="primary", base_url="http://127.0.0.1:9"),)
        for state, kept in zip(states, workers, strict=True):
            await state.start(EndpointPool.build(endpoints), dict)
            await asyncio.wait_for(state.connected.wait(), 5)
            kept.store = state
        workers[0].spend("alice", 6.0)
        workers[1].spend("alice", 4.0)
        for kept in workers:
            await kept.sync()
        await workers[0].sync()  # the first one now reads the second's addition
        assert [kept.refusal("alice").spent for kept in workers] == [10.0, 10.0]
        # a worker that starts again finds the spend in the store
        again = budgets(clock, alice=Budget(daily=10.0))
        again.store = states[0]
        await again.sync()
        assert again.refusal("alice") is not None
        key = b"ccf:spend:alice:daily:2026-12-07"
        assert hub.values[key] == b"10"
        assert hub.expiry[key] - hub.clock() == 14 * 3600 + 3600  # to midnight, and an hour more
        for state in states:
            await state.stop()
        await hub.stop()

    asyncio.run(run())


def test_additions_wait_while_the_store_is_away_and_go_when_it_is_back():
    class Away:
        def __init__(self) -> None:
            self.up, self.added = False, {}

        async def add_spend(self, adds, keys):
            if not self.up:
                return None
            for key, (amount, _) in adds.items():
                self.added[key] = self.added.get(key, 0.0) + amount
            return [self.added.get(key) for key in keys]

    async def run() -> None:
        kept = budgets(Clock(at("2026-12-07T10:00")), alice=Budget(daily=10.0))
        store = kept.store = Away()
        kept.spend("alice", 3.0)
        await kept.sync()
        kept.spend("alice", 2.0)
        assert kept.refusal("alice") is None and store.added == {}
        store.up = True
        await kept.sync()
        assert store.added["spend:alice:daily:2026-12-07"] == 5.0
        assert store.added["spend:*:monthly:2026-12-01"] == 5.0

    asyncio.run(run())


# -- through real proxies ----------------------------------------------------------------------

ALICE_KEY = "ccf-client-key-ALICE-000000000001"
BOB_KEY = "ccf-client-key-BOB-0000000000002"
WORDS = " ".join(["word"] * 1000)  # 1000 output tokens at the fake: $0.025 on claude-opus-4-8
# 10 input and 1000 output tokens of claude-opus-4-8, at the shipped prices
COST = shipped().cost("primary", "anthropic", "claude-opus-4-8", Tokens(input=10, output=1000))
OPUS = {"model": "claude-opus-4-8", "max_tokens": 2000, "messages": [{"role": "user", "content": "hi"}]}


def keyed_config(fake, alice: dict[str, float] | None = None, proxy: dict[str, float] | None = None, **more):
    alice_key: dict[str, Any] = {"name": "alice", "key": ALICE_KEY}
    if alice:
        alice_key["budget"] = alice
    server: dict[str, Any] = {"accessKeys": [alice_key, {"name": "bob", "key": BOB_KEY}]}
    if proxy:
        server["budget"] = proxy
    return endpoints_config(fake, server=server, **more)


def ask(proxy, key: str, stream: bool = False) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/messages", json=dict(OPUS, stream=stream), headers={"x-api-key": key}, timeout=30
    )


def test_the_cost_the_tests_count_on():
    assert pytest.approx(10 * 5 / 1e6 + 1000 * 25 / 1e6) == COST


def test_a_client_over_budget_is_refused_before_the_endpoint_and_another_is_served(proxy_factory, primary):
    primary.behavior = Behavior(text=WORDS)
    proxy = proxy_factory(keyed_config(primary, alice={"daily": 0.05}))
    assert ask(proxy, ALICE_KEY).status_code == 200
    assert ask(proxy, ALICE_KEY, stream=True).status_code == 200  # 2 x $0.02505: over $0.05
    wait_until(lambda: proxy.health()["budgets"]["over"] == ["alice"], 5, "alice's spend to count")
    sent = primary.request_count
    refused = ask(proxy, ALICE_KEY)
    assert refused.status_code == 429
    assert refused.headers["x-should-retry"] == "false"
    assert refused.headers["content-type"] == "application/json"
    tomorrow = datetime.now(UTC).date().toordinal() + 1
    midnight = datetime.fromordinal(tomorrow).replace(tzinfo=UTC).isoformat()
    assert refused.json() == {
        "type": "error",
        "error": {
            "type": "billing_error",
            "message": f"Client alice's daily budget is spent: $0.05 of $0.05. It resets at {midnight}.",
        },
    }
    assert ask(proxy, ALICE_KEY, stream=True).status_code == 429  # a stream too, before it begins
    assert primary.request_count == sent  # nothing went upstream
    # what costs nothing still passes: Claude Code starts, and is told why at its first prompt
    free = {"x-api-key": ALICE_KEY}
    assert httpx.get(proxy.url + "/v1/models", headers=free, timeout=10).status_code == 200
    count = httpx.post(proxy.url + "/v1/messages/count_tokens", json=OPUS, headers=free, timeout=10)
    assert count.status_code == 200
    assert ask(proxy, BOB_KEY).status_code == 200
    assert proxy.metric("ccf_requests_total", outcome="over_budget", client="alice") == 2
    assert proxy.metric("ccf_budget_refusals_total", client="alice", window="daily") == 2
    assert proxy.metric("ccf_budget_used_ratio", client="alice", window="daily") == pytest.approx(
        2 * COST / 0.05
    )
    alice = proxy.health()["budgets"]["clients"]["alice"]["daily"]
    assert alice["limitUsd"] == 0.05 and alice["spentUsd"] == pytest.approx(2 * COST)
    assert alice["resetsAt"] == midnight


def test_the_proxys_budget_stops_every_client(proxy_factory, primary):
    primary.behavior = Behavior(text=WORDS)
    proxy = proxy_factory(keyed_config(primary, proxy={"monthly": 0.04}))
    assert ask(proxy, ALICE_KEY).status_code == 200
    assert ask(proxy, BOB_KEY).status_code == 200
    wait_until(lambda: proxy.health()["budgets"]["over"] == [PROXY], 5, "the proxy's spend to count")
    for key in (ALICE_KEY, BOB_KEY):
        refused = ask(proxy, key)
        assert refused.status_code == 429 and refused.headers["x-should-retry"] == "false"
        assert refused.json()["error"]["message"].startswith(
            "The proxy's monthly budget is spent: $0.05 of $0.04."
        )
    assert proxy.metric("ccf_budget_refusals_total", client="*", window="monthly") == 2
    assert proxy.metric("ccf_requests_total", outcome="over_budget", client="bob") == 1


def test_eighty_percent_of_a_budget_is_a_header_on_the_clients_answers_and_one_log_line(
    proxy_factory, primary
):
    primary.behavior = Behavior(text=WORDS)
    proxy = proxy_factory(keyed_config(primary, alice={"daily": 0.03}))  # one answer: 83.5 %
    first = ask(proxy, ALICE_KEY)
    assert "x-ccf-budget-remaining" not in first.headers
    wait_until(lambda: "budget_warning" in proxy.logs(), 5, "the warning")
    left = f"{0.03 - COST:.4f}"
    assert ask(proxy, ALICE_KEY, stream=True).headers["x-ccf-budget-remaining"] == left
    assert "x-ccf-budget-remaining" not in ask(proxy, BOB_KEY).headers
    wait_until(lambda: proxy.health()["budgets"]["over"] == ["alice"], 5, "alice's second answer")
    lines = [line for line in proxy.logs().splitlines() if '"budget_warning"' in line]
    warnings = [json.loads(line[line.index("{") :]) for line in lines]
    assert len(warnings) == 1
    assert warnings[0]["client"] == "alice" and warnings[0]["window"] == "daily"
    assert warnings[0]["limit_usd"] == 0.03 and warnings[0]["spent_usd"] == pytest.approx(COST, abs=1e-4)


def test_a_proxys_workers_add_up_to_one_spend_through_their_hub(proxy_factory, primary):
    from .test_workers import every_worker

    primary.behavior = Behavior(text=WORDS)
    config = keyed_config(primary, alice={"daily": 0.05})
    config["server"]["workers"] = 2
    proxy = proxy_factory(config, ccf=True)
    every_worker(proxy)  # both serve
    assert ask(proxy, ALICE_KEY).status_code == 200 and ask(proxy, ALICE_KEY).status_code == 200
    every_worker(proxy, seen_as=lambda health: health["budgets"]["over"] == ["alice"])
    assert [ask(proxy, ALICE_KEY).status_code for _ in range(4)] == [429] * 4  # whichever answers
    assert ask(proxy, BOB_KEY).status_code == 200


def test_a_proxy_alone_finds_its_spend_again_after_a_restart(proxy_factory, primary, tmp_path: Path):
    primary.behavior = Behavior(text=WORDS)
    state = {"usageFile": str(tmp_path / "usage.db")}  # the usage store both processes keep
    config = keyed_config(primary, alice={"daily": 0.05}, state=state)
    first = proxy_factory(config)
    assert ask(first, ALICE_KEY).status_code == 200 and ask(first, ALICE_KEY).status_code == 200
    wait_until(lambda: first.health()["budgets"]["over"] == ["alice"], 5, "alice's spend to count")
    first.stop()  # its usage store writes what is left
    second = proxy_factory(config)
    assert ask(second, ALICE_KEY).status_code == 429
    assert second.health()["budgets"]["clients"]["alice"]["daily"]["spentUsd"] == pytest.approx(2 * COST)


@needs_chromium
def test_the_status_page_shows_each_budget_and_what_is_spent_of_it(proxy_factory, primary):
    primary.behavior = Behavior(text=WORDS)
    proxy = proxy_factory(keyed_config(primary, alice={"daily": 0.05}, proxy={"monthly": 10}))
    assert ask(proxy, ALICE_KEY).status_code == 200
    wait_until(lambda: proxy.health()["budgets"]["proxy"]["monthly"]["spentUsd"] > 0, 5, "the spend")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{proxy.url}/?key={ALICE_KEY}")
            alice = page.locator('#budgets [data-budget="alice"]')
            expect(alice).to_contain_text("daily: $0.03 of $0.05 (50 %), resets in")
            expect(alice.get_by_role("meter")).to_have_attribute("aria-valuenow", "50")
            whole = page.locator('#budgets [data-budget="The whole proxy"]')
            expect(whole).to_contain_text("monthly: $0.03 of $10.00 (0 %)")
            expect(page.locator('#budgets [data-budget="bob"]')).to_have_count(0)  # no budget of its own
        finally:
            browser.close()


def test_a_fleet_on_one_redis_adds_up_to_one_spend(proxy_factory, redis_server, primary):
    from .test_fleet import fleet_config

    primary.behavior = Behavior(text=WORDS)
    config = fleet_config(redis_server, primary)
    config["server"] = keyed_config(primary, alice={"daily": 0.05})["server"]
    a, b = (proxy_factory(config, ccf=True) for _ in range(2))
    for proxy in (a, b):
        wait_until(lambda p=proxy: p.health()["state"] == "redis", 10, "the instance to reach Redis")
    assert ask(a, ALICE_KEY).status_code == 200
    assert ask(b, ALICE_KEY, stream=True).status_code == 200  # each alone is at half the cap
    for proxy in (a, b):
        wait_until(lambda p=proxy: p.health()["budgets"]["over"] == ["alice"], 5, "the fleet's spend")
    assert ask(a, ALICE_KEY).status_code == 429 and ask(b, ALICE_KEY).status_code == 429
    assert ask(b, BOB_KEY).status_code == 200
    # a third instance, started now, finds the spend in Redis before its first request
    c = proxy_factory(config, ccf=True)
    wait_until(lambda: c.health()["state"] == "redis", 10, "the third instance to reach Redis")
    assert ask(c, ALICE_KEY).status_code == 429
