"""How the proxy process ends: a stop, or a retirement in favour of a successor.

A sibling addon of `Fallback`, as `Lifecycle` is. A stop (the first SIGTERM) refuses new
work with a 503 that clients retry and lets answers in flight finish, up to
`server.drainSeconds`. A retirement (a successor holds the port: `ccf restart`, or a
supervisor's rolling restart) serves every request that still reaches this process but
closes each client connection after its answer, so that the next request goes to the
successor; a successor that leaves before it holds the port for good resumes this
process instead. Either way the process exits once it carries nothing. A second SIGTERM
ends what is left at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any, Optional, Protocol

from mitmproxy import ctx, http

from ..config import Config
from ..logs import EventLog
from ..request import Failure
from ..sse import error_body

# A retiring process is idle this long before it goes: a request already on its way (in a
# socket's buffer, or a connection a supervisor just handed over) is served rather than cut.
QUIET = 0.5
STOPPING, RETIRING = "stopping", "retiring"  # how a process drains: no one takes over, or a successor has
SHUTTING_DOWN = Failure(
    503,
    (
        (b"content-type", b"application/json"),
        (b"retry-after", b"1"),
        (b"x-should-retry", b"true"),
        (b"connection", b"close"),
    ),
    error_body("overloaded_error", "claude-code-fallback is shutting down; try again in a moment."),
    "claude-code-fallback is shutting down",
)


class Carrying(Protocol):
    """What the drain needs of the request path (the `Fallback` addon)."""

    def current(self) -> Config | None: ...

    def busy(self) -> dict[str, int]: ...

    def spawn(self, coroutine: Any) -> None: ...


class Drain:
    """Whether the process serves, stops or retires, and its exit once it carries nothing."""

    def __init__(self, serving: Carrying, events: EventLog) -> None:
        self.serving = serving
        self.events = events
        self.draining = ""  # STOPPING or RETIRING once the process drains
        self.closing = False  # the drain is over: nothing new is served
        self.drain_deadline: float | None = None  # Unix time the drain ends what is left
        self.handed_over = asyncio.Event()  # a retiring process's successor holds the port for good
        self.terms = 0  # SIGTERMs received
        self.drains = 0  # drains begun: a resumed one's wait stops

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fallback_shutdown_grace",
            Optional[int],  # noqa: UP045 - mitmproxy's options know typing.Optional, not `int | None`
            None,
            """
            Seconds that in-flight responses get to finish after SIGTERM or a restart before
            the proxy ends them; unset, the config's server.drainSeconds.
            """,
        )

    def running(self) -> None:
        # Replaces mitmproxy's own SIGTERM handler: streams in flight get to finish first.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.terminate)

    def terminate(self) -> None:
        """SIGTERM: the first drains, then the process exits; a second ends what is left at once."""
        self.terms += 1
        if self.terms > 1:
            self.events.event("stopping_now", logging.WARNING, **self.serving.busy())
            self.closing = True
            ctx.master.shutdown()
        elif self.draining:
            self.release()  # a retiring process waits for no successor any more
        else:
            self.begin(STOPPING)

    def retire(self, released: bool = False) -> None:
        """A successor serves the port: finish what this process carries, then exit (once the
        successor holds the port for good: at once when `released`)."""
        if released:
            self.release()
        if not self.draining:
            self.begin(RETIRING)

    def resume(self) -> None:
        """The successor left before it held the port for good: serve as before."""
        if self.draining == RETIRING and not self.closing:
            self.draining, self.drain_deadline = "", None
            self.events.event("resumed", logging.WARNING)

    def release(self) -> None:
        """The successor holds the port for good: once idle, this process may go."""
        self.handed_over.set()

    def let_go(self, flow: http.HTTPFlow) -> None:
        """While draining, the client's connection closes after this answer: its next request
        goes to whoever holds the port now (HTTP/2 has no such header)."""
        if self.draining and flow.response and flow.request.http_version.startswith("HTTP/1"):
            flow.response.headers["connection"] = "close"

    def refusal(self) -> Failure | None:
        """Why new work is refused now: a stop, with no one to take over, or a drain that is over."""
        return SHUTTING_DOWN if self.draining == STOPPING or self.closing else None

    def begin(self, how: str) -> None:
        self.draining = how
        self.drains += 1
        seconds = self.drain_seconds()
        self.drain_deadline = time.time() + seconds
        if how == STOPPING:
            self.handed_over.set()  # no successor to wait for
        busy = self.serving.busy()
        # A stop that waits on answers is worth a line at the default level: it says why
        # the process is still there.
        self.events.event(
            "draining",
            logging.WARNING if any(busy.values()) else logging.INFO,
            reason="stop" if how == STOPPING else "restart",
            active_streams=busy["streams"],
            choosing=busy["choosing"],
            grace_seconds=seconds,
        )
        self.serving.spawn(self.shutdown_when_idle(self.drains, time.monotonic() + seconds))

    def drain_seconds(self) -> float:
        grace = ctx.options.fallback_shutdown_grace
        config = self.serving.current()
        if grace is not None:
            return float(grace)
        return config.server.drain_seconds if config else 0.0

    async def shutdown_when_idle(self, drain: int, deadline: float) -> None:
        quiet = QUIET if self.draining == RETIRING else 0.0  # a stop refuses what comes late anyway
        quiet_since = time.monotonic()
        while (now := time.monotonic()) < deadline:
            if any(self.serving.busy().values()) or not self.handed_over.is_set():
                quiet_since = now
            elif now - quiet_since >= quiet:
                break
            await asyncio.sleep(0.05)
            if self.drains != drain or not self.draining:
                return  # resumed
        self.closing = True
        busy = self.serving.busy()
        self.events.event(
            "stopping",
            logging.WARNING if any(busy.values()) else logging.INFO,
            cut_streams=busy["streams"],
            cut_requests=busy["choosing"],
        )
        ctx.master.shutdown()

    def standing(self) -> dict[str, Any]:
        """How this process stands, for `/health`, `/readyz` and `ccf status`."""
        return {
            "state": self.draining or "serving",
            "drainDeadline": self.drain_deadline,
            **self.serving.busy(),
        }
