"""What `ccf restart`, `ccf stop` and `ccf status` ask of running proxies through their control sockets.

The protocol itself is fleet/handover.py's; these are the command line's blocking
questions: which process holds a port, which ones still drain, and whether a successor
has taken the port over.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..fleet import handover

POLL_INTERVAL = 0.05


def holder(ports: Iterable[int], wait: float = 0.0) -> tuple[Path, dict[str, Any]] | None:
    """The control socket and status of the process that holds the first of `ports` that one
    holds, waiting up to `wait` seconds for one to answer."""
    end = time.monotonic() + wait
    while True:
        for port in ports:
            path = handover.control_path(port)
            if (status := handover.status_of(path)) is not None:
                return path, status
        if time.monotonic() >= end:
            return None
        time.sleep(POLL_INTERVAL * 4)


def draining(port: int, besides: int | None = None) -> list[dict[str, Any]]:
    """The processes of this home that still finish answers for `port`, but `besides`."""
    found = []
    for path in handover.all_paths():
        status = handover.status_of(path)
        if status is None or status.get("pid") == besides or status.get("state") == "serving":
            continue
        if list(status.get("address") or ())[1:] == [port]:
            found.append(status)
    return found


def wait_for_successor(process: subprocess.Popen[bytes], port: int, deadline: float) -> dict[str, Any] | None:
    """The successor's status once it holds `port`; None when it exits or the deadline passes."""
    end = time.monotonic() + deadline
    path = handover.control_path(port)
    while process.poll() is None and time.monotonic() < end:
        status = handover.status_of(path)
        if status is not None and status.get("pid") == process.pid:
            return status
        time.sleep(POLL_INTERVAL)
    return None


def carried(status: dict[str, Any]) -> str:
    """What a process still carries, in words."""
    if "streams" in status:
        return f"{status['streams']} streams and {status.get('choosing', 0)} requests in flight"
    return f"{status.get('connections', 0)} client connections open"
