"""Handing the port to a new process: `ccf restart` with no refused connection and no cut stream.

Every proxy that `ccf start` or `ccf dev` runs (one process, or a supervisor of workers)
answers on a control socket, `<home>/run/<pid>.sock`, and `<home>/run/port-<port>.sock`
points at the one that holds that port now. A successor (the same code or a newer version, started by
`ccf restart`) connects to it and says, one JSON line at a time:
1. `hello`: it receives the listening socket (SCM_RIGHTS, as the supervisor passes
   connections to its workers) and the state to start from, and serves on that socket
   beside the old process, so no connection is refused;
2. `retire`, once for each unit of capacity it has ready (itself, or each of its workers):
   the old process stops one of its own (the last one stops accepting), which finishes
   every request and stream it carries, up to `server.drainSeconds`. The answer says how
   many of the old process's own still take connections;
3. `done`, once `run/port-<port>.sock` points at the successor.
A successor that disconnects before `done` (it crashed, or was killed) gives everything
back: the old process takes connections again. `status` answers anyone (`ccf status`,
`ccf restart`) with what a process carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ..config import default_config_path
from ..logs import EventLog

ENV_TAKEOVER = "CCF_TAKEOVER"  # set by `ccf restart`: the control socket of the process to replace
TIMEOUT = 10.0  # for an answer on the control socket; `retire` answers at once
LINE_LIMIT = 1 << 20
BACKLOG = 1024
PATH_LIMIT = 107  # bytes of a Unix socket's address

log = logging.getLogger(__name__)


class HandoverError(Exception):
    """The control socket did not answer as a proxy does."""


def home(env: Mapping[str, str] | None = None) -> Path:
    """ccf's home: `$CLAUDE_FALLBACK_HOME`, else `~/.claude-code-fallback`."""
    return default_config_path(os.environ if env is None else env).parent


def run_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the control sockets are: `<home>/run`, or a directory of this user's under the
    temporary directory when that path is too long for a Unix socket's address."""
    run = home(env) / "run"
    if len(str(run)) <= PATH_LIMIT - 24:
        return run
    digest = hashlib.sha256(str(run).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"ccf-{os.getuid()}-{digest}"


def control_path(port: int, env: Mapping[str, str] | None = None) -> Path:
    """Where the process that holds `port` now answers."""
    return run_dir(env) / f"port-{port}.sock"


def own_path(pid: int, env: Mapping[str, str] | None = None) -> Path:
    return run_dir(env) / f"{pid}.sock"


def all_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """Every process's control socket in this home, the draining ones included."""
    return sorted(run_dir(env).glob("[0-9]*.sock"))


class Holder(Protocol):
    """What a process that holds the port offers its successor."""

    def hello(self) -> tuple[dict[str, Any], socket.socket]:
        """What the successor starts from, and the listening socket."""

    async def retire(self) -> int:
        """Stops one unit of this process's capacity; how many still take connections."""

    def resume(self) -> None:
        """The successor left before `done`: take connections again."""

    def released(self) -> None:
        """The successor holds the port for good."""

    def status(self) -> dict[str, Any]:
        """What this process is and carries, for `ccf status`."""


class Control:
    """This process's control socket: answers a successor and `ccf status`."""

    def __init__(self, holder: Holder, port: int) -> None:
        self.holder = holder
        self.port = port
        self.path = own_path(os.getpid())
        self.listening: socket.socket | None = None
        self.serving: asyncio.Task[None] | None = None
        self.talks: set[asyncio.Task[None]] = set()

    def start(self) -> bool:
        """Listens on `run/<pid>.sock`; False (and a log line) where it cannot."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            folder = self.path.parent.stat()
            if folder.st_uid != os.getuid() or folder.st_mode & 0o077:  # others could take the port
                raise OSError(f"{self.path.parent} must be this user's alone (chmod 700)")
            forget_the_dead(self.path.parent)
            self.path.unlink(missing_ok=True)
            listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listening.bind(str(self.path))
            os.chmod(self.path, 0o600)
        except OSError as e:
            log.warning("claude-code-fallback: no control socket at %s (%s); no `ccf restart`", self.path, e)
            return False
        listening.listen(8)
        listening.setblocking(False)
        self.listening = listening
        self.serving = asyncio.ensure_future(self.accept())
        return True

    def publish(self) -> None:
        """Points `run/port-<port>.sock` at this process: from now on `ccf restart` replaces it."""
        if self.listening is None:
            return
        link = control_path(self.port)
        staged = link.with_name(f"{link.name}.{os.getpid()}")
        staged.unlink(missing_ok=True)
        staged.symlink_to(self.path.name)
        staged.replace(link)

    def stop(self) -> None:
        if self.serving is not None:
            self.serving.cancel()
        for talk in list(self.talks):
            talk.cancel()
        if self.listening is None:
            return
        self.listening.close()
        self.path.unlink(missing_ok=True)
        link = control_path(self.port)
        with contextlib.suppress(OSError):
            if os.readlink(link) == self.path.name:
                link.unlink()

    async def accept(self) -> None:
        assert self.listening is not None
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(self.listening)
            talk = asyncio.ensure_future(self.talk(connection))
            self.talks.add(talk)
            talk.add_done_callback(self.talks.discard)

    async def talk(self, connection: socket.socket) -> None:
        """One peer's requests, a line each, until it leaves."""
        loop = asyncio.get_running_loop()
        retired = done = False
        buffer = b""
        with connection:
            connection.setblocking(False)
            try:
                while True:
                    while b"\n" not in buffer:
                        if not (data := await loop.sock_recv(connection, 65536)) or len(buffer) > LINE_LIMIT:
                            return
                        buffer += data
                    line, buffer = buffer.split(b"\n", 1)
                    op = str(json.loads(line).get("op"))
                    fds: list[int] = []
                    if op == "hello":
                        reply, listener = self.holder.hello()
                        fds = [listener.fileno()]
                    elif op == "retire":
                        retired = True
                        reply = {"left": await self.holder.retire()}
                    elif op == "done":
                        done = True
                        self.holder.released()
                        reply = {"ok": True}
                    else:
                        reply = self.holder.status()
                    await send(connection, reply, fds)
            except (OSError, ValueError, AttributeError):
                return
            finally:
                if retired and not done:
                    self.holder.resume()


def forget_the_dead(folder: Path) -> None:
    """Removes the control sockets of processes that are gone (killed, not stopped)."""
    for path in folder.glob("[0-9]*.sock"):
        try:
            os.kill(int(path.stem), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, OSError):
            pass  # alive (another user's pid), or not a pid


async def send(connection: socket.socket, reply: dict[str, Any], fds: list[int]) -> None:
    data = json.dumps(reply).encode() + b"\n"
    if fds:  # a short line with its descriptor: a Unix socket takes it whole
        socket.send_fds(connection, [data], fds)
    else:
        await asyncio.get_running_loop().sock_sendall(connection, data)


class Peer:
    """The other side of a control socket, from a successor or a command: blocking calls."""

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.settimeout(timeout)
        try:
            self.socket.connect(str(path))
        except OSError:
            self.socket.close()
            raise
        self.buffer = b""

    def ask(self, op: str) -> tuple[dict[str, Any], list[int]]:
        self.socket.sendall(json.dumps({"op": op}).encode() + b"\n")
        fds: list[int] = []
        while b"\n" not in self.buffer:
            data, got, _, _ = socket.recv_fds(self.socket, 65536, 4)
            if not data:
                raise HandoverError("the control socket closed without an answer")
            fds += got
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise HandoverError(f"the control socket answered {line[:80]!r}") from e
        if not isinstance(reply, dict):
            raise HandoverError(f"the control socket answered {line[:80]!r}")
        return reply, fds

    def close(self) -> None:
        self.socket.close()


def status_of(path: Path) -> dict[str, Any] | None:
    """What the process behind `path` says of itself; None when none answers (it is gone)."""
    try:
        peer = Peer(path, timeout=2.0)
    except OSError:
        return None
    try:
        return peer.ask("status")[0]
    except (OSError, HandoverError):
        return None
    finally:
        peer.close()


class Predecessor:
    """The process a successor replaces, reached through its control socket."""

    def __init__(self, peer: Peer, hello: dict[str, Any], listener: socket.socket) -> None:
        self.peer = peer
        self.hello = hello
        self.listener = listener
        self.left: int | None = None

    @classmethod
    def reach(cls, path: str) -> Predecessor:
        """Connects and says hello; raises OSError or HandoverError when that fails."""
        peer = Peer(Path(path))
        try:
            hello, fds = peer.ask("hello")
            if len(fds) != 1:
                raise HandoverError("the running proxy sent no listening socket")
        except BaseException:
            peer.close()
            raise
        return cls(peer, hello, socket.socket(fileno=fds[0]))

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.hello["address"]
        return str(host), int(port)

    @property
    def carried(self) -> dict[str, Any]:
        """The state the old process hands over (its endpoints' cooldowns, its sessions...)."""
        return dict(self.hello.get("carry") or {})

    async def retire(self) -> int:
        """Asks the old process to stop one unit of its capacity; 0 once it is gone."""
        try:
            reply, _ = await asyncio.to_thread(self.peer.ask, "retire")
            self.left = int(reply["left"])
        except (OSError, HandoverError, KeyError, ValueError):
            self.left = 0  # it died: there is nothing left to retire
        return self.left

    async def retire_all(self) -> None:
        while self.left != 0:
            await self.retire()

    async def done(self) -> None:
        with contextlib.suppress(OSError, HandoverError):
            await asyncio.to_thread(self.peer.ask, "done")
        self.peer.close()

    async def hand_over(self, control: Control, events: EventLog) -> None:
        """The end of a takeover: what is left of the old process retires, `control` becomes
        the port's (before `done`, so that a restart never finds nobody), and the old one
        goes once idle."""
        await self.retire_all()
        control.publish()
        await self.done()
        events.event("took_over", pid=self.hello.get("pid"), version=self.hello.get("version"))


def take_port(where: tuple[str, int], takeover: str) -> tuple[socket.socket, Predecessor | None]:
    """The listening socket: the predecessor's at `takeover` when it listens where this
    process will, else a new one. Exits, saying why, when neither can be had."""
    predecessor = None
    if takeover:
        try:
            predecessor = Predecessor.reach(takeover)
        except (OSError, HandoverError) as e:
            print(f"claude-code-fallback: cannot take over from {takeover}: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    if predecessor is not None and predecessor.address == where:
        return predecessor.listener, predecessor
    if predecessor is not None:  # the port changed: the old one stops once this one serves
        predecessor.listener.close()
    try:
        return bind(*where), predecessor
    except OSError as e:
        print(f"claude-code-fallback: cannot listen on {where[0] or '*'}:{where[1]}: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, as mitmproxy would open it: every interface when `host` is empty."""
    if not host and socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=BACKLOG)
    passive = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return socket.create_server((str(passive[0][4][0]), port), family=passive[0][0], backlog=BACKLOG)
