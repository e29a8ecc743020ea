"""Routing decisions (addon/routing.py) and the endpoint state they read: pure, no proxy."""

from __future__ import annotations

import json
import tracemalloc
import uuid

import pytest

from addon.config import Endpoint, Routing
from addon.request import ClientRequest
from addon.state.endpoints import EndpointPool
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
