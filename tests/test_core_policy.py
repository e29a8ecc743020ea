"""The pieces the failover loop is built from, in-process: how long to wait (Retry-After,
backoff, maxWaitSeconds), how long an endpoint cools and how it comes back (the single probe),
the retry budget, which endpoint a request tries next (`Plan`), and routing's order.

The loop itself is driven in test_core_failover.py; the same rules are shown through a real
proxy by test_failover.py, test_credentials.py and test_faults.py.
"""

from __future__ import annotations

import asyncio
import email.utils

import pytest

from addon.config import Endpoint, Retry, Routing
from addon.request import AttemptFailed, Kind, retry_after_seconds
from addon.state.endpoints import COOLING, EXHAUSTED, HEALTHY, PROBING, EndpointPool, EndpointState
from addon.state.limits import Reading, Window
from addon.state.policy import Plan, RetryBudget, backoff_delay, cooldown, worth_waiting
from addon.state.routing import Router

NOW = 1_800_000_000.0
SESSION = "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def pool(clock: Clock, *names: str) -> EndpointPool:
    return EndpointPool.build([Endpoint(name=n, base_url=f"https://{n}.example") for n in names], clock=clock)


def failed(endpoint: str, retry_after: float | None = None) -> AttemptFailed:
    return AttemptFailed(endpoint, Kind.STATUS, "HTTP 503", status=503, retry_after=retry_after)


def refused(endpoint: str, status: int = 401, retry_after: float | None = None) -> AttemptFailed:
    detail = f"HTTP {status}: the endpoint refused the proxy's credentials"
    return AttemptFailed(
        endpoint, Kind.CREDENTIALS, detail, status=status, retry_after=retry_after, final=True
    )


async def anyone(state: EndpointState) -> bool:
    return True


async def no_one(state: EndpointState) -> bool:
    return False


def fresh(plan: Plan) -> str | None:
    state = asyncio.run(plan.fresh())
    return state.name if state else None


# -- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("30", 30.0), ("1.5", 1.5), ("0", 0.0)])
def test_a_retry_after_in_seconds_is_read_as_seconds(value: str, seconds: float) -> None:
    assert retry_after_seconds({"retry-after": value}, NOW) == seconds


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "30"}, NOW) == 1.5


def test_a_retry_after_http_date_counts_from_now() -> None:
    date = email.utils.formatdate(NOW + 120, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, NOW) == 120


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": email.utils.formatdate(NOW - 60, usegmt=True)},
        {"retry-after": "-5"},
        {"retry-after-ms": "-100"},
    ],
    ids=["date-past", "negative-seconds", "negative-ms"],
)
def test_a_retry_after_in_the_past_means_now(headers: dict[str, str]) -> None:
    assert retry_after_seconds(headers, NOW) == 0


@pytest.mark.parametrize("headers", [{}, {"retry-after": "soon"}, {"retry-after": ""}])
def test_an_unreadable_or_absent_retry_after_is_none(headers: dict[str, str]) -> None:
    assert retry_after_seconds(headers, NOW) is None


def test_an_unreadable_retry_after_ms_falls_back_to_retry_after() -> None:
    assert retry_after_seconds({"retry-after-ms": "soon", "retry-after": "7"}, NOW) == 7


# -- backoff and maxWaitSeconds ---------------------------------------------------------------


@pytest.mark.parametrize("waits", [0, 1, 2, 3])
def test_the_backoff_is_jittered_over_the_upper_half_of_its_exponential_step(waits: int) -> None:
    retry = Retry(initial_delay=1.0, backoff_factor=2.0, max_delay=60.0)
    step = 2.0**waits
    delays = [backoff_delay(retry, waits, None) for _ in range(200)]
    assert all(step / 2 <= d <= step for d in delays)
    assert max(delays) - min(delays) > step / 8  # jittered, not fixed


def test_the_backoff_is_capped_at_max_delay() -> None:
    retry = Retry(initial_delay=1.0, backoff_factor=2.0, max_delay=60.0)
    assert all(30 <= backoff_delay(retry, 10, None) <= 60 for _ in range(100))


def test_a_retry_after_is_a_floor_that_max_delay_does_not_cap() -> None:
    assert backoff_delay(Retry(initial_delay=0.01), 0, 0.2) == 0.2
    assert backoff_delay(Retry(max_delay=60.0), 0, 120) == 120  # to the caller: give up


def test_a_wait_is_worth_it_while_the_total_stays_within_max_wait() -> None:
    retry = Retry(max_wait_seconds=5)
    assert worth_waiting(retry, waited=3, delay=2, until_back=0)
    assert not worth_waiting(retry, waited=3, delay=2.01, until_back=0)


def test_an_endpoint_expected_back_later_than_the_backoff_is_what_counts() -> None:
    retry = Retry(max_wait_seconds=5)
    assert worth_waiting(retry, waited=0, delay=0.1, until_back=4.9)
    assert not worth_waiting(retry, waited=0, delay=0.1, until_back=6)  # a 429 with retry-after: 6


# -- cooldown ---------------------------------------------------------------------------------


def test_an_endpoint_cools_for_cooldown_seconds_or_its_longer_retry_after() -> None:
    retry = Retry(cooldown_seconds=300)
    assert cooldown(retry, failed("a"), NOW) == 300
    assert cooldown(retry, failed("a", retry_after=30), NOW) == 300
    assert cooldown(retry, failed("a", retry_after=900), NOW) == 900


def test_a_reopening_time_the_endpoint_named_sets_the_cooldown_even_when_shorter() -> None:
    window = AttemptFailed("a", Kind.WINDOW_REJECTED, "usage window rejected", cool_until=NOW + 10)
    assert cooldown(Retry(cooldown_seconds=300), window, NOW) == 10


def test_refused_credentials_cool_for_the_credentials_cooldown_whatever_retry_after_says() -> None:
    retry = Retry(cooldown_seconds=30, credentials_cooldown_seconds=3600)
    assert cooldown(retry, refused("a", 403, retry_after=10), NOW) == 3600
    assert cooldown(retry, refused("a", 401, retry_after=7200), NOW) == 3600


def test_only_a_request_an_endpoint_cannot_express_leaves_it_uncooled() -> None:
    untranslatable = AttemptFailed("a", Kind.UNTRANSLATABLE, "no OpenAI form", status=400, final=True)
    assert not untranslatable.cools
    assert all(AttemptFailed("a", kind, "failed").cools for kind in Kind if kind != Kind.UNTRANSLATABLE)


def test_only_a_refusal_with_a_status_is_a_refusal_of_the_proxys_credentials() -> None:
    assert refused("a").refused_credentials
    assert not AttemptFailed(
        "a", Kind.CREDENTIALS, "no AWS credentials found", final=True
    ).refused_credentials
    assert not failed("a").refused_credentials


# -- an endpoint's state: cooling, the single probe -------------------------------------------


def test_a_failed_endpoint_is_not_taken_until_its_cooldown_ends() -> None:
    clock = Clock()
    (state,) = pool(clock, "a")
    state.failed("status", 30, 503)
    assert state.status == COOLING and not state.take()
    clock.now += 29.9
    assert not state.take()
    clock.now += 0.1
    assert state.take() and state.status == PROBING


def test_after_a_cooldown_only_the_first_request_probes() -> None:
    clock = Clock()
    (state,) = pool(clock, "a")
    state.failed("status", 30)
    clock.now += 30
    assert [state.take() for _ in range(4)] == [True, False, False, False]


def test_a_probe_that_succeeds_opens_the_endpoint_to_every_request() -> None:
    clock = Clock()
    (state,) = pool(clock, "a")
    state.failed("status", 30)
    clock.now += 30
    state.take()
    state.succeeded()
    assert state.status == HEALTHY and state.consecutive_failures == 0
    assert [state.take() for _ in range(3)] == [True, True, True]
    assert not state.probe_in_flight


def test_a_probe_that_fails_starts_the_cooldown_again_from_then() -> None:
    clock = Clock()
    (state,) = pool(clock, "a")
    state.failed("status", 30)
    clock.now += 30
    state.take()
    state.failed("reset", 30)
    assert not state.probe_in_flight and state.cooling_until == clock.now + 30
    assert (state.cooling_reason, state.consecutive_failures) == ("reset", 2)


def test_a_probe_that_ends_without_a_verdict_lets_another_request_probe() -> None:
    clock = Clock()
    (state,) = pool(clock, "a")
    state.failed("status", 30)
    clock.now += 30
    state.take()
    state.released()  # the client went away
    assert state.take() and state.probe_in_flight


def test_a_cooldown_is_never_shortened_by_a_shorter_one() -> None:
    clock = Clock()
    (state,) = pool(clock, "a")
    state.failed("status", 600, 429)
    state.failed("reset", 30)
    assert state.cooling_until == NOW + 600 and state.cooling_reason == "status"


def test_a_reload_ends_a_credentials_cooldown_and_no_other() -> None:
    clock = Clock()
    endpoints = pool(clock, "a", "b")
    a, b = endpoints.states
    a.failed("credentials", 3600, 401)
    b.failed("status", 300, 503)
    assert endpoints.forgive("credentials") == [a.endpoint]
    assert a.status == HEALTHY and b.status == COOLING
    assert endpoints.forgive("credentials") == []


def test_a_reload_keeps_the_state_of_each_endpoint_it_keeps() -> None:
    clock = Clock()
    before = pool(clock, "a", "b")
    before.states[0].failed("status", 300)
    kept = Endpoint(name="a", base_url="https://a.example")
    changed = Endpoint(name="b", base_url="https://b2.example")
    disabled = Endpoint(name="c", base_url="https://c.example", enabled=False)
    after = EndpointPool.build([kept, changed, disabled], before, clock)
    assert [s.name for s in after] == ["a", "b"]
    assert after.states[0] is before.states[0] and after.states[0].status == COOLING
    assert after.states[1] is not before.states[1]


def test_an_exhausted_rate_limit_window_keeps_the_endpoint_closed_through_a_success() -> None:
    clock = Clock()
    (state,) = pool(clock, "a")
    state.observe(Reading({"requests": Window(1.0, "exhausted", NOW + 60)}))
    assert state.closed_until() == NOW + 60 and state.limit_state(None) == EXHAUSTED
    state.cool(NOW + 60, "ratelimit_requests_exhausted")
    state.succeeded()
    assert state.status == COOLING
    clock.now += 60
    assert state.closed_until() is None and state.status == HEALTHY


# -- the retry budget -------------------------------------------------------------------------


def test_the_budget_allows_its_minimum_retries_with_no_traffic() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=2)
    assert [budget.try_spend(NOW) for _ in range(3)] == [True, True, False]


def test_the_budget_grows_with_client_requests() -> None:
    budget = RetryBudget(ratio=0.5, min_retries=0)
    assert not budget.try_spend(NOW)
    for _ in range(4):
        budget.record_request(NOW)
    assert [budget.try_spend(NOW) for _ in range(3)] == [True, True, False]


def test_retries_leave_the_budget_after_its_window() -> None:
    budget = RetryBudget(ratio=0, min_retries=1, window=10)
    assert budget.try_spend(NOW)
    assert not budget.try_spend(NOW + 9.9)
    assert budget.try_spend(NOW + 10.1)
    assert budget.counts(NOW + 10.1) == (0, 1)


def test_requests_leave_the_budget_after_its_window() -> None:
    budget = RetryBudget(ratio=1, min_retries=0, window=10)
    budget.record_request(NOW)
    assert budget.counts(NOW + 20) == (0, 0)
    assert not budget.try_spend(NOW + 20)


def test_the_fleets_counts_join_the_budget() -> None:
    spent_elsewhere = RetryBudget(ratio=0, min_retries=3, elsewhere=lambda: (0, 3))
    assert not spent_elsewhere.try_spend(NOW)
    traffic_elsewhere = RetryBudget(ratio=0.5, min_retries=0, elsewhere=lambda: (4, 0))
    assert [traffic_elsewhere.try_spend(NOW) for _ in range(3)] == [True, True, False]


# -- which endpoint next ----------------------------------------------------------------------


def test_a_request_goes_to_the_first_usable_endpoint_in_order() -> None:
    clock = Clock()
    endpoints = pool(clock, "a", "b", "c")
    endpoints.states[0].failed("status", 300)
    plan = Plan(endpoints.states, 3, anyone)
    assert fresh(plan) == "b"


def test_an_endpoint_that_failed_this_request_is_not_fresh_again() -> None:
    clock = Clock()
    a, b = pool(clock, "a", "b").states
    plan = Plan([a, b], 3, anyone)
    plan.mark_failed(a, failed("a"), NOW)
    assert fresh(plan) == "b" and plan.has_fresh()
    plan.mark_failed(b, failed("b"), NOW)
    assert fresh(plan) is None and not plan.has_fresh()


def test_an_endpoint_another_instance_probes_is_passed_over() -> None:
    clock = Clock()
    a, b = pool(clock, "a", "b").states
    a.failed("status", 30)
    clock.now += 30
    assert fresh(Plan([a, b], 3, no_one)) == "b"


def test_going_back_picks_the_endpoint_expected_back_first() -> None:
    clock = Clock()
    a, b = pool(clock, "a", "b").states
    a.failed("status", 300)
    b.failed("status", 5)  # no retry-after: back when its cooldown ends
    plan = Plan([a, b], 3, anyone)
    plan.mark_failed(a, failed("a", retry_after=20), NOW)
    plan.mark_failed(b, failed("b"), NOW)
    assert plan.fallback() is b and plan.until_back(NOW) == 5 and plan.asked_to_wait(NOW) is None
    plan.mark_failed(a, failed("a", retry_after=1), NOW)
    assert plan.fallback() is a and plan.until_back(NOW) == 1 and plan.asked_to_wait(NOW) == 1


def test_a_usage_window_reset_is_when_the_endpoint_is_back() -> None:
    clock = Clock()
    (a,) = pool(clock, "a").states
    plan = Plan([a], 3, anyone)
    plan.mark_failed(a, AttemptFailed("a", Kind.WINDOW_REJECTED, "rejected", cool_until=NOW + 50), NOW)
    assert plan.until_back(NOW) == 50


def test_of_endpoints_back_at_the_same_time_one_that_has_not_failed_goes_first() -> None:
    clock = Clock()
    a, b = pool(clock, "a", "b").states
    plan = Plan([a, b], 3, anyone)
    plan.mark_failed(a, failed("a"), NOW)
    assert plan.fallback() is b


def test_each_endpoint_takes_at_most_max_retries_attempts() -> None:
    clock = Clock()
    a, b = pool(clock, "a", "b").states
    plan = Plan([a, b], 2, anyone)
    for state in (a, b, a):
        plan.record(state)
    assert plan.fallback() is b and not plan.exhausted()
    plan.record(b)
    assert plan.fallback() is None and plan.exhausted() and plan.until_back(NOW) == 0


def test_a_final_failure_keeps_the_request_from_going_back() -> None:
    clock = Clock()
    a, b = pool(clock, "a", "b").states
    plan = Plan([a, b], 3, anyone)
    plan.mark_failed(a, refused("a"), NOW)
    plan.mark_failed(b, failed("b", retry_after=60), NOW)
    assert plan.fallback() is b
    plan.mark_failed(b, refused("b"), NOW)
    assert plan.exhausted()


# -- routing ----------------------------------------------------------------------------------


def test_a_session_pinned_to_an_endpoint_under_probe_goes_where_the_strategy_says() -> None:
    clock = Clock()
    endpoints = pool(clock, "a", "b")
    b = endpoints.states[1]
    router = Router(Routing(strategy="least-utilized"))
    router.served(SESSION, b)
    assert [s.name for s in router.order(endpoints, SESSION)] == ["b", "a"]
    b.failed("status", 30)
    clock.now += 30
    b.take()  # another request probes it
    assert [s.name for s in router.order(endpoints, SESSION)] == ["a", "b"]


def test_serving_a_session_is_news_only_when_it_is_new_or_moves() -> None:
    clock = Clock()
    a, b = pool(clock, "a", "b").states
    router = Router(Routing(strategy="least-utilized"))
    assert [router.served(SESSION, a), router.served(SESSION, a), router.served(SESSION, b)] == [
        True,
        False,
        True,
    ]
    assert not router.served(None, a)


def test_under_priority_no_session_is_remembered() -> None:
    clock = Clock()
    (a,) = pool(clock, "a").states
    router = Router(Routing(strategy="priority", session_affinity=True))
    assert not router.affinity and not router.served(SESSION, a) and len(router.sessions) == 0
