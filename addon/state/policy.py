"""What counts as a failed attempt, how long to wait, and which endpoint to try next.

Every failure the proxy can meet becomes one `AttemptFailed` with a `kind` from a fixed
set; the plan, the metrics and the logs all read that one value.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..config import Retry
from ..request import AttemptFailed
from .endpoints import HEALTHY, EndpointState


def cooldown(retry: Retry, failure: AttemptFailed, now: float) -> float:
    """How long an endpoint that failed is skipped.

    Until the time it named (a usage window's reset); for refused credentials, long: no
    answer will come until someone changes them, and a reload clears it; else
    `cooldownSeconds`, or its Retry-After when longer.
    """
    if failure.cool_until is not None:
        return failure.cool_until - now
    if failure.refused_credentials:
        return retry.credentials_cooldown_seconds
    return max(retry.cooldown_seconds, failure.retry_after or 0.0)


def backoff_delay(retry: Retry, waits_so_far: int, retry_after: float | None) -> float:
    """Exponential backoff, jittered over the upper half of the step and capped at `maxDelay`.

    Retry-After is a floor and is not capped: going back earlier than the endpoint asked
    only earns another refusal, so a wait beyond `maxDelay` means "give up" to the caller.
    """
    step = min(retry.max_delay, retry.initial_delay * retry.backoff_factor**waits_so_far)
    delay = step / 2 + random.uniform(0, step / 2)
    return max(delay, retry_after or 0.0)


def worth_waiting(retry: Retry, waited: float, delay: float, until_back: float) -> bool:
    """Whether a request that has waited `waited` seconds should sleep `delay` more, for an
    endpoint expected back in `until_back`.

    Only while the total stays within `maxWaitSeconds`: past that, the client is better off
    with the endpoints' answer at once (a 429 and its `retry-after`), which its own retry
    logic honours, than with a silent wait.
    """
    return waited + max(delay, until_back) <= retry.max_wait_seconds


@dataclass
class RetryBudget:
    """Extra attempts allowed as a share of client requests over a sliding window (Envoy-style).

    Failing over to an endpoint that has not failed yet is free; what the budget bounds
    is going back to endpoints that already failed, which is what multiplies traffic
    in an outage. In a fleet, `elsewhere` adds the other instances' counts (requests,
    retries), so the formula holds for the fleet's traffic.
    """

    ratio: float
    min_retries: int
    window: float = 10.0
    requests: deque[float] = field(default_factory=deque)
    retries: deque[float] = field(default_factory=deque)
    elsewhere: Callable[[], tuple[int, int]] = lambda: (0, 0)

    def record_request(self, now: float) -> None:
        self.requests.append(now)

    def counts(self, now: float) -> tuple[int, int]:
        """This instance's requests and retries within the window."""
        for q in (self.requests, self.retries):
            while q and q[0] < now - self.window:
                q.popleft()
        return len(self.requests), len(self.retries)

    def try_spend(self, now: float) -> bool:
        requests, retries = self.counts(now)
        other_requests, other_retries = self.elsewhere()
        if retries + other_retries >= self.min_retries + self.ratio * (requests + other_requests):
            return False
        self.retries.append(now)
        return True


@dataclass
class Plan:
    """Which endpoint a request tries next.

    An endpoint that is usable and has not failed this request comes first, in the order
    routing gave; then an account that answers only as paid extra usage (an answer beats
    an error). Only when none is left does the request wait (backoff) and go back to the
    endpoint expected back first, up to `maxRetries` attempts each: when it said so in
    this request (Retry-After, a window's reset), else when its cooldown ends.
    """

    order: list[EndpointState]
    max_attempts: int
    claim: Callable[[EndpointState], Awaitable[bool]]
    attempts: dict[str, int] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    excluded: set[str] = field(default_factory=set)  # failed for good: no attempt will do better
    said: dict[str, float] = field(default_factory=dict)  # endpoint -> when it said it is back (Unix time)

    async def fresh(self) -> EndpointState | None:
        for state in self.order:
            if state.name not in self.failed and state.take():
                if state.probe_in_flight and not await self.claim(state):
                    continue  # another instance of the fleet probes it
                return state
        for state in self.order:
            if state.name not in self.failed and state.usable_in_overage():
                return state
        return None

    def has_fresh(self) -> bool:
        return any(self.is_fresh(state) for state in self.order)

    def has_alternative(self, to: EndpointState) -> bool:
        """Whether an endpoint other than `to` could still take this request without waiting."""
        return any(state is not to and self.is_fresh(state) for state in self.order)

    def is_fresh(self, state: EndpointState) -> bool:
        return state.name not in self.failed and (state.status == HEALTHY or state.usable_in_overage())

    def fallback(self) -> EndpointState | None:
        left = [
            s
            for s in self.order
            if self.attempts.get(s.name, 0) < self.max_attempts and s.name not in self.excluded
        ]
        if not left:
            return None
        return min(left, key=lambda s: (self.back_at(s), s.name in self.failed))

    def back_at(self, state: EndpointState) -> float:
        return self.said.get(state.name, state.cooling_until)

    def until_back(self, now: float) -> float:
        """Seconds until the endpoint to go back to is expected back; 0 when it already is."""
        state = self.fallback()
        return 0.0 if state is None else max(0.0, self.back_at(state) - now)

    def asked_to_wait(self, now: float) -> float | None:
        """What is left of the wait the endpoint to go back to asked for; None when it named none."""
        state = self.fallback()
        if state is None or state.name not in self.said:
            return None
        return max(0.0, self.said[state.name] - now)

    def exhausted(self) -> bool:
        return self.fallback() is None

    def record(self, state: EndpointState) -> None:
        self.attempts[state.name] = self.attempts.get(state.name, 0) + 1

    def mark_failed(self, state: EndpointState, failure: AttemptFailed, now: float) -> None:
        self.failed.add(state.name)
        if failure.final:
            self.excluded.add(state.name)
        if failure.cool_until is not None:
            self.said[state.name] = failure.cool_until
        elif failure.retry_after is not None:
            self.said[state.name] = now + failure.retry_after
