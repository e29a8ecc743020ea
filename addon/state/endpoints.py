"""Health of each endpoint: healthy, cooling until a time, or half-open with one probe.

A failed endpoint is skipped while it cools. When the cooldown ends, the first request
that asks takes the single probe slot; every other request keeps skipping the endpoint
until the probe reports back. Each state also keeps the endpoint's usage windows as its
responses last reported them (limits.py), which routing reads. All of this runs on one
event loop, so plain attributes are enough: no request can interleave between a check
and the update that follows it. In a fleet (shared_state.py) this is each instance's own copy:
the others' changes arrive as messages applied on the same loop, and the probe slot is
also a lock in Redis, claimed right after `take` and before the attempt is sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..config import Endpoint
from . import limits

Clock = Callable[[], float]

HEALTHY = "healthy"
COOLING = "cooling"
PROBING = "probing"
# How an endpoint's usage windows stand (`limit_state`); a change is worth a log line.
LIMITS_OK, SATURATED, EXHAUSTED, REJECTED, OVERAGE = "ok", "saturated", "exhausted", "rejected", "overage"


@dataclass
class EndpointState:
    """One endpoint's health: whether and why it cools, the one probe after a cooldown, its failures
    in a row, its usage windows and rate limits."""

    endpoint: Endpoint
    clock: Clock = time.time
    cooling_until: float = 0.0
    cooling_reason: str = ""
    probe_in_flight: bool = False
    consecutive_failures: int = 0
    last_error: str = ""
    last_error_at: float | None = None
    last_status: int | None = None  # the HTTP status of the last failure, when it was an answer
    last_success_at: float | None = None
    windows: dict[str, limits.Window] = field(default_factory=dict)
    limits_status: str | None = None
    limits_reset: float | None = None
    overage_in_use: bool = False
    limits_logged: str = LIMITS_OK  # the limit state last logged

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def status(self) -> str:
        if self.probe_in_flight:
            return PROBING
        return COOLING if self.clock() < self.cooling_until else HEALTHY

    def cooldown_left(self) -> float:
        return max(0.0, self.cooling_until - self.clock())

    def take(self) -> bool:
        """Claims the endpoint for a request that is free to choose; False while it is unusable.

        Once a cooldown has ended, the first caller becomes the probe and the endpoint
        stays unusable for everyone else until that probe succeeds or fails.
        """
        if self.probe_in_flight or self.clock() < self.cooling_until:
            return False
        if self.cooling_until:
            self.probe_in_flight = True
        return True

    def succeeded(self) -> None:
        """An answer worth relaying: the cooldown ends, unless the endpoint's windows are closed."""
        if self.closed_until() is None:
            self.cooling_until = 0.0
            self.cooling_reason = ""
        self.probe_in_flight = False
        self.consecutive_failures = 0
        self.last_success_at = self.clock()

    def failed(self, kind: str, cooldown: float, status: int | None = None) -> None:
        now = self.clock()
        self.probe_in_flight = False
        self.consecutive_failures += 1
        self.last_error = kind
        self.last_error_at = now
        self.last_status = status
        self.cool(now + cooldown, kind)

    def cool(self, until: float, reason: str) -> None:
        if until > self.cooling_until:
            self.cooling_until = until
            self.cooling_reason = reason

    def forgive(self, reason: str) -> bool:
        """Ends a cooldown given for `reason`, as when what caused it may have changed (a
        reload, for refused credentials); says whether there was one."""
        if self.cooling_reason != reason or self.clock() >= self.cooling_until:
            return False
        self.cooling_until, self.cooling_reason = 0.0, ""
        return True

    def probed_elsewhere(self, wait: float) -> None:
        """Another instance holds the fleet's probe: ask again after `wait`, unless its verdict
        comes first."""
        self.probe_in_flight = False
        self.cooling_until = self.clock() + wait

    def released(self) -> None:
        """The probe ended without a verdict (the client went away): let another request probe."""
        self.probe_in_flight = False

    def observe(self, reading: limits.Reading) -> None:
        """Takes in what a response said about the limits; windows it did not mention stay."""
        self.windows = {**self.current_windows(), **reading.windows}
        if reading.status is not None:
            self.limits_status, self.limits_reset = reading.status, reading.resets_at
            self.overage_in_use = reading.overage_in_use

    def current_windows(self) -> dict[str, limits.Window]:
        now = self.clock()
        return {name: window for name, window in self.windows.items() if window.current(now)}

    def worst_utilization(self) -> float:
        """The fullest window's utilization; 0 when nothing is known (an unused endpoint)."""
        return max((w.utilization or 0.0 for w in self.current_windows().values()), default=0.0)

    def rejected_until(self) -> float | None:
        """When the last of a subscription's refusing windows reopens; None when none refuses.

        Such a window refuses the request at hand too (or bills it as extra usage).
        """
        now = self.clock()
        resets = self._resets(limits.REJECTED)
        if not resets and self.limits_status == limits.REJECTED and (self.limits_reset or 0) > now:
            resets = [self.limits_reset or 0.0]
        return max(resets, default=None)

    def closed_until(self) -> float | None:
        """When the last window that takes no further request reopens: a subscription's refusing
        window, or an API key's exhausted one (which still served the request that said so)."""
        resets = self._resets(limits.EXHAUSTED)
        if (rejected := self.rejected_until()) is not None:
            resets.append(rejected)
        return max(resets, default=None)

    def _resets(self, status: str) -> list[float]:
        return [w.resets_at for w in self.current_windows().values() if w.status == status and w.resets_at]

    def limit_state(self, step_aside_at: float | None) -> str:
        if self.rejected_until() is not None:
            return OVERAGE if self.overage_in_use else REJECTED
        if self.closed_until() is not None:
            return EXHAUSTED
        if step_aside_at is not None and self.worst_utilization() >= step_aside_at:
            return SATURATED
        return LIMITS_OK

    def usable_in_overage(self) -> bool:
        """Refused by its windows but answering as paid extra usage: a last resort."""
        return self.overage_in_use and not self.probe_in_flight and self.rejected_until() is not None

    def snapshot(self, step_aside_at: float | None = None) -> dict[str, object]:
        status = self.status
        limit_state = self.limit_state(step_aside_at)
        return {
            "name": self.name,
            "provider": self.endpoint.provider,
            "baseUrl": self.endpoint.base_url,
            "enabled": self.endpoint.enabled,
            "status": status,
            "coolingUntil": iso_time(self.cooling_until) if status != HEALTHY else None,
            "cooldownSecondsLeft": round(self.cooldown_left(), 3),
            "reason": self.cooling_reason or None,
            "consecutiveFailures": self.consecutive_failures,
            "lastError": self.last_error or None,
            "lastStatus": self.last_status,
            "lastErrorAt": iso_time(self.last_error_at),
            "lastSuccessAt": iso_time(self.last_success_at),
            "limits": {
                name: {
                    "utilization": window.utilization,
                    "status": window.status,
                    "resetsAt": iso_time(window.resets_at),
                }
                for name, window in self.current_windows().items()
            },
            "saturated": limit_state == SATURATED,
            "overage": limit_state == OVERAGE,
        }


@dataclass
class EndpointPool:
    """The ordered endpoints and their states; one pool a process, updated in place on reload."""

    states: list[EndpointState] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        endpoints: Iterable[Endpoint],
        previous: EndpointPool | None = None,
        clock: Clock = time.time,
    ) -> EndpointPool:
        kept = {s.endpoint: s for s in previous.states} if previous else {}
        states = []
        for endpoint in endpoints:
            if not endpoint.enabled:
                continue
            state = kept.get(endpoint) or EndpointState(endpoint, clock)
            states.append(state)
        return cls(states)

    def update(self, endpoints: Iterable[Endpoint], clock: Clock = time.time) -> None:
        """The enabled `endpoints`, in their order; an endpoint that stays keeps its state."""
        self.states = EndpointPool.build(endpoints, self, clock).states

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.states)

    def forgive(self, reason: str) -> list[Endpoint]:
        """Ends every cooldown given for `reason`; returns those endpoints."""
        return [state.endpoint for state in self.states if state.forgive(reason)]

    def get(self, name: object) -> EndpointState | None:
        return next((state for state in self.states if state.name == name), None)

    def __len__(self) -> int:
        return len(self.states)


def reason_text(reason: str | None, status: int | None) -> str | None:
    """Why an endpoint cools (or last failed), as a person reads it: credentials that the
    endpoint refused are told apart from credentials that are missing."""
    if reason == "credentials" and status in (401, 403):
        return f"credentials refused (HTTP {status})"
    return reason


def iso_time(ts: float | None) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
