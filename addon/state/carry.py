"""What a process hands its successor on a restart: the endpoints' cooldowns and the sessions' endpoints.

With a shared store (Redis, or the workers' hub) a successor reads them there; a proxy
alone keeps them in memory, so a restart would forget that an endpoint is rate-limited
for the next hour and move every session. Cooldown ends are Unix times; a session's
last use travels as an age, since each process counts it on its own monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .endpoints import EndpointPool
from .routing import SessionMap


def snapshot(pool: EndpointPool, sessions: SessionMap) -> dict[str, Any]:
    now = sessions.clock()
    return {
        "endpoints": {
            state.name: {
                "coolingUntil": state.cooling_until,
                "reason": state.cooling_reason,
                "failures": state.consecutive_failures,
                "lastError": state.last_error,
                "lastErrorAt": state.last_error_at,
                "lastStatus": state.last_status,
            }
            for state in pool
            if state.cooling_until or state.consecutive_failures
        },
        "sessions": [
            [session, endpoint, now - used] for session, (endpoint, used) in sessions.entries.items()
        ],
    }


def restore(carried: Mapping[str, Any], pool: EndpointPool, sessions: SessionMap) -> None:
    """Takes in a predecessor's snapshot; endpoints this config no longer has are skipped."""
    for name, was in dict(carried.get("endpoints") or {}).items():
        state = pool.get(name)
        if state is None:
            continue
        if float(was.get("coolingUntil") or 0) > time.time():
            state.cool(float(was["coolingUntil"]), str(was.get("reason") or ""))
        state.consecutive_failures = max(state.consecutive_failures, int(was.get("failures") or 0))
        if was.get("lastErrorAt") and not state.last_error_at:
            state.last_error = str(was.get("lastError") or "")
            state.last_error_at = float(was["lastErrorAt"])
            state.last_status = was.get("lastStatus")
    now = sessions.clock()
    for session, endpoint, age in carried.get("sessions") or ():
        if pool.get(endpoint) is not None and session not in sessions.entries:
            sessions.entries[str(session)] = (str(endpoint), now - float(age))
    sessions.entries = type(sessions.entries)(sorted(sessions.entries.items(), key=lambda item: item[1][1]))
    sessions.expire()
