"""Where spend is kept: totals per hour, client, endpoint and model, that outlive the proxy.

Each answer adds to an in-memory total for its hour (`UsageStore.add`: one dict update on
the event loop, nothing more). Once a second what was added goes to the store in one
write, off the request path; a write that fails is kept for the next one. `ccf usage` and
the status page read the store, so they count every process that writes to it.

- SQLite, by default: `usage.db` in ccf's home, or `state.usageFile`. One row per hour,
  client, endpoint and model, which each write adds to (an upsert), on a thread of its
  own. The file is in write-ahead-log mode, so a proxy's workers each write to it and
  `ccf usage` reads it while they do; one short transaction a second per process is far
  below what SQLite's one writer at a time sustains. (The workers' shared store, the
  supervisor's hub, keeps nothing across a restart: it would have to write this file too.)
- Redis, with `state.backend: redis`: one hash per hour, `<keyPrefix>usage:<hour>`, whose
  fields every instance adds to (HINCRBY, HINCRBYFLOAT), so a fleet has one total. A field
  is `<total> <JSON array of client, endpoint, model>`: an endpoint's or a model's name
  may hold any character. An hour is kept for `KEEP_DAYS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..config import Config, default_config_path
from ..logs import EventLog
from .spend import FIELDS, Spend, Totals

HOUR = 3600
FLUSH_EVERY = 1.0
READ_AGAIN_AFTER = 5.0  # seconds a read for the status page is shown before it is read again
KEEP_DAYS = 400
REDIS_TIMEOUT = 5.0
FILE_NAME = "usage.db"

Key = tuple[int, str, str, str]  # the hour (Unix time of its start), client, endpoint, model
Rows = dict[Key, Totals]


def hour_of(at: float) -> int:
    return int(at // HOUR * HOUR)


def merge(into: Rows, rows: Mapping[Key, Totals], since: int = 0) -> Rows:
    """`into` with `rows` (those of hours from `since` on) added, each total a copy."""
    for key, totals in rows.items():
        if key[0] >= since:
            into.setdefault(key, Totals()).add(totals)
    return into


class Backend(Protocol):
    """Where the totals go: SQLite or Redis."""

    async def write(self, rows: Rows) -> None: ...

    async def read(self, since: int) -> Rows: ...

    async def close(self) -> None: ...


class UsageStore:
    """Spend on its way to the store, written once a second; and the store as last read."""

    def __init__(self) -> None:
        self.pending: Rows = {}
        self.backend: Backend | None = None
        self.events = EventLog()
        self.lock = asyncio.Lock()  # a write and a read, one at a time: each read sees what went before
        self.flusher: asyncio.Task[None] | None = None
        self.failing = False
        self.read_since = 0
        self.last_read: Rows | None = None
        self.read_at = 0.0
        self.reading: asyncio.Task[None] | None = None

    def add(self, spend: Spend, at: float | None = None) -> None:
        key = (hour_of(time.time() if at is None else at), spend.client, spend.endpoint, spend.model)
        totals = Totals.of(spend)
        if (kept := self.pending.get(key)) is None:
            self.pending[key] = totals
        else:
            kept.add(totals)

    async def start(self, backend: Backend, events: EventLog) -> None:
        self.backend, self.events = backend, events
        self.flusher = asyncio.ensure_future(self._flush_every())

    async def stop(self) -> None:
        """The last write, then the store closed."""
        for task in (self.flusher, self.reading):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.flush()
        if self.pending:
            lost = sum(totals.requests for totals in self.pending.values())
            self.events.event("usage_unsaved", logging.WARNING, requests=lost)
        if self.backend is not None:
            await self.backend.close()

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush()

    async def flush(self) -> None:
        async with self.lock:
            await self._write()

    async def _write(self) -> None:
        if not self.pending or self.backend is None:
            return
        rows, self.pending = self.pending, {}
        try:
            await self.backend.write(rows)
        except Exception as e:
            merge(self.pending, rows)  # for the next write
            if not self.failing:
                self.failing = True
                error = f"{type(e).__name__}: {e}"[:200]
                self.events.event("usage_store_down", logging.WARNING, error=error, effect="kept for later")
        else:
            if self.failing:
                self.failing = False
                self.events.event("usage_store_up")

    def totals(self, since: int) -> Rows | None:
        """The totals of hours from `since` on: the store as last read, plus what is not
        written yet; None before the first read. A read older than `READ_AGAIN_AFTER`
        seconds, or of other hours, starts a new one for the next call."""
        stale = since != self.read_since or time.monotonic() - self.read_at > READ_AGAIN_AFTER
        if stale and (self.reading is None or self.reading.done()) and self.backend is not None:
            self.reading = asyncio.ensure_future(self._read(since))
        if self.last_read is None or since != self.read_since:
            return None
        return merge(merge({}, self.last_read), self.pending, since)

    async def _read(self, since: int) -> None:
        assert self.backend is not None
        async with self.lock:
            await self._write()
            try:
                rows = await self.backend.read(since)
            except Exception:
                return  # usage_store_down tells of a store that is away
            self.last_read, self.read_since, self.read_at = rows, since, time.monotonic()


# -- SQLite ---------------------------------------------------------------------------------

_COLUMNS = ", ".join(FIELDS)
_CREATE = (
    "CREATE TABLE IF NOT EXISTS usage (hour INTEGER NOT NULL, client TEXT NOT NULL, "
    "endpoint TEXT NOT NULL, model TEXT NOT NULL, "
    + ", ".join(
        f"{name} {'REAL' if name.endswith('_usd') else 'INTEGER'} NOT NULL DEFAULT 0" for name in FIELDS
    )
    + ", PRIMARY KEY (hour, client, endpoint, model)) WITHOUT ROWID"
)
_UPSERT = (
    f"INSERT INTO usage (hour, client, endpoint, model, {_COLUMNS}) "
    f"VALUES (?, ?, ?, ?, {', '.join('?' for _ in FIELDS)}) "
    "ON CONFLICT (hour, client, endpoint, model) DO UPDATE SET "
    + ", ".join(f"{name} = {name} + excluded.{name}" for name in FIELDS)
)
_SELECT = f"SELECT hour, client, endpoint, model, {_COLUMNS} FROM usage WHERE hour >= ?"


def connect(path: Path) -> sqlite3.Connection:
    """The usage file, made if it is not there yet; a writer that finds it locked waits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")  # in WAL mode, safe against a crash of the process
    connection.execute(_CREATE)
    return connection


def write_rows(connection: sqlite3.Connection, rows: Rows) -> None:
    values = [(*key, *(getattr(totals, name) for name in FIELDS)) for key, totals in rows.items()]
    with connection:  # one transaction
        connection.executemany(_UPSERT, values)


def read_rows(connection: sqlite3.Connection, since: int) -> Rows:
    return {
        (hour, client, endpoint, model): Totals(*counts)
        for hour, client, endpoint, model, *counts in connection.execute(_SELECT, (since,))
    }


class SqliteBackend:
    """The usage file, written and read on a thread of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="ccf-usage")
        self.connection: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self.connection is None:
            self.connection = connect(self.path)
        return self.connection

    async def write(self, rows: Rows) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self.thread, lambda: write_rows(self._connection(), rows)
        )

    async def read(self, since: int) -> Rows:
        return await asyncio.get_running_loop().run_in_executor(
            self.thread, lambda: read_rows(self._connection(), since)
        )

    async def close(self) -> None:
        def close() -> None:
            if self.connection is not None:
                self.connection.close()
                self.connection = None

        await asyncio.get_running_loop().run_in_executor(self.thread, close)
        self.thread.shutdown(wait=False)


def usage_path(config: Config, env: Mapping[str, str]) -> Path:
    """`state.usageFile` (relative to the config file's folder), else `usage.db` in ccf's home."""
    if config.state.usage_file:
        path = Path(config.state.usage_file).expanduser()
        if not path.is_absolute() and config.source:
            path = Path(config.source).parent / path
        return path
    return default_config_path(env).parent / FILE_NAME


# -- Redis ----------------------------------------------------------------------------------


def hour_key(prefix: str, hour: int) -> str:
    return f"{prefix}usage:{hour}"


def hours(since: int, now: float) -> list[int]:
    return list(range(since, hour_of(now) + HOUR, HOUR))


def redis_rows(hours: Iterable[int], replies: Iterable[Mapping[str, str]]) -> Rows:
    """The totals in the hashes of `hours` (HGETALL's replies, in the same order)."""
    rows: Rows = {}
    for hour, reply in zip(hours, replies, strict=True):
        for field, value in (reply or {}).items():
            name, _, who = field.partition(" ")
            if name not in FIELDS:
                continue  # written by a later version
            try:
                client, endpoint, model = json.loads(who)
                amount = float(value) if name.endswith("_usd") else int(value)
            except ValueError:
                continue
            totals = rows.setdefault((hour, str(client), str(endpoint), str(model)), Totals())
            setattr(totals, name, getattr(totals, name) + amount)
    return rows


class RedisBackend:
    """The fleet's totals in its Redis, through the shared state's client (redis-py's asyncio)."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    async def write(self, rows: Rows) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for (hour, client, endpoint, model), totals in rows.items():
            key, who = hour_key(self.prefix, hour), json.dumps([client, endpoint, model])
            for name in FIELDS:
                value = getattr(totals, name)
                if isinstance(value, float) and value:
                    pipe.hincrbyfloat(key, f"{name} {who}", value)
                elif value:
                    pipe.hincrby(key, f"{name} {who}", value)
        for hour in {key[0] for key in rows}:
            pipe.expire(hour_key(self.prefix, hour), KEEP_DAYS * 86400)
        await asyncio.wait_for(pipe.execute(), REDIS_TIMEOUT)

    async def read(self, since: int) -> Rows:
        wanted = hours(since, time.time())
        pipe = self.redis.pipeline(transaction=False)
        for hour in wanted:
            pipe.hgetall(hour_key(self.prefix, hour))
        return redis_rows(wanted, await asyncio.wait_for(pipe.execute(), REDIS_TIMEOUT))

    async def close(self) -> None:
        return None  # the shared state's client: it closes it


# -- reading it from outside the proxy -----------------------------------------------------


def read_store(config: Config, env: Mapping[str, str], since: int) -> tuple[str, Rows]:
    """The totals of hours from `since` on, read from the store `config` names directly (the
    proxy may be down); and where that store is, in words."""
    state = config.state
    if state.backend == "redis" and state.redis.url:
        import redis  # only a fleet needs it

        parts = urlsplit(state.redis.url)
        where = f"Redis at {parts.hostname or parts.path}" + (f":{parts.port}" if parts.port else "")
        client = redis.Redis.from_url(
            state.redis.url,
            decode_responses=True,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            protocol=2,
        )
        with contextlib.closing(client):
            wanted = hours(since, time.time())
            pipe = client.pipeline(transaction=False)
            for hour in wanted:
                pipe.hgetall(hour_key(state.redis.key_prefix, hour))
            return where, redis_rows(wanted, pipe.execute())
    path = usage_path(config, env)
    if not path.is_file():
        return str(path), {}
    with contextlib.closing(connect(path)) as connection:
        return str(path), read_rows(connection, since)


def grouped(rows: Rows, by: str | None) -> list[tuple[str | None, str | None, str | None, Totals]]:
    """The totals per client, endpoint and model, or per one of them (`by`); the names a
    grouping leaves out are None. In order of cost, the highest first."""
    groups: dict[tuple[str | None, str | None, str | None], Totals] = {}
    for (_, client, endpoint, model), totals in rows.items():
        names = (
            client if by in (None, "client") else None,
            endpoint if by in (None, "endpoint") else None,
            model if by in (None, "model") else None,
        )
        groups.setdefault(names, Totals()).add(totals)
    ordered = sorted(groups.items(), key=lambda item: (-item[1].cost_usd, -item[1].requests, str(item[0])))
    return [(*names, totals) for names, totals in ordered]
