"""The proxy's listening socket, accepted on by this process until it hands the port over.

mitmproxy would open the port itself. `ccf start` and `ccf dev` open it first, so that the
very socket can go to a successor (`ccf restart`, handover.py) and this process can stop
accepting while it finishes what it carries: connections waiting in the socket's queue
then go to the successor, not to a refusal. Accepting is switched on and off with the
event loop's reader, never by cancelling a wait, so no accepted connection is dropped.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

ACCEPT_BATCH = 64  # connections taken per wake-up, as asyncio's own servers do


class Listener:
    """A listening socket whose connections go to `take` until `pause`."""

    def __init__(self, listening: socket.socket, take: Callable[[socket.socket], None]) -> None:
        self.socket = listening
        self.take = take
        self.accepting = False
        listening.setblocking(False)

    def pause(self) -> None:
        """Stops taking connections; those already queued wait for whoever else holds the socket."""
        if self.accepting:
            asyncio.get_running_loop().remove_reader(self.socket.fileno())
            self.accepting = False

    def resume(self) -> None:
        if not self.accepting:
            asyncio.get_running_loop().add_reader(self.socket.fileno(), self.accept)
            self.accepting = True

    def accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, or the client left already: the next one
                continue
            connection.setblocking(False)
            if connection.family != socket.AF_UNIX:
                # asyncio turns Nagle off only for a socket that says it is TCP, and one accepted
                # from `socket.create_server`'s says protocol 0: small answers would wait 40 ms
                # for the client's delayed ACK.
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.take(connection)
