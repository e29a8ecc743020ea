"""Routing decisions (addon/routing.py) and the endpoint state they read: pure, no proxy."""

from __future__ import annotations

import json
import tracemalloc
import uuid

import pytest

from addon.config import Endpoint, Routing
from addon.cost.prices import PriceTable, shipped
from addon.request import ClientRequest
from addon.sse import Usage
from addon.state.cache import TTL_5M, CacheTracker, Prompt
from addon.state.endpoints import EndpointPool, EndpointState
from addon.state.limits import Reading, Window
from addon.state.routing import Router, SessionMap, session_of

SESSION = "0b6a4f8e-3c2d-4d39-9f3e-5b1a2c3d4e5f"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def request(headers: list[tuple[str, str]] = (), metadata: object = None) -> ClientRequest:  # type: ignore[assignment]
    payload: dict[str, object] = {"model": "m", "messages": []}
    if metadata is not None:
        payload["metadata"] = metadata
    body = json.dumps(payload).encode()
    return ClientRequest.parse("POST", "/v1/messages", [("content-type", "application/json"), *headers], body)


def test_the_session_header_names_the_session() -> None:
    assert session_of(request([("X-Claude-Code-Session-Id", SESSION)])) == SESSION


def test_the_session_in_metadata_user_id_json() -> None:
    user_id = json.dumps({"device_id": "ab" * 32, "account_uuid": "", "session_id": SESSION})
    assert session_of(request(metadata={"user_id": user_id})) == SESSION


def test_the_session_in_the_older_user_id_format() -> None:
    user_id = f"user_{'c' * 64}_account_{uuid.uuid4()}_session_{SESSION}"
    assert session_of(request(metadata={"user_id": user_id})) == SESSION


@pytest.mark.parametrize(
    "metadata", [None, {}, {"user_id": 5}, {"user_id": "{not json"}, {"user_id": "user_abc"}, "text"]
)
def test_no_session_when_none_is_given(metadata: object) -> None:
    assert session_of(request(metadata=metadata)) is None


def test_the_header_wins_over_metadata() -> None:
    user_id = json.dumps({"session_id": "other"})
    assert session_of(request([("x-claude-code-session-id", SESSION)], {"user_id": user_id})) == SESSION


def test_the_session_map_stays_bounded_under_100000_sessions() -> None:
    tracemalloc.start()
    try:
        sessions = SessionMap(limit=10_000)
        for i in range(10_000):
            sessions.put(str(uuid.UUID(int=i)), "a")
        at_bound = tracemalloc.get_traced_memory()[0]
        for i in range(10_000, 110_000):
            sessions.put(str(uuid.UUID(int=i)), "b")
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(sessions) == 10_000
    assert sessions.get(str(uuid.UUID(int=0))) is None  # the oldest went first
    assert sessions.get(str(uuid.UUID(int=109_999))) == "b"
    assert at_bound < 4 * 1024 * 1024  # 10,000 sessions: a few MB at most
    # 100,000 more: flat, give or take the dict's table (unbounded would be about 11 times more)
    assert after < 1.5 * at_bound


def test_the_session_map_forgets_idle_sessions() -> None:
    clock = Clock()
    sessions = SessionMap(max_age=60, clock=clock)
    sessions.put("old", "a")
    clock.now += 30
    sessions.put("recent", "b")
    clock.now += 31
    assert sessions.get("old") is None and sessions.get("recent") == "b"
    assert len(sessions) == 1


def pool(clock: Clock, *names: str) -> EndpointPool:
    return EndpointPool.build([Endpoint(name=n, base_url=f"http://{n}.test") for n in names], clock=clock)


def use(pool: EndpointPool, name: str, utilization: float, clock: Clock, status: str = "allowed") -> None:
    state = next(s for s in pool if s.name == name)
    state.observe(Reading({"5h": Window(utilization, status, clock.now + 3600)}))


def names(states: list) -> list[str]:  # type: ignore[type-arg]
    return [s.name for s in states]


def test_priority_keeps_the_configured_order_whatever_the_windows_say() -> None:
    clock = Clock()
    endpoints = pool(clock, "a", "b")
    use(endpoints, "a", 0.9, clock)
    router = Router(Routing())
    router.served(SESSION, endpoints.states[1])
    assert names(router.order(endpoints, SESSION)) == ["a", "b"]


def test_least_utilized_puts_the_emptiest_first_and_unknown_counts_as_empty() -> None:
    clock = Clock()
    endpoints = pool(clock, "a", "b", "c")
    use(endpoints, "a", 0.5, clock)
    use(endpoints, "b", 0.2, clock)
    router = Router(Routing(strategy="least-utilized"))
    assert names(router.order(endpoints, None)) == ["c", "b", "a"]


def test_least_utilized_ties_keep_the_configured_order() -> None:
    clock = Clock()
    endpoints = pool(clock, "a", "b")
    assert names(Router(Routing(strategy="least-utilized")).order(endpoints, None)) == ["a", "b"]


def test_a_session_stays_where_it_was_served_while_that_endpoint_is_usable() -> None:
    clock = Clock()
    endpoints = pool(clock, "a", "b")
    use(endpoints, "b", 0.6, clock)
    router = Router(Routing(strategy="least-utilized"))
    router.served(SESSION, endpoints.states[1])
    assert names(router.order(endpoints, SESSION)) == ["b", "a"]
    assert names(router.order(endpoints, "another")) == ["a", "b"]
    endpoints.states[1].failed("status", 30)
    assert names(router.order(endpoints, SESSION)) == ["a", "b"]


def test_without_affinity_a_session_goes_where_the_strategy_says() -> None:
    clock = Clock()
    endpoints = pool(clock, "a", "b")
    use(endpoints, "b", 0.6, clock)
    router = Router(Routing(strategy="least-utilized", session_affinity=False))
    router.served(SESSION, endpoints.states[1])
    assert names(router.order(endpoints, SESSION)) == ["a", "b"]
    assert len(router.sessions) == 0


def test_step_aside_sends_a_full_endpoint_to_the_back_until_its_window_resets() -> None:
    clock = Clock()
    endpoints = pool(clock, "a", "b")
    use(endpoints, "a", 0.97, clock)
    router = Router(Routing(step_aside_at=0.95))
    router.served(SESSION, endpoints.states[0])
    assert names(router.order(endpoints, SESSION)) == ["b", "a"]
    clock.now += 3600  # the 5h window reopens
    assert names(router.order(endpoints, SESSION)) == ["a", "b"]


def test_a_refused_window_cools_until_it_reopens_and_survives_a_success() -> None:
    clock = Clock()
    endpoints = pool(clock, "a")
    state = endpoints.states[0]
    use(endpoints, "a", 1.0, clock, status="rejected")
    assert state.rejected_until() == clock.now + 3600
    state.cool(clock.now + 3600, "window_rejected")
    state.succeeded()  # an answer came, but the window still refuses
    assert state.status == "cooling"
    clock.now += 3600
    assert state.rejected_until() is None and state.status == "healthy"


# -- the prompt-cache rules ------------------------------------------------------------------

SUBSCRIPTION = "sk-ant-oat01-" + "x" * 40


def turn(tool_loop: bool = False, session: str = SESSION) -> Prompt:
    """A Claude Code request with its breakpoint on the last message, maybe answering a tool call."""
    block: dict[str, object] = {"type": "text", "text": "and now?"}
    if tool_loop:
        block = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}
    block["cache_control"] = {"type": "ephemeral"}
    payload = {"model": "claude-opus-4-8", "messages": [{"role": "user", "content": [block]}]}
    headers = [("content-type", "application/json"), ("x-claude-code-session-id", session)]
    found = Prompt.of(
        ClientRequest.parse("POST", "/v1/messages", headers, json.dumps(payload).encode()), session
    )
    assert found is not None
    return found


class CacheRouting:
    """A router with the cache rules, its endpoints, and a clock for both."""

    def __init__(self, *endpoints: Endpoint, prices: PriceTable | None = None, **routing: object) -> None:
        self.clock = Clock()
        self.pool = EndpointPool.build(endpoints, clock=self.clock)
        self.decisions: list[tuple[str, str]] = []
        self.router = Router(
            Routing(**routing),  # type: ignore[arg-type]
            caches=CacheTracker(clock=self.clock),
            prices=prices,
            counted=lambda endpoint, rule: self.decisions.append((endpoint, rule)),
        )

    def state(self, name: str) -> EndpointState:
        found = self.pool.get(name)
        assert found is not None
        return found

    def first(self, prompt: Prompt) -> str:
        return self.router.order(self.pool, prompt.key, prompt)[0].name

    def serve(self, prompt: Prompt, name: str, read: int = 100_000, written: int = 0) -> None:
        usage = [Usage(input=2_000, output=1, cache_read=read, cache_creation=written)]
        self.router.served(prompt.key, self.state(name), prompt, usage)

    def fail(self, name: str, seconds: float = 30) -> None:
        self.state(name).failed("status", seconds)


def api_keys(*names: str) -> list[Endpoint]:
    return [Endpoint(name=n, base_url=f"http://{n}.test", api_key=f"sk-ant-api03-{n}") for n in names]


def test_a_session_that_must_leave_goes_where_its_cache_is_warm() -> None:
    r = CacheRouting(*api_keys("a", "b", "c"))
    r.serve(turn(), "c")  # a and b were away earlier: the session's cache is warm on c
    r.serve(turn(), "a")
    r.fail("a")
    assert r.first(turn()) == "c"  # not b, where it would be written again
    assert r.decisions == [("c", "to_warm")]


def test_back_from_a_failover_a_session_stays_where_its_cache_is_warm_at_equal_prices() -> None:
    r = CacheRouting(*api_keys("a", "b"))
    outage(r)
    for _ in range(50):
        assert r.first(turn()) == "b"
        r.serve(turn(), "b")
        r.clock.now += 60
    assert r.first(turn(session="new")) == "a"  # a new session takes the first choice
    r.clock.now += TTL_5M  # a pause: the cache on b is cold, nothing holds the session there
    assert r.first(turn()) == "a"
    assert set(r.decisions) == {("b", "stay_warm")}


def outage(r: CacheRouting, minutes: int = 10) -> None:
    """The session on a until a fails; then on b until a is back and its cache there is cold."""
    r.serve(turn(), "a")
    r.fail("a", minutes * 60)
    r.serve(turn(), "b", read=0, written=100_000)
    for _ in range(minutes):
        r.clock.now += 60
        r.serve(turn(), "b")
    r.clock.now += 1


def test_on_a_costlier_endpoint_a_session_stays_until_the_extra_would_pay_for_a_rebuild() -> None:
    # A rebuild on a costs 100,000 tokens at 6.25 - 0.50 $/M: $0.575. At twenty times a's
    # prices, one turn on b costs $1.14 more than on a: the session goes back at once.
    r = CacheRouting(
        *api_keys("a", "b"), prices=shipped().over({}, {"b": {"*": {"input": 100, "output": 500}}})
    )
    outage(r)
    assert r.first(turn()) == "a"
    # 10% over a's prices, a turn costs $0.006 more: 95 turns before the extra reaches $0.575
    r = CacheRouting(
        *api_keys("a", "b"), prices=shipped().over({}, {"b": {"*": {"input": 5.5, "output": 27.5}}})
    )
    outage(r)
    stayed = 0
    while r.first(turn()) == "b":
        r.serve(turn(), "b")
        stayed += 1
    assert stayed == 95


def test_a_session_goes_back_at_once_when_its_cache_is_still_warm_on_the_first_choice() -> None:
    r = CacheRouting(*api_keys("a", "b"))
    outage(r, minutes=1)  # a short outage: the cache on a outlives it
    assert r.first(turn()) == "a"


def test_a_subscription_primary_gets_the_session_back_at_the_end_of_the_turn() -> None:
    subscription = Endpoint(name="a", base_url="http://a.test", api_key=SUBSCRIPTION)
    r = CacheRouting(subscription, *api_keys("b"))
    r.serve(turn(), "a")
    r.fail("a")
    r.serve(turn(tool_loop=True), "b", read=0, written=100_000)
    r.clock.now += 31  # a is back, in the middle of a tool loop
    assert r.first(turn(tool_loop=True)) == "b"
    r.serve(turn(tool_loop=True), "b")
    assert r.first(turn()) == "a"  # the next prompt of the user: a rebuild there is paid for already
    assert r.decisions == [("b", "tool_loop")]


def test_a_tool_loop_never_moves_unless_its_endpoint_fails() -> None:
    r = CacheRouting(*api_keys("a", "b"))
    r.fail("a")
    r.serve(turn(tool_loop=True), "b")
    r.clock.now += 10 * 60  # a long tool run: the cache is cold and a is back
    assert r.first(turn(tool_loop=True)) == "b"
    r.fail("b")
    assert r.first(turn(tool_loop=True)) == "a"
    assert r.decisions == [("b", "tool_loop")]


@pytest.mark.parametrize("routing", [{"cache_aware": False}, {"session_affinity": False}])
def test_the_cache_rules_are_off_without_cacheaware_or_session_affinity(routing: dict[str, bool]) -> None:
    r = CacheRouting(*api_keys("a", "b"), **routing)
    assert r.router.prompt(ClientRequest.parse("POST", "/v1/messages", [], b"{}"), SESSION) is None
    r.serve(turn(), "b")
    r.serve(turn(tool_loop=True), "b")
    assert r.first(turn(tool_loop=True)) == "a"
