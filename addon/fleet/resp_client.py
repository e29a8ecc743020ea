"""A Redis client for the workers' own store (hub.py): the calls shared_state.py makes, no more.

Workers share state through `shared.RedisState`, as a fleet does. A fleet's Redis may
need TLS, a password or a cluster, so a fleet uses redis-py; the workers' store is a
private UNIX socket of their supervisor's, and redis-py (about 75 modules, 7.6 MB a
worker) would be most of what a worker holds beyond one process. This client sends the
same commands over RESP2 and gives the same results as redis-py's asyncio client with
`decode_responses=True`: `ping` True, `set` True or None, `get` a str or None, `mget` a
list, `smembers` a set, `incrbyfloat` a float, `expire` a bool, counts as ints, an error
reply raised as `ResponseError`.

A call waits for its reply on a connection of its own (one opened when none is idle), so
a call cancelled by its caller's timeout leaves no reply behind for the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .hub import array, bulk


class ResponseError(Exception):
    """An error reply."""


Command = tuple[str | int, ...]


def encode(*commands: Command) -> bytes:
    """Commands as the store reads them: each an array of bulk strings."""
    return b"".join(array([bulk(str(arg)) for arg in command]) for command in commands)


async def read_reply(reader: asyncio.StreamReader, line: bytes | None = None) -> Any:
    """One RESP2 reply (starting with `line`, if read), decoded as UTF-8; an error reply is
    returned as a ResponseError."""
    if line is None:
        line = await reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("the store closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return ResponseError(rest.decode().removeprefix("ERR "))  # as redis-py words it
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else (await reader.readexactly(size + 2))[:-2].decode()
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [await read_reply(reader) for _ in range(size)]
    raise ConnectionError(f"not a RESP reply: {line[:40]!r}")


def ok(reply: Any) -> bool | None:
    return True if reply == "OK" else None


RESULTS: dict[str, Callable[[Any], Any]] = {
    "PING": lambda reply: reply == "PONG",
    "SET": ok,
    "SMEMBERS": set,
    "INCRBYFLOAT": float,
    "EXPIRE": bool,
}


def result(command: Command, reply: Any) -> Any:
    if isinstance(reply, ResponseError):
        raise reply
    convert = RESULTS.get(str(command[0]))
    return reply if convert is None else convert(reply)


class Commands:
    """The commands shared_state.py sends, each a `Command` given to `_send`."""

    def _send(self, command: Command) -> Any:
        raise NotImplementedError

    def execute_command(self, *args: str | int) -> Any:
        return self._send(args)

    def ping(self) -> Any:
        return self._send(("PING",))

    def get(self, key: str) -> Any:
        return self._send(("GET", key))

    def mget(self, keys: list[str]) -> Any:
        return self._send(("MGET", *keys))

    def set(
        self, key: str, value: str, ex: int | None = None, px: int | None = None, nx: bool = False
    ) -> Any:
        command: Command = ("SET", key, value)
        if ex is not None:
            command += ("EX", ex)
        if px is not None:
            command += ("PX", px)
        if nx:
            command += ("NX",)
        return self._send(command)

    def delete(self, *keys: str) -> Any:
        return self._send(("DEL", *keys))

    def incrbyfloat(self, key: str, amount: float) -> Any:
        return self._send(("INCRBYFLOAT", key, repr(amount)))

    def expire(self, key: str, seconds: int) -> Any:
        return self._send(("EXPIRE", key, seconds))

    def sadd(self, key: str, *members: str) -> Any:
        return self._send(("SADD", key, *members))

    def srem(self, key: str, *members: str) -> Any:
        return self._send(("SREM", key, *members))

    def smembers(self, key: str) -> Any:
        return self._send(("SMEMBERS", key))

    def publish(self, channel: str, message: str) -> Any:
        return self._send(("PUBLISH", channel, message))


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Client(Commands):
    """A RESP2 client of the workers' store, over its UNIX socket: pooled connections, the calls
    `shared_state` makes, with the results redis-py's asyncio client gives (`decode_responses=True`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.idle: list[Connection] = []

    @classmethod
    def from_url(cls, url: str) -> Client:
        parts = urlsplit(url)
        if parts.scheme != "unix" or not parts.path:
            raise ValueError(f"not a unix:// URL: {url}")
        return cls(parts.path)

    async def connect(self) -> Connection:
        return await asyncio.open_unix_connection(self.path)

    async def _send(self, command: Command) -> Any:
        return result(command, (await self.execute([command]))[0])

    async def execute(self, commands: list[Command]) -> list[Any]:
        """The replies to `commands`, sent at once on one connection."""
        reader, writer = self.idle.pop() if self.idle else await self.connect()
        try:
            writer.write(encode(*commands))
            replies = [await read_reply(reader) for _ in commands]
        except BaseException:
            writer.close()  # a reply may still be on its way: nobody else may read it
            raise
        self.idle.append((reader, writer))
        return replies

    def pipeline(self, transaction: bool = False) -> Pipeline:
        return Pipeline(self)

    def pubsub(self) -> PubSub:
        return PubSub(self)

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class Pipeline(Commands):
    """Commands queued, then sent together by `execute`; their results, or the first error."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.commands: list[Command] = []

    def _send(self, command: Command) -> Pipeline:
        self.commands.append(command)
        return self

    async def execute(self) -> list[Any]:
        commands, self.commands = self.commands, []
        replies = await self.client.execute(commands)
        return [result(command, reply) for command, reply in zip(commands, replies, strict=True)]


class PubSub:
    """A subscription on a connection of its own, closed when the `async with` ends."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.connection: Connection | None = None

    async def __aenter__(self) -> PubSub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            self.connection[1].close()
            self.connection = None

    async def subscribe(self, *channels: str) -> None:
        if self.connection is None:
            self.connection = await self.client.connect()
        self.connection[1].write(encode(("SUBSCRIBE", *channels)))

    async def get_message(self, ignore_subscribe_messages: bool = False, timeout: float = 0.0) -> Any:
        """The next message as redis-py gives it (`type`, `channel`, `data`), or None when
        none came within `timeout` seconds (or it confirmed a subscription, when ignored)."""
        if self.connection is None:
            raise ConnectionError("not subscribed")
        reader = self.connection[0]
        try:
            # Only the first line under the timeout: a reply cut short by it would leave the
            # rest to be read as the next one (a line not yet whole is left in the buffer).
            line = await asyncio.wait_for(reader.readline(), timeout)
        except TimeoutError:
            return None
        reply = await read_reply(reader, line)
        if isinstance(reply, ResponseError):
            raise reply
        if not isinstance(reply, list) or len(reply) != 3:
            raise ConnectionError(f"not a pub/sub message: {reply!r}"[:200])
        kind, channel, data = reply
        if kind == "subscribe" and ignore_subscribe_messages:
            return None
        return {"type": kind, "pattern": None, "channel": channel, "data": data}
