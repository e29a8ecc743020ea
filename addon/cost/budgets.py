"""Budgets: what each client, and the whole proxy, may spend per day, week and month.

`server.accessKeys[].budget` caps one client, `server.budget` every client together, in
calendar windows of `server.budgetTimezone`: the day, the ISO week from Monday, the month.
A request's cost counts once its answer has ended (`spend`), so a request already on its
way may take a client past its cap; the next one is refused. The check on each request
(`refusal`) reads what is already decided: who is over a cap is worked out when spend
arrives, not when a request does, so a request pays a dict lookup and a comparison.

Spend lives in this process's memory. With a shared store (a fleet's Redis, or the
workers' hub) each addition also goes there, `INCRBYFLOAT` on a key per client, window and
window start that expires after its window, and the sums are read back with each batch of
additions and once a second: every instance sees one spend, and a restart finds it again.
A store that is away never holds a request up: its additions wait, and go when it is back.
A proxy alone (`state.backend: memory`, one process) finds its spend so far at its start
in the usage store's hourly totals (cost/store.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from ..config import Server
from ..logs import EventLog
from ..request import Failure, error_failure
from .store import UsageStore

WINDOWS = ("daily", "weekly", "monthly")
PROXY = "*"  # the whole proxy, where a client's name goes (a name cannot be `*`)
WARN_AT = 0.8  # a budget this full is warned of: a log line, a header, the status page
REMAINING_HEADER = b"x-ccf-budget-remaining"
Headers = tuple[tuple[bytes, bytes], ...]
SYNC_EVERY = 1.0  # how often the store's sums are read back when nothing is added
SYNC_GAP = 0.05  # at least this between two exchanges with the store: a busy proxy sends batches
KEEP_AFTER = 3600  # a window's key outlives the window by this much (instances' clocks differ)


class SpendStore(Protocol):
    """A store the fleet shares its spend through (fleet/shared_state.py's RedisState)."""

    async def add_spend(
        self, adds: Mapping[str, tuple[float, int]], keys: Sequence[str]
    ) -> list[float | None] | None: ...


@dataclass(frozen=True)
class Period:
    """One window's current stretch of time: [start, end), Unix times."""

    window: str
    start: float
    end: float
    first_day: date  # its first day in the budgets' time zone: names its key in the store


def billable(method: str, path: str) -> bool:
    """Whether a request can cost: `POST /v1/messages`, or its batches; not `count_tokens`."""
    route = path.split("?", 1)[0].rstrip("/")
    return method == "POST" and "/v1/messages" in route and not route.endswith("/count_tokens")


def period(window: str, now: float, zone: ZoneInfo) -> Period:
    """The calendar day, ISO week (Monday first) or month that `now` falls in, in `zone`."""
    today = datetime.fromtimestamp(now, zone).date()
    if window == "daily":
        first, after = today, today + timedelta(days=1)
    elif window == "weekly":
        first = today - timedelta(days=today.weekday())
        after = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
    return Period(window, _midnight(first, zone), _midnight(after, zone), first)


def _midnight(day: date, zone: ZoneInfo) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()


@dataclass(frozen=True)
class Over:
    """A budget that is spent: whose (a client's name, or PROXY), which window, how much."""

    scope: str
    window: str
    spent: float
    limit: float
    resets_at: str  # ISO time in the budgets' time zone

    @property
    def message(self) -> str:
        whose = "The proxy's" if self.scope == PROXY else f"Client {self.scope}'s"
        return (
            f"{whose} {self.window} budget is spent: ${self.spent:.2f} of ${self.limit:.2f}. "
            f"It resets at {self.resets_at}."
        )

    def failure(self) -> Failure:
        """The refusal: 429 `billing_error`, as Claude Code's own gateway words a spent cap, and
        `x-should-retry: false`, so that the SDKs do not retry it."""
        failure = error_failure(429, "billing_error", self.message)
        failure.headers += ((b"x-should-retry", b"false"),)
        return failure


class Budgets:
    """Spend per client and for the whole proxy, per window, and who is over or near a cap."""

    def __init__(self, events: EventLog, clock: Callable[[], float] = time.time) -> None:
        self.events = events
        self.clock = clock
        self.zone = ZoneInfo("UTC")
        self.limits: dict[str, dict[str, float]] = {}  # scope -> window -> USD
        self.periods: dict[str, Period] = {}
        self.next_change = -math.inf  # when the first of the current periods ends
        self.spent: dict[tuple[str, str], float] = {}  # (scope, window) -> USD in its current period
        self.over: dict[str, Over] = {}  # scope -> the cap it is over (the one that resets last)
        # scope -> USD left of its tightest cap once one is 80 % spent, and the header that says so
        self.near: dict[str, tuple[float, Headers]] = {}
        self.warned: set[tuple[str, str, str]] = set()  # (event, scope, window) logged this period
        self.store: SpendStore | None = None
        self.unsent: dict[str, float] = {}  # store key -> USD added here and not yet in the store
        self.ttl: dict[str, int] = {}  # store key -> seconds it is to be kept
        self.wake = asyncio.Event()

    # -- config --------------------------------------------------------------------------------

    def configure(self, server: Server) -> None:
        """Takes a config's caps and time zone; spend so far is kept (a new zone's windows start
        from what the store holds for them)."""
        zone = ZoneInfo(server.budget_timezone)
        if zone.key != self.zone.key:
            self.zone, self.periods, self.spent, self.warned = zone, {}, {}, set()
            self.next_change = -math.inf
        limits = {client.name: client.budget.limits() for client in server.access_keys}
        limits[PROXY] = server.budget.limits()
        self.limits = {scope: caps for scope, caps in limits.items() if caps}
        self._roll(self.clock())
        self._judge_all()

    # -- on the request's path -------------------------------------------------------------------

    def refusal(self, client: str, method: str = "POST", path: str = "/v1/messages") -> Over | None:
        """The spent budget that refuses `client`'s request, its own or the proxy's; None mostly.

        Only a request that can cost is refused: a message (or a batch of them), not a token
        count, a model list or Claude Code's connectivity check, so that a client over its
        budget still starts and is told why at its first prompt.
        """
        if not self.over:
            return None
        if (now := self.clock()) >= self.next_change:
            self._roll(now)
        over = self.over.get(client) or self.over.get(PROXY)
        return over if over is not None and billable(method, path) else None

    def headers(self, client: str) -> Headers:
        """`x-ccf-budget-remaining` once 80 % of `client`'s tightest budget (or the proxy's) is spent."""
        if not self.near:
            return ()
        if (now := self.clock()) >= self.next_change:
            self._roll(now)
        own, proxy = self.near.get(client), self.near.get(PROXY)
        if own is None or (proxy is not None and proxy[0] < own[0]):
            return proxy[1] if proxy is not None else ()
        return own[1]

    # -- spend -----------------------------------------------------------------------------------

    def spend(self, client: str, cost: float) -> None:
        """A request's cost, in US dollars, once its answer has ended."""
        if not cost > 0 or not math.isfinite(cost):
            return
        now = self.clock()
        if now >= self.next_change:
            self._roll(now)
        for scope in (client, PROXY):
            for window in WINDOWS:
                self.spent[scope, window] = self.spent.get((scope, window), 0.0) + cost
                if self.store is not None:
                    key = self.key(scope, window)
                    self.unsent[key] = self.unsent.get(key, 0.0) + cost
                    self.ttl[key] = max(60, int(self.periods[window].end - now) + KEEP_AFTER)
            self._judge(scope)
        if self.store is not None:
            self.wake.set()

    def key(self, scope: str, window: str) -> str:
        """The store's key for a scope's spend in a window's current period."""
        return f"spend:{scope}:{window}:{self.periods[window].first_day.isoformat()}"

    # -- what is decided when spend or time moves ------------------------------------------------

    def _roll(self, now: float) -> None:
        """Starts the windows whose period has ended: their spend from zero, their warnings anew."""
        for window in WINDOWS:
            current = self.periods.get(window)
            if current is not None and current.start <= now < current.end:
                continue
            self.periods[window] = period(window, now, self.zone)
            self.spent = {key: usd for key, usd in self.spent.items() if key[1] != window}
            self.warned = {said for said in self.warned if said[2] != window}
        self.next_change = min(p.end for p in self.periods.values())
        self._judge_all()

    def _judge_all(self) -> None:
        for scope in set(self.over) | set(self.near) | set(self.limits):
            self._judge(scope)

    def _judge(self, scope: str) -> None:
        """Whether `scope` is over a cap, or near one; logs each crossing once a period."""
        over: Over | None = None
        left, near = math.inf, False
        for window, limit in self.limits.get(scope, {}).items():
            spent = self.spent.get((scope, window), 0.0)
            left = min(left, max(0.0, limit - spent))
            if spent >= WARN_AT * limit:
                near = True
                self._say("budget_warning", scope, window, spent, limit)
            if spent >= limit:
                self._say("budget_spent", scope, window, spent, limit)
                # over several caps: the one that holds the client back longest is the one to name
                if over is None or self.periods[window].end > self.periods[over.window].end:
                    over = Over(scope, window, spent, limit, self.resets_at(window))
        if over is None:
            self.over.pop(scope, None)
        else:
            self.over[scope] = over
        if near:
            self.near[scope] = left, ((REMAINING_HEADER, f"{left:.4f}".encode()),)
        else:
            self.near.pop(scope, None)

    def _say(self, event: str, scope: str, window: str, spent: float, limit: float) -> None:
        if (event, scope, window) in self.warned:
            return
        self.warned.add((event, scope, window))
        self.events.event(
            event,
            logging.WARNING,
            client=scope,
            window=window,
            spent_usd=round(spent, 4),
            limit_usd=limit,
            resets_at=self.resets_at(window),
        )

    def resets_at(self, window: str) -> str:
        return datetime.fromtimestamp(self.periods[window].end, self.zone).isoformat()

    # -- what the proxy shows -------------------------------------------------------------------

    def used(self) -> list[tuple[str, str, float]]:
        """(scope, window, spent / cap) of every cap: `ccf_budget_used_ratio`."""
        self._roll_if_due()
        return [
            (scope, window, self._ratio(scope, window, limit))
            for scope, caps in self.limits.items()
            for window, limit in caps.items()
        ]

    def document(self) -> dict[str, Any]:
        """`/health`'s `budgets`: each cap, what is spent of it and when it resets."""
        self._roll_if_due()

        def caps(scope: str) -> dict[str, Any]:
            return {
                window: {
                    "limitUsd": limit,
                    "spentUsd": round(self.spent.get((scope, window), 0.0), 6),
                    "ratio": round(self._ratio(scope, window, limit), 4),
                    "resetsAt": self.resets_at(window),
                }
                for window, limit in self.limits.get(scope, {}).items()
            }

        return {
            "timezone": self.zone.key,
            "proxy": caps(PROXY),
            "clients": {scope: caps(scope) for scope in self.limits if scope != PROXY},
            "over": sorted(self.over),
        }

    def _ratio(self, scope: str, window: str, limit: float) -> float:
        return self.spent.get((scope, window), 0.0) / limit if limit > 0 else 1.0

    def _roll_if_due(self) -> None:
        if self.clock() >= self.next_change:
            self._roll(self.clock())

    # -- where spend so far is found -------------------------------------------------------------

    async def restore(self, usage: UsageStore) -> None:
        """This process alone, at its start: its spend so far in the current windows, from the
        usage store's hourly totals (what was billed). An hour counts in a window that it
        starts in. A shared store is read back by `sync` instead."""
        if usage.backend is None:
            return
        self._roll_if_due()
        try:
            rows = await usage.backend.read(int(min(p.start for p in self.periods.values())))
        except Exception:
            return  # the usage store says so itself (usage_store_down); budgets start from zero
        for (hour, client, _, _), totals in rows.items():
            for window, current in self.periods.items():
                if current.start <= hour < current.end and totals.billed_usd > 0:
                    for scope in (client, PROXY):
                        self.spent[scope, window] = self.spent.get((scope, window), 0.0) + totals.billed_usd
        self._judge_all()

    # -- the shared store ------------------------------------------------------------------------

    async def share(self) -> None:
        """Keeps spend in step with the store until cancelled: additions as they come, the sums
        read back with them and once a second."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), SYNC_EVERY)
            self.wake.clear()
            await self.sync()
            await asyncio.sleep(SYNC_GAP)

    async def sync(self) -> None:
        """Sends what was added here, reads the fleet's sums back. A store that is away keeps
        the additions for the next time."""
        if self.store is None:
            return
        self._roll_if_due()
        sending, self.unsent = self.unsent, {}
        adds = {key: (usd, self.ttl.get(key, 60)) for key, usd in sending.items()}
        scopes = sorted({PROXY, *self.limits})
        read = [(scope, window, self.key(scope, window)) for scope in scopes for window in WINDOWS]
        try:
            totals = await self.store.add_spend(adds, [key for *_, key in read])
        except BaseException:
            self._unsend(sending)  # cancelled at the stop: `flush` sends them
            raise
        if totals is None:
            self._unsend(sending)
            return
        for key in sending.keys() - self.unsent.keys():
            self.ttl.pop(key, None)
        for (scope, window, key), total in zip(read, totals, strict=True):
            if total is None or key != self.key(scope, window):  # a window that ended meanwhile
                continue
            # within a period spend only grows: a store that lost keys cannot lower it here
            waiting = self.unsent.get(key, 0.0)
            self.spent[scope, window] = max(self.spent.get((scope, window), 0.0), total + waiting)
        self._judge_all()

    def _unsend(self, sending: dict[str, float]) -> None:
        for key, usd in sending.items():
            self.unsent[key] = self.unsent.get(key, 0.0) + usd

    async def flush(self, timeout: float = 1.0) -> None:
        """At the stop: what is still unsent, once, within `timeout`."""
        if self.store is not None and self.unsent:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sync(), timeout)
