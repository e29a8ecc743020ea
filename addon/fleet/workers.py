"""Several processes serving one port (`server.workers` > 1), for `ccf start` and `ccf dev`.

One process of this proxy relays about one core's worth of requests: mitmproxy is pure
Python. With `server.workers: N`, lean/master.py starts this supervisor instead of a proxy:
- It binds the listening socket itself, so a port in use fails once and clearly, starts
  N workers, each a whole lean master, and accepts every connection itself: each goes,
  as a file descriptor over a Unix socket, to the serving worker with the fewest open
  connections (a worker still starting, after a crash, gets none). While none serves
  (at start), it answers a connection itself with a 503 at once, rather than let the
  client wait for the workers' start. Workers accepting
  from a shared socket split a burst of connections as the race of their wake-ups falls
  (16 at once landed all on one worker), and a client keeps its connection, so that
  split would stay.
- Workers share endpoint state as a fleet does (shared_state.py): through `state.redis.url`
  when `state.backend` is redis, else through a store the supervisor runs (hub.py).
- Their Prometheus metrics are summed across workers (prometheus-client's multiprocess
  mode, in a private directory), so /metrics on the port counts every worker. The status
  page's incidents come from every worker too (each writes its own beside the metrics).
- SIGTERM and SIGINT go to every worker, each drains as a single proxy does, and the
  supervisor exits when all have. SIGHUP, from a user or from a worker asked to reload,
  goes to every worker too. A worker that dies otherwise is started again, unless
  it keeps dying at once (a port or config problem), which stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mitmproxy.proxy import mode_specs

from .. import __version__
from ..config import Config, ConfigError
from ..logs import EventLog
from ..modes import listen_on, named_config
from ..sse import error_body
from .handover import ENV_TAKEOVER, Control, Predecessor, take_port
from .hub import Hub, listening_socket
from .listener import Listener

ENV_INDEX = "CCF_WORKER_INDEX"  # this worker's number, from 0
ENV_COUNT = "CCF_WORKERS"
ENV_LISTEN = "CCF_WORKER_LISTEN"  # port:fd:fd, the listening socket and the worker's channel
ENV_STATE = "CCF_WORKER_STATE_URL"  # the supervisor's hub, when there is no Redis
ENV_SUPERVISOR = "CCF_WORKER_SUPERVISOR"  # its pid: a worker whose supervisor is gone stops
ENV_INCIDENTS = "CCF_WORKER_INCIDENTS"  # where each leaves its incidents for the status page
ENV_ANNOUNCE = "CCF_ANNOUNCE"  # `ccf dev`: the line to print once the proxy serves
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"

# On a worker's channel: to it, a connection (its descriptor along); from it, once it
# serves, READY, then a byte for each of its connections that closed.
HANDED, READY, CLOSED = b"c", b"r", b"-"
RETIRE_SIGNAL = signal.SIGUSR1  # to a worker: a successor serves; finish what you carry, then exit
QUICK_DEATH = 5.0  # a worker that exits this soon after starting did not really start
QUICK_DEATHS = 3  # in a row: give up, it would only fail again
PARENT_CHECK = 1.0

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]  # mitmproxy's handler


def this_worker() -> dict[str, int]:
    """Which worker this process is, for /health: the only one when there are no workers."""
    return {
        "count": int(os.environ.get(ENV_COUNT, 1)),
        "index": int(os.environ.get(ENV_INDEX, 0)),
        "pid": os.getpid(),
    }


def unsupervised(config: Config) -> str | None:
    """Why `server.workers` does nothing here (mitmdump or mitmweb), if it asks for workers."""
    if config.server.workers > 1 and ENV_COUNT not in os.environ:
        return "server.workers applies to `ccf start` and `ccf dev`; this process serves alone"
    return None


def reload_all() -> bool:
    """In a worker: asks the supervisor to reload every worker, as a SIGHUP to it does.
    False when this process has no supervisor."""
    if ENV_SUPERVISOR not in os.environ:
        return False
    os.kill(int(os.environ[ENV_SUPERVISOR]), signal.SIGHUP)
    return True


def incidents_dir() -> Path | None:
    """In a worker: the directory where every worker leaves its recent incidents."""
    return Path(os.environ[ENV_INCIDENTS]) if ENV_INCIDENTS in os.environ else None


def log_context() -> dict[str, int]:
    """What a worker's log lines carry: its number."""
    return {"worker": int(os.environ[ENV_INDEX])} if ENV_INDEX in os.environ else {}


def settings(specs: list[str]) -> dict[str, str]:
    """`--set` values by option name (the last one wins, as in mitmproxy)."""
    return dict(spec.split("=", 1) for spec in specs if "=" in spec)


def planned_config(specs: list[str]) -> Config | None:
    """The config the proxy will load, or None when it does not load (the proxy itself
    then reports why, as it does without workers)."""
    options = settings(specs)
    try:
        return named_config(
            options.get("fallback_config"), options.get("fallback_log_level"), mode_options(specs)
        )
    except ConfigError:
        return None


def mode_options(specs: list[str]) -> list[str]:
    return [spec.split("=", 1)[1] for spec in specs if spec.startswith("mode=")]


def listen_on_inherited(listen: str) -> None:
    """In a worker: mitmproxy's listener on the proxy's port is the supervisor's socket, for
    its address, but the worker never accepts from it: its connections come over `channel`."""
    port, fd, channel_fd = (int(part) for part in listen.split(":"))
    channel = socket.socket(fileno=channel_fd)
    serve_on(port, socket.socket(fileno=fd), lambda serve: take_connections(channel, serve))
    if int(os.environ.get(ENV_INDEX, 0)) > 0:
        tcp_only()


def serve_on(port: int, shared: socket.socket, feed: Callable[[Serve], None]) -> None:
    """mitmproxy's server on `port` is made on `shared`, for its address, but never accepts
    from it: `feed` is given the server's handler and hands it each connection."""
    start_server = asyncio.start_server

    async def start_shared(client_connected_cb, host=None, port_=None, **kwargs):  # type: ignore[no-untyped-def]
        if port_ != port:
            return await start_server(client_connected_cb, host, port_, **kwargs)
        server = await start_server(client_connected_cb, sock=shared, **kwargs)
        asyncio.get_running_loop().remove_reader(shared.fileno())
        feed(client_connected_cb)
        return server

    asyncio.start_server = start_shared  # type: ignore[assignment]


async def serve_accepted(connection: socket.socket, serve: Serve) -> None:
    """Serves a connection accepted elsewhere as if mitmproxy's server had accepted it."""
    protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader(), serve)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, connection)


def take_connections(channel: socket.socket, serve: Serve) -> None:
    """In a worker: serves each connection the supervisor sends, and tells it when one closes."""
    loop = asyncio.get_running_loop()
    channel.setblocking(False)

    closed = 0  # connections closed that the supervisor has not been told of

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closed
        try:
            await serve(reader, writer)
        finally:
            closed += 1
            tell_closed()

    def tell_closed() -> None:
        """One byte per closed connection; what the channel cannot take now goes when it can."""
        nonlocal closed
        try:
            channel.send(CLOSED * closed)
        except BlockingIOError:
            loop.add_writer(channel.fileno(), tell_closed)
            return
        except OSError:
            pass  # the supervisor is gone
        closed = 0
        loop.remove_writer(channel.fileno())

    def receive() -> None:
        while True:
            try:  # a byte at a time: each carries its own descriptor
                _, fds, _, _ = socket.recv_fds(channel, 1, 1)
            except BlockingIOError:
                return
            except OSError:
                fds = []
            if not fds:  # the supervisor is gone: watch_supervisor stops this worker
                loop.remove_reader(channel.fileno())
                return
            task = loop.create_task(serve_accepted(socket.socket(fileno=fds[0]), counted))
            starting.add(task)  # held until it runs: the loop keeps only a weak reference
            task.add_done_callback(starting.discard)

    starting: set[asyncio.Task[None]] = set()
    loop.add_reader(channel.fileno(), receive)
    with contextlib.suppress(OSError):  # the supervisor may be gone; the channel says so next
        channel.send(READY)


def tcp_only() -> None:
    """In every worker but the first: a reverse mode to https listens on TCP only. It would
    also listen on UDP (HTTP/3), and a UDP port cannot be shared like this; the first worker
    keeps it."""
    post_init = mode_specs.ReverseMode.__post_init__

    def tcp(mode: mode_specs.ReverseMode) -> None:
        post_init(mode)
        if mode.transport_protocol == mode_specs.BOTH:
            object.__setattr__(mode, "transport_protocol", mode_specs.TCP)

    mode_specs.ReverseMode.__post_init__ = tcp  # type: ignore[method-assign, assignment]


async def watch_supervisor(stop: object) -> None:
    """In a worker: stops it when its supervisor is gone (killed, not stopped)."""
    supervisor = int(os.environ[ENV_SUPERVISOR])
    while os.getppid() == supervisor:
        await asyncio.sleep(PARENT_CHECK)
    stop()  # type: ignore[operator]


class Supervisor:
    """Runs `server.workers` worker processes on one port: hands each accepted connection to the
    worker with the fewest, starts a worker again when one dies, tells every worker to reload
    or stop, and on a restart hands the port to its successor one worker at a time (or takes
    it from its predecessor so)."""

    def __init__(self, specs: list[str], config: Config, command: list[str]) -> None:
        self.specs = specs
        self.count = config.server.workers
        self.command = command  # a worker's: the lean master's own, with the same specs
        self.state_backend = config.state.backend
        self.drain_seconds = config.server.drain_seconds
        self.events = EventLog(config.logging.level, config.logging.format)
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.keeping: dict[int, asyncio.Task[None]] = {}  # each worker's keeper, while it keeps one
        self.channels: dict[int, socket.socket] = {}  # to each running worker: its connections
        self.connections: dict[int, int] = {}  # open ones, by worker
        self.serving: set[int] = set()  # the workers that said READY: a starting one gets none
        self.retired: set[int] = set()  # told to finish and exit: a successor serves instead
        self.answering: set[asyncio.Task[None]] = set()  # connections answered while none serves
        self.announce = os.environ.pop(ENV_ANNOUNCE, "")  # printed once the first worker serves
        self.handed = 0
        self.stop_signal: int | None = None  # set once told to stop: what each worker is told
        self.handed_over = False
        self.drain_deadline: float | None = None
        self.exit_code = 0
        self.address: tuple[str, int] = ("", 0)
        self.listener: Listener | None = None
        self.control: Control | None = None
        self.hub: Hub | None = None
        self.env: dict[str, str] = {}
        self.finished = asyncio.Event()  # every worker has ended: the supervisor exits
        self.readied = asyncio.Event()  # a worker said READY

    async def run(self) -> int:
        where = listen_on(mode_options(self.specs), settings(self.specs).get("listen_host", ""))
        if where is None:
            print("claude-code-fallback: server.workers needs a listening mode", file=sys.stderr)
            return 2
        listening, predecessor = take_port(where, os.environ.pop(ENV_TAKEOVER, ""))
        self.address, self.listener = where, Listener(listening, self.hand)
        self.control = Control(self, where[1])
        with tempfile.TemporaryDirectory(prefix="ccf-workers-") as private:
            metrics, incidents = Path(private, "metrics"), Path(private, "incidents")
            metrics.mkdir()
            incidents.mkdir()
            self.env = {
                **os.environ,
                ENV_COUNT: str(self.count),
                ENV_LISTEN: f"{where[1]}:{listening.fileno()}",  # and each worker's channel
                ENV_SUPERVISOR: str(os.getpid()),
                METRICS_DIR: str(metrics),
                ENV_INCIDENTS: str(incidents),
            }
            if self.state_backend != "redis":
                path = str(Path(private, "state.sock"))
                self.hub = Hub()
                self.hub.restore(predecessor.carried.get("hub") or {} if predecessor else {})
                await self.hub.serve(listening_socket(path))
                self.env[ENV_STATE] = f"unix://{path}"
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self.stop, signum)
            loop.add_signal_handler(signal.SIGHUP, self.tell, signal.SIGHUP)  # reload
            address = f"{where[0] or '*'}:{where[1]}"
            self.events.event("workers_starting", workers=self.count, address=address)
            self.control.start()
            succession = asyncio.ensure_future(self.succeed(predecessor))
            for index in range(self.count):
                self.start_keeping(index)
            await self.finished.wait()
            succession.cancel()
            if self.hub:
                await self.hub.stop()
        self.control.stop()
        listening.close()
        return self.exit_code

    async def succeed(self, predecessor: Predecessor | None) -> None:
        """Takes the port over as workers come up, retiring one of the predecessor's for each
        (capacity never drops); then answers the next successor."""
        assert self.listener is not None and self.control is not None
        if predecessor is None:
            self.listener.resume()
            await self.readied.wait()
            self.control.publish()
            return
        retired = 0
        while len(self.serving) < self.count:
            await self.readied.wait()
            self.readied.clear()
            if self.serving:
                self.listener.resume()
            while retired < len(self.serving) and predecessor.left != 0:
                await predecessor.retire()
                retired += 1
        await predecessor.hand_over(self.control, self.events)

    def hand(self, connection: socket.socket) -> None:
        """Sends a connection to the serving worker with the fewest open; while none serves (at
        start, or all restarting), answers it at once itself."""
        if not self.serving:
            task = asyncio.ensure_future(answer_starting(connection))
            self.answering.add(task)
            task.add_done_callback(self.answering.discard)
            return
        with connection:  # the worker has its own copy once sent
            for index in self.by_load():
                try:
                    socket.send_fds(self.channels[index], [HANDED], [connection.fileno()])
                except OSError:  # gone, or not taking any: the next one
                    continue
                self.connections[index] += 1
                self.handed += 1
                break

    def by_load(self) -> list[int]:
        """The serving workers, fewest open connections first; a tie goes round in turn."""
        indices = sorted(self.serving)
        turn = self.handed % len(indices) if indices else 0
        return sorted(indices[turn:] + indices[:turn], key=lambda i: self.connections[i])

    def open_channel(self, index: int) -> socket.socket:
        """A channel to worker `index`; returns the worker's end, to pass to it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        self.channels[index], self.connections[index] = ours, 0
        asyncio.get_running_loop().add_reader(ours.fileno(), self.heard, index, ours)
        return theirs

    def heard(self, index: int, channel: socket.socket) -> None:
        """What worker `index` says: that it serves, and a byte per connection of its that closed."""
        try:
            told = channel.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            told = b""
        if not told:  # the worker is gone
            asyncio.get_running_loop().remove_reader(channel.fileno())
            self.serving.discard(index)
            return
        if READY in told and index not in self.retired:
            if not self.serving and self.announce:
                print(self.announce, file=sys.stderr, flush=True)  # `ccf dev`: now it serves
                self.announce = ""
            self.serving.add(index)
            self.readied.set()
        self.connections[index] = max(0, self.connections[index] - told.count(CLOSED))

    def close_channel(self, index: int) -> None:
        channel = self.channels.pop(index)
        del self.connections[index]
        self.serving.discard(index)
        asyncio.get_running_loop().remove_reader(channel.fileno())
        channel.close()

    def start_keeping(self, index: int) -> None:
        task = asyncio.ensure_future(self.keep(index))
        self.keeping[index] = task
        task.add_done_callback(lambda _: self.kept(index))

    def kept(self, index: int) -> None:
        self.keeping.pop(index, None)
        if not self.keeping and (self.stop_signal is not None or self.handed_over):
            self.finished.set()

    async def keep(self, index: int) -> None:
        """Runs worker `index` until the supervisor stops or retires it, starting it again when it dies."""
        from prometheus_client import multiprocess

        quick_deaths = 0
        listen_fd = int(self.env[ENV_LISTEN].split(":")[1])
        while self.stop_signal is None and index not in self.retired:
            started = time.monotonic()
            channel = self.open_channel(index)
            process = await asyncio.create_subprocess_exec(
                *self.command,
                env={
                    **self.env,
                    ENV_INDEX: str(index),
                    ENV_LISTEN: f"{self.env[ENV_LISTEN]}:{channel.fileno()}",
                },
                pass_fds=(listen_fd, channel.fileno()),
                start_new_session=True,  # Ctrl-C reaches the supervisor, which tells each worker once
            )
            channel.close()
            self.workers[index] = process
            if self.stop_signal is not None:  # told while this one was starting: `tell` missed it
                process.send_signal(self.stop_signal)
            elif index in self.retired:
                process.send_signal(RETIRE_SIGNAL)
            code = await process.wait()
            del self.workers[index]
            self.close_channel(index)
            multiprocess.mark_process_dead(process.pid, self.env[METRICS_DIR])
            if self.stop_signal is not None:
                self.exit_code = self.exit_code or code
                return
            if index in self.retired:
                return
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < QUICK_DEATH else 0
            if quick_deaths >= QUICK_DEATHS:
                self.events.event(
                    "worker_failing", logging.ERROR, worker=index, exit_code=code, effect="stopping"
                )
                self.exit_code = code or 1
                self.stop(signal.SIGTERM)
                return
            self.events.event("worker_restarted", logging.WARNING, worker=index, exit_code=code)
            await asyncio.sleep(0.5 * quick_deaths)

    def stop(self, signum: int) -> None:
        self.stop_signal = signum
        self.tell(signum)
        if not self.keeping:
            self.finished.set()

    def tell(self, signum: int) -> None:
        for process in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    # -- what a successor asks (handover.py) ----------------------------------------------

    def hello(self) -> tuple[dict[str, Any], socket.socket]:
        assert self.listener is not None
        return {
            **self.status(),
            "carry": {"hub": self.hub.snapshot() if self.hub else {}},
        }, self.listener.socket

    async def retire(self) -> int:
        """Retires one worker, a serving one first; the last one retired stops the accepting."""
        assert self.listener is not None
        live = [i for i in sorted(self.keeping) if i not in self.retired]
        if candidates := [i for i in live if i in self.serving] or live:
            index = candidates[-1]
            self.retired.add(index)
            self.serving.discard(index)
            if (process := self.workers.get(index)) is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(RETIRE_SIGNAL)
            if self.drain_deadline is None:
                self.drain_deadline = time.time() + self.drain_seconds
            self.events.event("worker_retiring", worker=index)
        left = len(live) - (1 if candidates else 0)
        if left == 0:
            self.listener.pause()
        return left

    def resume(self) -> None:
        """The successor left before it held the port: every worker slot serves again."""
        if not self.retired or self.handed_over or self.stop_signal is not None:
            return
        assert self.listener is not None
        retired, self.retired, self.drain_deadline = self.retired, set(), None
        for index in retired:
            if index not in self.keeping:
                self.start_keeping(index)
        self.listener.resume()
        self.events.event("resumed", logging.WARNING, workers=len(retired))

    def released(self) -> None:
        self.handed_over = True
        if not self.keeping:
            self.finished.set()

    def status(self) -> dict[str, Any]:
        state = "stopping" if self.stop_signal is not None else "retiring" if self.retired else "serving"
        return {
            "pid": os.getpid(),
            "version": __version__,
            "address": list(self.address),
            "workers": len([i for i in self.keeping if i not in self.retired]),
            "state": state,
            "connections": sum(self.connections.values()),
            "drainDeadline": self.drain_deadline,
        }


STARTING_BODY = b'{"status": "starting"}'
OVERLOADED_BODY = error_body("overloaded_error", "claude-code-fallback is starting; try again in a second.")
HEAD_LIMIT = 1 << 16


async def answer_starting(connection: socket.socket) -> None:
    """Before any worker serves: a 503 at once, not a wait of seconds. `/health` and `/readyz`
    say `{"status": "starting"}` (a load balancer's check), `/livez` answers 200, and
    anything else gets Anthropic's `overloaded_error` with `retry-after: 1`, which clients
    retry on."""
    loop = asyncio.get_running_loop()
    with connection:
        connection.setblocking(False)
        head = b""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(1.0):
                while b"\r\n\r\n" not in head and len(head) < HEAD_LIMIT:
                    if not (data := await loop.sock_recv(connection, HEAD_LIMIT)):
                        break
                    head += data
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        body = STARTING_BODY if path in (b"/health", b"/readyz") else OVERLOADED_BODY
        status = b"503 Service Unavailable"
        if path == b"/livez":  # starting is alive
            body, status = b'{"status": "alive"}', b"200 OK"
        response = (
            b"HTTP/1.1 %b\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, len(body))
        )
        with contextlib.suppress(OSError):
            await loop.sock_sendall(connection, response if method == b"HEAD" else response + body)


def supervise(specs: list[str], config: Config, command: list[str]) -> int:
    # the supervisor's own lines look like the workers' (mitmproxy's termlog)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s.%(msecs)03d] %(message)s", "%H:%M:%S"))
    logging.getLogger("claude_code_fallback").addHandler(handler)
    logging.getLogger("claude_code_fallback").setLevel(logging.DEBUG)
    return asyncio.run(Supervisor(specs, config, command).run())
