"""Endpoint state shared by a fleet of proxies through Redis (`state.backend: redis`).

Every instance keeps its own copy of each endpoint's state and decides on it alone, so a
healthy request never waits for Redis. What changes that state (a cooldown, a recovery,
a usage-window reading) is published once, when it changes, and every other instance
applies it as the message arrives. Around that:
- the probe after a cooldown is a lock with an expiry (`SET NX PX`): one instance probes;
- the retry budget's counts travel in each instance's heartbeat, once a second, so the
  budget is the fleet's;
- a session's endpoint is written when it changes, and read when an instance meets a
  session it does not know;
- each instance keeps a heartbeat key with a time to live: that is the fleet view;
- what clients spent (cost/budgets.py) is added up in keys per client and window
  (`INCRBYFLOAT`), read back with each batch of additions and once a second.
Redis is never needed to serve. A request waits for it only to claim a probe or to look up
a session it has not seen, and never longer than `state.redis.timeout`; without an answer
in time it goes on alone. The writes and the heartbeat run in the background with a
looser bound; a connection that fails there marks the backend down (logged once,
`ccf_state_backend_up 0`), the instance goes on with its local state, and a reconnect
loop with backoff brings it back, publishing again the cooldowns it holds. With
`state.backend: memory` the same interface does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from ..config import RedisSettings
from ..logs import EventLog
from ..state.endpoints import COOLING, EndpointPool, EndpointState
from ..state.limits import Reading, Window
from . import resp_client as resp

HEARTBEAT_EVERY = 1.0
BACKGROUND_TIMEOUT = 1.0  # for what no request waits on: writes, heartbeats, (re)connecting
HEARTBEAT_TTL = 3
RECONNECT_MAX = 1.0  # the longest wait between reconnect attempts: sharing resumes fast
QUEUE_LIMIT = 1000
# The fleet's budget counts as this instance's own plus what the others said within this window.
BUDGET_FRESH = 3.0

Describe = Callable[[], dict[str, Any]]


class LocalState:
    """`state.backend: memory`: this process is the whole fleet."""

    mode = "memory"
    up = True

    async def start(self, pool: EndpointPool, describe: Describe) -> None:
        return None

    async def stop(self) -> None:
        return None

    def cooled(self, state: EndpointState) -> None:
        return None

    def recovered(self, state: EndpointState) -> None:
        return None

    def read_limits(self, state: EndpointState) -> None:
        return None

    async def claim_probe(self, name: str) -> bool:
        return True

    def release_probe(self, name: str) -> None:
        return None

    async def session(self, session: str) -> str | None:
        return None

    def session_moved(self, session: str, endpoint: str) -> None:
        return None

    def budget_elsewhere(self) -> tuple[int, int]:
        return 0, 0

    async def fleet(self) -> list[dict[str, Any]] | None:
        return None


class RedisState(LocalState):
    """The fleet's shared view of its endpoints, kept in Redis and spread by pub/sub."""

    def __init__(
        self,
        settings: RedisSettings,
        events: EventLog,
        probe_ttl: float,
        name: str = "redis",
    ) -> None:
        assert settings.url is not None
        self.name = name  # "workers" when this is the store of one proxy's workers (hub.py)
        self.settings = settings
        self.events = events
        self.probe_ttl = probe_ttl
        self.id = uuid.uuid4().hex[:12]
        prefix = settings.key_prefix
        self.channel = f"{prefix}events"
        self.instances = f"{prefix}instances"
        self.prefix = prefix
        if name == "workers":
            self.redis = self.listener = resp.Client.from_url(settings.url)
        else:
            self.redis, self.listener = redis_clients(settings.url, max(settings.timeout, BACKGROUND_TIMEOUT))
        self.up = False
        self.warned = False
        self.pool = EndpointPool()
        self.describe: Describe = dict
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(QUEUE_LIMIT)
        self.tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.others: dict[str, dict[str, Any]] = {}

    @property
    def mode(self) -> str:  # type: ignore[override]
        return self.name if self.up else "local"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, pool: EndpointPool, describe: Describe) -> None:
        self.pool, self.describe = pool, describe
        self.tasks = [
            asyncio.ensure_future(self._connect()),
            asyncio.ensure_future(self._write()),
            asyncio.ensure_future(self._heartbeat()),
        ]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.delete(self._instance_key(self.id)), self.settings.timeout)
        for client in (self.redis, self.listener):
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _connect(self) -> None:
        """Subscribes and keeps subscribed; on any failure, local state and a reconnect with backoff."""
        wait = 0.05
        while True:
            try:
                async with self.listener.pubsub() as pubsub:
                    await self._call(pubsub.subscribe(self.channel))
                    await self._call(self.redis.ping())
                    self._mark_up()
                    await self._load()
                    wait = 0.05
                    while self.up:  # a failed write elsewhere starts the whole connection over
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            self._apply(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._mark_down(e)
            await asyncio.sleep(wait)
            wait = min(RECONNECT_MAX, wait * 2)

    def _mark_up(self) -> None:
        if self.up:
            return
        self.up = True
        self.connected.set()
        self.events.event("state_backend_up", backend=self.name, instance=self.id)
        for state in self.pool:  # what we learnt alone while Redis was away
            if state.status == COOLING:
                self.cooled(state)

    def _mark_down(self, error: BaseException) -> None:
        self.connected.set()  # connected or not, start-up does not wait any longer
        if self.up or not self.warned:  # once an outage
            self.up, self.warned = False, True
            self.events.event(
                "state_backend_down",
                logging.WARNING,
                backend=self.name,
                error=f"{type(error).__name__}: {error}"[:200],
                effect="each instance goes on with its own state until Redis is back",
            )

    async def _call(self, call: Awaitable[Any]) -> Any:
        return await asyncio.wait_for(call, max(self.settings.timeout, BACKGROUND_TIMEOUT))

    async def _ask(self, call: Awaitable[Any]) -> Any:
        """A call a request waits on: `state.redis.timeout` at most; TimeoutError after that."""
        return await asyncio.wait_for(call, self.settings.timeout)

    # -- what this instance says --------------------------------------------------------------

    def cooled(self, state: EndpointState) -> None:
        self._send(
            state,
            "cool",
            until=state.cooling_until,
            reason=state.cooling_reason,
            since=state.last_error_at,
            error=state.last_error,
        )

    def recovered(self, state: EndpointState) -> None:
        self._send(state, "clear")

    def read_limits(self, state: EndpointState) -> None:
        windows = {n: [w.utilization, w.status, w.resets_at] for n, w in state.current_windows().items()}
        self._send(
            state,
            "limits",
            windows=windows,
            status=state.limits_status,
            reset=state.limits_reset,
            overage=state.overage_in_use,
        )

    def session_moved(self, session: str, endpoint: str) -> None:
        self._queue("session", (session, endpoint))

    def _send(self, state: EndpointState, kind: str, **fields: Any) -> None:
        self._queue("publish", {"from": self.id, "endpoint": state.name, "kind": kind, **fields})

    def _queue(self, what: str, payload: Any) -> None:
        if not self.up:
            return  # a reconnect publishes the cooldowns that matter
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait((what, payload))

    async def _write(self) -> None:
        """One writer, so that what this instance says arrives in the order it said it."""
        while True:
            what, payload = await self.queue.get()
            try:
                if what == "publish":
                    message = json.dumps(payload)
                    key = f"{self.prefix}endpoint:{payload['endpoint']}"
                    pipe = self.redis.pipeline(transaction=False)
                    pipe.publish(self.channel, message)
                    if payload["kind"] == "cool":  # kept for instances that start or come back later
                        pipe.set(key, message, ex=max(1, int(payload["until"] - time.time())))
                    elif payload["kind"] == "clear":
                        pipe.delete(key)
                    await self._call(pipe.execute())
                elif what == "session":
                    session, endpoint = payload
                    await self._call(self.redis.set(f"{self.prefix}session:{session}", endpoint, ex=3600))
                else:  # the probe lock, if it is still this instance's
                    key = f"{self.prefix}probe:{payload}"
                    if await self._call(self.redis.get(key)) == self.id:
                        await self._call(self.redis.delete(key))
            except Exception as e:
                self._mark_down(e)

    # -- what the others say ------------------------------------------------------------------

    def _apply(self, data: object) -> None:
        try:
            message = json.loads(str(data))
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("from") == self.id:
            return
        state = self.pool.get(message.get("endpoint"))
        if state is None:
            return
        kind = message.get("kind")
        if kind == "cool" and isinstance(message.get("until"), int | float):
            state.probe_in_flight = False
            state.cool(float(message["until"]), str(message.get("reason") or "shared"))
            state.last_error = str(message.get("error") or state.last_error)
            state.last_error_at = message.get("since") or state.last_error_at
        elif kind == "clear":
            if state.closed_until() is None:
                state.cooling_until, state.cooling_reason = 0.0, ""
            state.probe_in_flight = False
        elif kind == "limits" and isinstance(message.get("windows"), dict):
            windows = {
                str(name): Window(*values)
                for name, values in message["windows"].items()
                if isinstance(values, list) and len(values) == 3
            }
            status = message.get("status")
            state.observe(Reading(windows, status, message.get("reset"), bool(message.get("overage"))))

    async def _load(self) -> None:
        """Cooldowns set while this instance was away (or not yet started)."""
        names = [s.name for s in self.pool]
        keys = [f"{self.prefix}endpoint:{name}" for name in names]
        for data in await self._call(self.redis.mget(keys)) if keys else []:
            if data:
                self._apply(data)

    # -- asked on the way ---------------------------------------------------------------------

    async def claim_probe(self, name: str) -> bool:
        if not self.up:
            return True
        key = f"{self.prefix}probe:{name}"
        try:
            if await self._ask(self.redis.set(key, self.id, nx=True, px=int(self.probe_ttl * 1000))):
                return True
            # Still ours: this instance's last probe has ended, its release is on the way.
            return bool(await self._ask(self.redis.get(key)) == self.id)
        except Exception:
            return True  # no answer in time: this instance probes for itself

    def release_probe(self, name: str) -> None:
        self._queue("release", name)

    async def session(self, session: str) -> str | None:
        if not self.up:
            return None
        try:
            return await self._ask(self.redis.get(f"{self.prefix}session:{session}"))
        except Exception:
            return None  # no answer in time: routing decides afresh

    # -- spend (cost/budgets.py) ---------------------------------------------------------------

    async def add_spend(
        self, adds: Mapping[str, tuple[float, int]], keys: Sequence[str]
    ) -> list[float | None] | None:
        """Adds each amount to its key (`INCRBYFLOAT`; the key kept that many seconds), then
        reads `keys`: the fleet's sums. None when the store is away: nothing was added."""
        if not self.up:
            return None
        pipe = self.redis.pipeline(transaction=False)
        for key, (amount, ttl) in adds.items():
            pipe.incrbyfloat(self.prefix + key, amount)
            pipe.expire(self.prefix + key, ttl)
        pipe.mget([self.prefix + key for key in keys])
        try:
            *_, values = await self._call(pipe.execute())
        except Exception as e:
            self._mark_down(e)
            return None
        return [_amount(value) for value in values]

    # -- heartbeat, budget, fleet -------------------------------------------------------------

    def _instance_key(self, instance: str) -> str:
        return f"{self.prefix}instance:{instance}"

    async def _heartbeat(self) -> None:
        while True:
            if self.up:
                try:
                    document = json.dumps({"id": self.id, "at": time.time(), **self.describe()})
                    pipe = self.redis.pipeline(transaction=False)
                    pipe.set(self._instance_key(self.id), document, ex=HEARTBEAT_TTL)
                    pipe.sadd(self.instances, self.id)
                    pipe.smembers(self.instances)
                    *_, members = await self._call(pipe.execute())
                    await self._read_others(sorted(members))
                except Exception as e:
                    self._mark_down(e)
            await asyncio.sleep(HEARTBEAT_EVERY)

    async def _read_others(self, members: list[str]) -> None:
        documents = await self._call(self.redis.mget([self._instance_key(m) for m in members]))
        others = {}
        for member, data in zip(members, documents, strict=True):
            if data is None:
                await self._call(self.redis.srem(self.instances, member))
                continue
            with contextlib.suppress(ValueError):
                others[member] = json.loads(data)
        self.others = others

    def budget_elsewhere(self) -> tuple[int, int]:
        fresh = time.time() - BUDGET_FRESH
        requests = retries = 0
        if self.up:
            for instance, document in self.others.items():
                budget = document.get("budget")
                if instance != self.id and document.get("at", 0) >= fresh and isinstance(budget, list):
                    requests, retries = requests + int(budget[0]), retries + int(budget[1])
        return requests, retries

    async def fleet(self) -> list[dict[str, Any]] | None:
        if not self.up:
            return None
        try:
            members = sorted(await self._call(self.redis.smembers(self.instances)))
            await self._read_others(members)
        except Exception as e:
            self._mark_down(e)
            return None
        return [self.others[m] for m in members if m in self.others]


def _amount(value: str | None) -> float | None:
    """A spend key's value as a number; None for a key that is not there (or not a number)."""
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def redis_clients(url: str, timeout: float) -> tuple[Any, Any]:
    """redis-py's clients for a fleet's Redis: one for calls, one to subscribe with."""
    from redis import asyncio as aioredis  # only a fleet needs it
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # One retry at once (a pooled connection Redis closed), no more: redis-py's own backoff
    # would spend a call's whole time bound on a Redis that is away, and delay the
    # reconnect loop of RedisState, which is what paces the attempts.
    retry = Retry(NoBackoff(), 1)
    # RESP2: what every Redis speaks
    calls = aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
        retry=retry,
        protocol=2,
    )
    # Subscribing blocks on reads: no read timeout there.
    listener = aioredis.Redis.from_url(
        url, socket_connect_timeout=timeout, decode_responses=True, retry=retry, protocol=2
    )
    return calls, listener


def shared_state(
    backend: str,
    settings: RedisSettings,
    events: EventLog,
    probe_ttl: float,
    workers_store: str | None = None,
) -> LocalState:
    """Redis when configured; else, for one proxy's workers, their supervisor's store; else none."""
    if backend == "redis":
        return RedisState(settings, events, probe_ttl)
    if workers_store:
        return RedisState(dataclasses.replace(settings, url=workers_store), events, probe_ttl, "workers")
    return LocalState()
