"""A lean master serving alone, in a restart: the port held, handed to a successor, or taken over.

`Standing` is what this process offers a successor through its control socket
(fleet/handover.py): the listening socket, the endpoints' cooldowns and sessions, and its
retirement, which stops the accept loop and drains (ops/drain.py). `hold` runs for
the process's life: it takes over from a predecessor when there is one, then answers the
next successor.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from .. import __version__
from ..fleet import workers
from ..fleet.handover import ENV_TAKEOVER, Control, Predecessor, take_port
from ..fleet.listener import Listener
from ..modes import listen_on
from ..proxy import Fallback
from ..state import carry


class Standing:
    """This process, as its successor sees it."""

    def __init__(
        self,
        fallback: Fallback,
        listener: Listener,
        address: tuple[str, int],
        predecessor: Predecessor | None,
    ) -> None:
        self.fallback = fallback
        self.listener = listener
        self.address = address
        self.predecessor = predecessor  # the process this one takes the port from, if any
        self.control = Control(self, address[1])

    def hello(self) -> tuple[dict[str, Any], socket.socket]:
        runtime = self.fallback.runtime
        assert runtime is not None
        state = carry.snapshot(self.fallback.lasting.pool, runtime.router.sessions)
        return {**self.status(), "carry": state}, self.listener.socket

    async def retire(self) -> int:
        self.listener.pause()
        self.fallback.drain.retire()
        return 0

    def resume(self) -> None:
        self.fallback.drain.resume()
        self.listener.resume()

    def released(self) -> None:
        self.fallback.drain.release()

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "address": list(self.address),
            "workers": 1,
            **self.fallback.drain.standing(),
        }


def stand(specs: list[str], fallback: Fallback) -> Standing | None:
    """This process on the port the `--set` specs name, taken from the predecessor `ccf restart`
    names, if any; None for a worker (its supervisor holds the port) or without a port."""
    where = listen_on(workers.mode_options(specs), workers.settings(specs).get("listen_host", ""))
    if where is None or workers.ENV_LISTEN in os.environ:
        return None
    listener, predecessor = listen(where, os.environ.pop(ENV_TAKEOVER, ""))
    return Standing(fallback, listener, where, predecessor)


def listen(where: tuple[str, int], takeover: str) -> tuple[Listener, Predecessor | None]:
    """The port, taken from the predecessor at `takeover` if any, with mitmproxy's server made on
    it and fed by this process's own accept loop."""
    listening, predecessor = take_port(where, takeover)
    starting: set[asyncio.Task[None]] = set()
    listener = Listener(listening, lambda connection: None)

    def feed(serve: workers.Serve) -> None:
        def take(connection: socket.socket) -> None:
            task = asyncio.ensure_future(workers.serve_accepted(connection, serve))
            starting.add(task)  # held until it runs: the loop keeps only a weak reference
            task.add_done_callback(starting.discard)

        listener.take = take
        listener.resume()

    workers.serve_on(where[1], listening, feed)
    workers.tcp_only()
    return listener, predecessor


async def hold(standing: Standing) -> None:
    """Once this process serves: takes the port from `predecessor`, then answers the next successor."""
    fallback, predecessor = standing.fallback, standing.predecessor
    # The first to wait for `ready` (this runs before the port takes a connection), so the first
    # woken: the predecessor's cooldowns are in place before any request is served.
    await fallback.ready.wait()
    standing.control.start()
    if predecessor is not None:
        runtime = fallback.runtime
        assert runtime is not None
        carry.restore(predecessor.carried, fallback.lasting.pool, runtime.router.sessions)
        await predecessor.hand_over(standing.control, fallback.lasting.events)
    else:
        standing.control.publish()
