"""Health of each endpoint: healthy, cooling until a time, or half-open with one probe.

A failed endpoint is skipped while it cools. When the cooldown ends, the first request
that asks takes the single probe slot; every other request keeps skipping the endpoint
until the probe reports back. All of this runs on one event loop, so plain attributes
are enough: no request can interleave between a check and the update that follows it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .config import Endpoint

Clock = Callable[[], float]

HEALTHY = "healthy"
COOLING = "cooling"
PROBING = "probing"


@dataclass
class EndpointState:
    endpoint: Endpoint
    clock: Clock = time.time
    cooling_until: float = 0.0
    cooling_reason: str = ""
    probe_in_flight: bool = False
    consecutive_failures: int = 0
    last_error: str = ""
    last_error_at: float | None = None
    last_success_at: float | None = None

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
        self.cooling_until = 0.0
        self.cooling_reason = ""
        self.probe_in_flight = False
        self.consecutive_failures = 0
        self.last_success_at = self.clock()

    def failed(self, kind: str, cooldown: float) -> None:
        now = self.clock()
        self.probe_in_flight = False
        self.consecutive_failures += 1
        self.last_error = kind
        self.last_error_at = now
        self.cool(now + cooldown, kind)

    def cool(self, until: float, reason: str) -> None:
        if until > self.cooling_until:
            self.cooling_until = until
            self.cooling_reason = reason

    def released(self) -> None:
        """The probe ended without a verdict (the client went away): let another request probe."""
        self.probe_in_flight = False

    def snapshot(self) -> dict[str, object]:
        status = self.status
        return {
            "name": self.name,
            "baseUrl": self.endpoint.base_url,
            "enabled": self.endpoint.enabled,
            "status": status,
            "coolingUntil": _iso(self.cooling_until) if status != HEALTHY else None,
            "cooldownSecondsLeft": round(self.cooldown_left(), 3),
            "reason": self.cooling_reason or None,
            "consecutiveFailures": self.consecutive_failures,
            "lastError": self.last_error or None,
            "lastErrorAt": _iso(self.last_error_at),
            "lastSuccessAt": _iso(self.last_success_at),
        }


@dataclass
class EndpointPool:
    """The ordered endpoints and their states; replaced whole on reload, states carried over."""

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

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
