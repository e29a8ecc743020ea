"""The failover rules in-process: what the client gets when everything fails, and how long a
request may wait. The same rules are shown through a real proxy in test_failover.py and
test_credentials.py."""

from __future__ import annotations

import json
import time

from addon.config import Endpoint, Retry
from addon.request import AttemptFailed, ErrorResponse
from addon.state.endpoints import EndpointState
from addon.state.policy import Plan, cooldown, worth_waiting
from addon.upstream.failover import final_failure


def rate_limited(endpoint: str, seconds: float) -> AttemptFailed:
    headers = ((b"retry-after", str(seconds).encode()), (b"x-from", endpoint.encode()))
    response = ErrorResponse(429, headers, b'{"type":"error"}')
    return AttemptFailed(endpoint, "status", "HTTP 429", status=429, retry_after=seconds, response=response)


def refused(endpoint: str, status: int) -> AttemptFailed:
    return AttemptFailed(endpoint, "credentials", f"HTTP {status}: refused", status=status, final=True)


def message(failure) -> str:
    return str(json.loads(failure.body)["error"]["message"])


def test_the_answer_is_the_soonest_429_and_never_a_refusal_of_the_proxys_credentials():
    soonest = final_failure([rate_limited("a", 30), refused("b", 401), rate_limited("c", 20)])
    assert soonest.status == 429 and dict(soonest.headers)[b"x-from"] == b"c"
    every = final_failure([refused("a", 401), refused("b", 403)])
    assert every.status == 502 and json.loads(every.body)["error"]["type"] == "api_error"
    assert message(every).startswith("Every endpoint refused the proxy's credentials: a: HTTP 401")
    assert "`ccf status`" in message(every)
    unreachable = AttemptFailed("b", "refused", "connection refused")
    mixed = final_failure([refused("a", 401), unreachable])
    assert (
        mixed.status == 502 and "a: HTTP 401" in message(mixed) and "b: connection refused" in message(mixed)
    )
    assert "`ccf status`" in message(mixed)


def test_refused_credentials_cool_for_their_own_time_and_missing_ones_as_any_failure():
    retry = Retry(cooldown_seconds=30, credentials_cooldown_seconds=3600)
    assert cooldown(retry, refused("a", 403), time.time()) == 3600
    assert cooldown(retry, AttemptFailed("a", "credentials", "no AWS credentials found"), time.time()) == 30
    assert cooldown(retry, rate_limited("a", 90), time.time()) == 90


def test_a_request_waits_only_for_an_endpoint_expected_back_within_max_wait():
    now = time.time()
    a, b = (EndpointState(Endpoint(name=n, base_url=f"http://{n}")) for n in "ab")
    a.failed("status", 60)  # the cooldowns: its 1 s Retry-After is shorter than cooldownSeconds
    b.failed("status", 30)
    plan = Plan([a, b], 3, claim=None)  # type: ignore[arg-type]
    plan.mark_failed(a, rate_limited("a", 1), now)
    plan.mark_failed(b, AttemptFailed("b", "status", "HTTP 503", status=503), now)
    assert plan.fallback() is a  # it said 1 s; b is expected back when its cooldown ends, in 30 s
    assert 0.9 < plan.until_back(now + 0.05) <= 1
    retry = Retry(max_wait_seconds=5)
    assert worth_waiting(retry, waited=0, delay=0.05, until_back=1)
    assert not worth_waiting(retry, waited=4.5, delay=0.05, until_back=1)  # 5.5 s in all
    assert not worth_waiting(retry, waited=0, delay=0.05, until_back=30)
