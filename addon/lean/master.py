"""A lean mitmproxy for `ccf start` and `ccf dev`: the addons a reverse proxy needs, and ours.

mitmdump runs every hook of every flow past some forty addons (dumper, save, intercept,
playback, ...) that a fallback proxy never uses; measured, that halves throughput. This
is still a real mitmproxy master with mitmproxy's options, logging and proxy core, so
`--set option=value` works as it does for mitmdump. `ccf web` keeps the full mitmweb.

Usage: python -O -P master.py --set mode=reverse:https://api.anthropic.com@8765 --set fallback_config=PATH ...
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

if not __package__:
    # Run as a script (`python -P master.py`): import the package this file belongs to.
    _here = Path(__file__).resolve().parent
    sys.path.insert(0, str(_here.parent.parent))
    __package__ = f"{_here.parent.name}.{_here.name}"

from ..fleet import workers
from ..launch import command


def parse(argv: list[str]) -> list[str]:
    """`--set a=b --set c=d` → ["a=b", "c=d"]; nothing else is accepted."""
    specs = []
    args = iter(argv)
    for arg in args:
        if arg != "--set":
            raise SystemExit(f"lean master: unexpected argument {arg!r} (only --set option=value)")
        specs.append(next(args, ""))
    return specs


async def serve(specs: list[str], *ours: object) -> None:
    """Runs mitmproxy's proxy core with `ours` (the fallback addon unless given) until shut down."""
    # Imported here: a supervisor of workers needs none of it (about 45 MB less).
    from mitmproxy import exceptions, master, options
    from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, termlog, tlsconfig

    from ..proxy import Fallback
    from ..relay import direct
    from . import dispatch as hooks
    from .succession import hold, stand

    logging.getLogger().setLevel(logging.DEBUG)  # as mitmdump: termlog_verbosity filters
    for noisy in ("asyncio", "hpack", "quic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    direct.install()
    opts = options.Options()
    lean = master.Master(opts)
    lean.addons = hooks.HookedAddons(lean)
    hooks.install(lean.addons)
    tls = tlsconfig.TlsConfig()
    ours = ours or (Fallback(inspected=False, direct=True),)
    standing = stand(specs, ours[0]) if isinstance(ours[0], Fallback) else None
    lean.addons.add(
        termlog.TermLog(),
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tls,
        errorcheck.ErrorCheck(),
        *ours,
    )
    # mitmproxy 12's TlsConfig makes its certificate store only in `running`, after the
    # proxy already listens; a request in between (`ccf start` polls /health at once)
    # would find none. Make it now, as its own `running` would.
    tls.configure({"confdir"})
    try:
        opts.set(*specs)
    except exceptions.OptionsError as e:
        print(f"claude-code-fallback: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    # A service's log should not grow two lines for every health check or connection;
    # `ccf web` or `mitmdump -s addon/fallback.py` show connection-level detail.
    logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING)
    watching = watch(lean, ours[0])
    # What is loaded by now lives as long as the process: keep it out of the collector's
    # full passes, which otherwise stop every stream for 40-70 ms a few times a minute.
    gc.freeze()
    holding = asyncio.ensure_future(hold(standing)) if standing else None
    await lean.run()
    for task in (watching, holding):
        if task is not None:
            task.cancel()
    if standing is not None:
        standing.control.stop()
    asyncio.get_running_loop().set_exception_handler(quiet_cancellations)


def watch(lean: Any, ours: object) -> asyncio.Future[None] | None:
    """Signals, and what a worker or `ccf dev` waits for beside serving."""
    from ..proxy import Fallback

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGTERM becomes a drain once the addon runs
        loop.add_signal_handler(signum, lean.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if workers.ENV_SUPERVISOR in os.environ:
        if isinstance(ours, Fallback):  # a rolling restart: from the start, not once running
            loop.add_signal_handler(workers.RETIRE_SIGNAL, ours.drain.retire, True)
        return asyncio.ensure_future(workers.watch_supervisor(lean.shutdown))
    if (line := os.environ.pop(workers.ENV_ANNOUNCE, "")) and isinstance(ours, Fallback):
        return asyncio.ensure_future(announce_when(ours.ready, line))
    return None


async def announce_when(ready: asyncio.Event, line: str) -> None:
    """`ccf dev`'s "on http://..." line, once the proxy serves (not when it starts)."""
    await ready.wait()
    print(line, file=sys.stderr, flush=True)


def quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """Once the master is done, asyncio.run cancels the connections clients still keep open.
    Python before 3.13 reports each as an exception in asyncio's own callback, with a
    traceback: a stop is not an error."""
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # the log file of `ccf start` should be current
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    specs = parse(sys.argv[1:])
    if listen := os.environ.get(workers.ENV_LISTEN):
        workers.listen_on_inherited(listen)  # a worker of a supervisor
    elif (config := workers.planned_config(specs)) and config.server.workers > 1:
        raise SystemExit(workers.supervise(specs, config, command(specs)))
    asyncio.run(serve(specs))


if __name__ == "__main__":
    main()
