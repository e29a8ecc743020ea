"""Upstream work done for a client, cancelled as soon as that client goes away.

While the `request` hook runs, mitmproxy holds the flow's own events (a client that
left shows up only after the hook returns), so the addon learns of the departure from
the `client_disconnected` hook instead: an HTTP/1 client that closes its side while it
waits for an answer has its connection closed by mitmproxy at once. The work for each
client runs as a task of its own so that this hook can cancel it; cancelling an
aiohttp request closes its connection, so the endpoint stops generating and billing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class ClientLeft(Exception):
    """The client went away before its work was done; the work was cancelled."""


class Departures:
    """Tasks running for each client connection, by `Client.id`."""

    def __init__(self) -> None:
        self.running: dict[str, set[asyncio.Future[Any]]] = {}

    async def run(self, client: str, work: Awaitable[T]) -> T:
        """Awaits `work`; raises ClientLeft when `left(client)` cancelled it."""
        task = asyncio.ensure_future(work)
        tasks = self.running.setdefault(client, set())
        tasks.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise ClientLeft from None
            raise  # we are being cancelled ourselves (shutdown)
        finally:
            tasks.discard(task)
            if not tasks and self.running.get(client) is tasks:
                del self.running[client]

    def left(self, client: str) -> int:
        """Cancels the work running for `client`; returns how many tasks were cancelled."""
        tasks = self.running.pop(client, set())
        for task in tasks:
            task.cancel()
        return len(tasks)
