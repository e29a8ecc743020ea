"""The store a proxy's workers share their state through when no Redis is configured.

Workers (`server.workers` > 1) share endpoint state as a fleet does (shared_state.py), through
Redis's protocol. Without a Redis of the user's, the supervisor runs this store on a
private UNIX socket. It speaks the part of Redis's protocol (RESP2) that shared_state.py uses,
with the same meaning, and answers anything else with an error: PING, SET (EX, PX, NX),
GET, MGET, DEL, INCRBYFLOAT, EXPIRE, SADD, SREM, SMEMBERS, PUBLISH and SUBSCRIBE. So the workers share state
through the code a fleet uses (with resp_client.py's client in place of redis-py), and a user
needs nothing more to run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any

SWEEP_EVERY = 60.0  # expired keys go at once when read; the sweep bounds what nobody reads

Reply = bytes


def bulk(value: str | bytes | None) -> Reply:
    if value is None:
        return b"$-1\r\n"
    data = value.encode() if isinstance(value, str) else value
    return b"$%d\r\n%b\r\n" % (len(data), data)


def array(items: list[Reply]) -> Reply:
    return b"*%d\r\n%b" % (len(items), b"".join(items))


def integer(value: int) -> Reply:
    return b":%d\r\n" % value


def error(message: str) -> Reply:
    return b"-ERR " + message.encode() + b"\r\n"


OK = b"+OK\r\n"
WRONG_TYPE = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"


def parse(buffer: bytearray) -> tuple[list[bytes], int] | None:
    """One command (an array of bulk strings) from the front of `buffer`: (arguments, bytes
    used), or None while it is incomplete. Raises ValueError on anything else."""
    end = buffer.find(b"\r\n")
    if end < 0:
        return None
    if buffer[:1] != b"*":
        raise ValueError("expected an array of bulk strings")
    count, position, args = int(buffer[1:end]), end + 2, []
    for _ in range(count):
        end = buffer.find(b"\r\n", position)
        if end < 0:
            return None
        if buffer[position : position + 1] != b"$":
            raise ValueError("expected a bulk string")
        length = int(buffer[position + 1 : end])
        start = end + 2
        if len(buffer) < start + length + 2:
            return None
        args.append(bytes(buffer[start : start + length]))
        position = start + length + 2
    return args, position


class Hub:
    """Keys with expiry, sets and channels, in memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.values: dict[bytes, bytes | set[bytes]] = {}
        self.expiry: dict[bytes, float] = {}
        self.channels: dict[bytes, set[_Connection]] = {}
        self.server: asyncio.AbstractServer | None = None
        self.sweeper: asyncio.Task[None] | None = None

    async def serve(self, listening: socket.socket) -> None:
        """Serves clients on an already listening UNIX socket."""
        self.server = await asyncio.get_running_loop().create_unix_server(
            lambda: _Connection(self), sock=listening
        )
        self.sweeper = asyncio.ensure_future(self.sweep())

    async def stop(self) -> None:
        if self.sweeper:
            self.sweeper.cancel()
        if self.server:
            self.server.close()

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            for key in list(self.expiry):
                self.live(key)

    def snapshot(self) -> dict[str, Any]:
        """Every live key, for a successor's hub: values as text, expiries as seconds left."""
        now = self.clock()
        keys: dict[str, Any] = {}
        for key in list(self.values):
            value = self.live(key)
            if value is None:
                continue
            shown: Any = (
                sorted(v.decode("latin-1") for v in value)
                if isinstance(value, set)
                else value.decode("latin-1")
            )
            left = self.expiry[key] - now if key in self.expiry else None
            keys[key.decode("latin-1")] = [shown, left]
        return keys

    def restore(self, keys: dict[str, Any]) -> None:
        now = self.clock()
        for key, (value, left) in keys.items():
            stored = (
                {v.encode("latin-1") for v in value} if isinstance(value, list) else value.encode("latin-1")
            )
            self.values[key.encode("latin-1")] = stored
            if left is not None:
                self.expiry[key.encode("latin-1")] = now + float(left)

    def live(self, key: bytes) -> bytes | set[bytes] | None:
        if (at := self.expiry.get(key)) is not None and at <= self.clock():
            self.forget(key)
        return self.values.get(key)

    def forget(self, key: bytes) -> bool:
        self.expiry.pop(key, None)
        return self.values.pop(key, None) is not None

    def members(self, key: bytes) -> set[bytes] | None:
        value = self.live(key)
        if value is None:
            value = self.values[key] = set()
        return value if isinstance(value, set) else None

    def execute(self, connection: _Connection, args: list[bytes]) -> Reply:
        name, rest = args[0].upper(), args[1:]
        command = COMMANDS.get(name)
        if command is None:
            return error(f"unknown command '{name.decode(errors='replace')}'")
        arity, run = command
        if len(rest) < arity:
            return error(f"wrong number of arguments for '{name.decode().lower()}' command")
        return run(self, connection, rest)

    def set(self, _: _Connection, args: list[bytes]) -> Reply:
        key, value, options = args[0], args[1], [a.upper() for a in args[2:]]
        ttl: float | None = None
        for i, option in enumerate(options):
            if option in (b"EX", b"PX"):
                try:
                    amount = int(options[i + 1])
                except (IndexError, ValueError):
                    return error("value is not an integer or out of range")
                ttl = amount / 1000 if option == b"PX" else amount
        if b"NX" in options and self.live(key) is not None:
            return bulk(None)
        self.values[key] = value
        self.expiry.pop(key, None)
        if ttl is not None:
            self.expiry[key] = self.clock() + ttl
        return OK

    def get(self, _: _Connection, args: list[bytes]) -> Reply:
        value = self.live(args[0])
        return WRONG_TYPE if isinstance(value, set) else bulk(value)

    def mget(self, _: _Connection, args: list[bytes]) -> Reply:
        values = [self.live(key) for key in args]
        return array([bulk(None if isinstance(v, set) else v) for v in values])

    def incrbyfloat(self, _: _Connection, args: list[bytes]) -> Reply:
        """Adds to a number kept as text, keeping the key's expiry, as Redis does."""
        key, value = args[0], self.live(args[0])
        if isinstance(value, set):
            return WRONG_TYPE
        try:
            total = float(value or b"0") + float(args[1])
        except ValueError:
            return error("value is not a valid float")
        if not math.isfinite(total):
            return error("increment would produce NaN or Infinity")
        self.values[key] = text = repr(total).removesuffix(".0").encode()
        return bulk(text)

    def expire(self, _: _Connection, args: list[bytes]) -> Reply:
        try:
            seconds = int(args[1])
        except ValueError:
            return error("value is not an integer or out of range")
        if self.live(args[0]) is None:
            return integer(0)
        self.expiry[args[0]] = self.clock() + seconds
        return integer(1)

    def delete(self, _: _Connection, args: list[bytes]) -> Reply:
        return integer(sum(self.forget(key) for key in args if self.live(key) is not None))

    def sadd(self, _: _Connection, args: list[bytes]) -> Reply:
        members = self.members(args[0])
        if members is None:
            return WRONG_TYPE
        before = len(members)
        members.update(args[1:])
        return integer(len(members) - before)

    def srem(self, _: _Connection, args: list[bytes]) -> Reply:
        members = self.members(args[0])
        if members is None:
            return WRONG_TYPE
        before = len(members)
        members.difference_update(args[1:])
        if not members:
            self.forget(args[0])
        return integer(before - len(members))

    def smembers(self, _: _Connection, args: list[bytes]) -> Reply:
        value = self.live(args[0])
        if isinstance(value, bytes):
            return WRONG_TYPE
        return array([bulk(m) for m in sorted(value or ())])

    def publish(self, _: _Connection, args: list[bytes]) -> Reply:
        channel, message = args
        listeners = self.channels.get(channel, set())
        for listener in listeners:
            listener.write(array([bulk(b"message"), bulk(channel), bulk(message)]))
        return integer(len(listeners))

    def subscribe(self, connection: _Connection, args: list[bytes]) -> Reply:
        return b"".join(self.follow(connection, channel, True) for channel in args)

    def unsubscribe(self, connection: _Connection, args: list[bytes]) -> Reply:
        channels = args or sorted(connection.subscribed)
        if not channels:
            return array([bulk(b"unsubscribe"), bulk(None), integer(0)])
        return b"".join(self.follow(connection, channel, False) for channel in channels)

    def follow(self, connection: _Connection, channel: bytes, on: bool) -> Reply:
        """Subscribes `connection` to `channel` (or not); the confirmation Redis sends."""
        listeners = self.channels.setdefault(channel, set())
        if on:
            listeners.add(connection)
            connection.subscribed.add(channel)
        else:
            listeners.discard(connection)
            connection.subscribed.discard(channel)
        kind = b"subscribe" if on else b"unsubscribe"
        return array([bulk(kind), bulk(channel), integer(len(connection.subscribed))])

    def ping(self, _: _Connection, args: list[bytes]) -> Reply:
        return bulk(args[0]) if args else b"+PONG\r\n"

    def ok(self, _: _Connection, args: list[bytes]) -> Reply:
        return OK  # CLIENT SETINFO and SELECT: nothing to do

    def left(self, connection: _Connection) -> None:
        for channel in connection.subscribed:
            self.channels.get(channel, set()).discard(connection)


COMMANDS: dict[bytes, tuple[int, Callable[[Hub, _Connection, list[bytes]], Reply]]] = {
    b"PING": (0, Hub.ping),
    b"CLIENT": (0, Hub.ok),
    b"SELECT": (1, Hub.ok),
    b"SET": (2, Hub.set),
    b"GET": (1, Hub.get),
    b"MGET": (1, Hub.mget),
    b"DEL": (1, Hub.delete),
    b"INCRBYFLOAT": (2, Hub.incrbyfloat),
    b"EXPIRE": (2, Hub.expire),
    b"SADD": (2, Hub.sadd),
    b"SREM": (2, Hub.srem),
    b"SMEMBERS": (1, Hub.smembers),
    b"PUBLISH": (2, Hub.publish),
    b"SUBSCRIBE": (1, Hub.subscribe),
    b"UNSUBSCRIBE": (0, Hub.unsubscribe),
}


class _Connection(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.subscribed: set[bytes] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = []
        try:
            while (command := parse(self.buffer)) is not None:
                args, used = command
                del self.buffer[:used]
                if args:
                    replies.append(self.hub.execute(self, args))
        except ValueError as e:
            replies.append(error(f"Protocol error: {e}"))
            self.write(b"".join(replies))
            if self.transport:
                self.transport.close()
            return
        self.write(b"".join(replies))

    def write(self, data: bytes) -> None:
        if data and self.transport and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.left(self)


def listening_socket(path: str) -> socket.socket:
    """The hub's socket, bound and listening before the workers start (they may connect
    before the supervisor's loop serves it: they wait in the backlog)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock.bind(path)
    sock.listen(128)
    sock.setblocking(False)
    return sock
