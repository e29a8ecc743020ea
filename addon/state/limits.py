"""Usage windows read from response headers: how full each of an endpoint's limits is, and until when.

Subscriptions (Pro/Max, OAuth) report `anthropic-ratelimit-unified-*` windows (`5h`, `7d`,
`7d-sonnet`, … the names are data); API keys report
`anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`.
Both become `Window`s with a utilization, a status and a reset time, so that routing and
cooling treat them alike. Their statuses differ in one way that matters: a subscription's
`rejected` window refuses the request at hand (or bills it as extra usage), while an API
key's `exhausted` window has accepted it, and only the next request would get a 429. A
value that is missing, malformed or absurd is left out of the reading: a bad header never
fails a request and never cools an endpoint.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

UNIFIED = "anthropic-ratelimit-unified-"
API_KEY_WINDOWS = ("requests", "tokens", "input-tokens", "output-tokens")
STATUSES = frozenset({"allowed", "allowed_warning", "rejected"})
REJECTED = "rejected"
EXHAUSTED = "exhausted"  # an API key's window at or below `streaming.ratelimitThreshold`
# Window names become metric labels: keep them short, plain and few.
WINDOW_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,23}")
MAX_WINDOWS = 8
MAX_RESET_AHEAD = 40 * 86400  # the longest window is a week; a reset beyond this is nonsense


@dataclass(frozen=True)
class Window:
    """One limit as an endpoint last reported it; None where the endpoint said nothing usable."""

    utilization: float | None = None
    status: str | None = None
    resets_at: float | None = None

    def current(self, now: float) -> bool:
        """Until its reset, a reading stands; after it, the window has reopened and is unknown."""
        return self.resets_at is None or self.resets_at > now


@dataclass(frozen=True)
class Reading:
    """What one response said about its endpoint's limits."""

    windows: dict[str, Window] = field(default_factory=dict)
    status: str | None = None  # the unified status of the binding window
    resets_at: float | None = None
    overage_in_use: bool = False

    def __bool__(self) -> bool:
        return bool(self.windows) or self.status is not None


def read(headers: Iterable[tuple[str, str]], threshold: int = 0, now: float | None = None) -> Reading:
    """The limits in a response's headers (names lower-cased).

    An API-key window whose `remaining` is at or below `threshold` counts as exhausted.
    """
    now = time.time() if now is None else now
    values = {name: value.strip() for name, value in headers if name.startswith("anthropic-ratelimit-")}
    windows = _unified_windows(values, now)
    for name in API_KEY_WINDOWS:
        if len(windows) < MAX_WINDOWS and (window := _api_key_window(values, name, threshold, now)):
            windows[name] = window
    return Reading(
        windows=windows,
        status=_status(values.get(UNIFIED + "status")),
        resets_at=_epoch(values.get(UNIFIED + "reset"), now),
        overage_in_use=values.get(UNIFIED + "overage-in-use", "").lower() == "true",
    )


def _unified_windows(values: dict[str, str], now: float) -> dict[str, Window]:
    fields: dict[str, dict[str, str]] = {}
    for header, value in values.items():
        if not header.startswith(UNIFIED):
            continue
        name, _, part = header.removeprefix(UNIFIED).rpartition("-")
        # `overage-status` and `overage-reset` describe extra usage, not a window
        if part in ("utilization", "reset", "status") and name != "overage" and WINDOW_NAME.fullmatch(name):
            fields.setdefault(name, {})[part] = value
    windows: dict[str, Window] = {}
    for name, parts in fields.items():
        window = Window(
            utilization=_fraction(parts.get("utilization")),
            status=_status(parts.get("status")),
            resets_at=_epoch(parts.get("reset"), now),
        )
        if window != Window() and len(windows) < MAX_WINDOWS:
            windows[name] = window
    return windows


def _api_key_window(values: dict[str, str], name: str, threshold: int, now: float) -> Window | None:
    prefix = f"anthropic-ratelimit-{name}-"
    limit, remaining = _count(values.get(prefix + "limit")), _count(values.get(prefix + "remaining"))
    resets_at = _rfc3339(values.get(prefix + "reset"), now)
    if remaining is None or resets_at is None:
        return None
    utilization = None
    if limit and remaining <= limit:
        utilization = 1 - remaining / limit
    status = EXHAUSTED if remaining <= threshold else "allowed"
    return Window(utilization, status, resets_at)


def _fraction(text: str | None) -> float | None:
    try:
        value = float(text) if text else math.nan
    except ValueError:
        return None
    return value if 0 <= value <= 1 else None


def _status(text: str | None) -> str | None:
    return text.lower() if text and text.lower() in STATUSES else None


def _count(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def parse_time(text: object) -> float | None:
    """An RFC 3339 time (`2026-11-25T08:00:30Z`) as Unix time; None when it is not one."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _epoch(text: str | None, now: float) -> float | None:
    try:
        value = float(text) if text else math.nan
    except ValueError:
        return None
    return _ahead(value, now)


def _rfc3339(text: str | None, now: float) -> float | None:
    return _ahead(parse_time(text), now)


def _ahead(value: float | None, now: float) -> float | None:
    """A reset still to come, and not absurdly far: else nothing to go by."""
    return value if value is not None and now < value <= now + MAX_RESET_AHEAD else None
