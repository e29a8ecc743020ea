"""The proxy's life beside its requests: its config, reloads, the drain on SIGTERM, the metrics port.

A sibling addon of `Fallback` (mitmproxy composes its own addons the same way): it owns
the options that name and watch the config, reads the config on start, when an option
changes, on SIGHUP, when the file changes and on `fallback.reload`, and hands each good
one to the request path (`Serving.install`); a bad one keeps the running config.

How the process ends is its sibling's, drain.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterable
from typing import Any, Protocol

from mitmproxy import command, ctx, exceptions

from .. import __version__
from ..config import Config, ConfigError
from ..fleet import workers
from ..logs import EventLog
from ..metrics import Metrics
from ..modes import named_config
from . import advice
from .service import LastingView, RuntimeView


class Serving(Protocol):
    """What the lifecycle needs of the request path (the `Fallback` addon)."""

    ready: asyncio.Event

    @property
    def runtime(self) -> RuntimeView | None: ...

    @property
    def lasting(self) -> LastingView: ...

    def install(self, config: Config) -> None: ...

    def current(self) -> Config | None: ...

    def busy(self) -> dict[str, int]: ...

    def health(self) -> tuple[int, dict[str, Any]]: ...

    def spawn(self, coroutine: Any) -> None: ...


class Lifecycle:
    """Reads, watches and reloads the config; serves the metrics port."""

    def __init__(self, serving: Serving, metrics: Metrics, events: EventLog) -> None:
        self.serving = serving
        self.metrics = metrics
        self.events = events
        self.config_mtime: float | None = None
        self.metrics_server: Any = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fallback_config",
            str,
            "",
            """
            Path of the claude-code-fallback config file. Empty means
            $CLAUDE_FALLBACK_HOME/config.yaml or ~/.claude-code-fallback/config.yaml when it
            exists, else one endpoint: the reverse-proxy target.
            """,
        )
        loader.add_option(
            "fallback_log_level",
            str,
            "",
            "Overrides logging.level of the config (trace, debug, info, warn, error).",
        )
        loader.add_option(
            "fallback_watch_config",
            bool,
            True,
            "Reload the config file when it changes on disk.",
        )

    def configure(self, updated: set[str]) -> None:
        if not updated & {"fallback_config", "fallback_log_level", "mode"}:
            return
        try:
            self.install(self.read_config())
        except ConfigError as e:
            if not self.serving.ready.is_set():
                # before listening: refuse to start, like any tool given a bad config
                print(f"claude-code-fallback: invalid config\n{e}", file=sys.stderr)
                raise SystemExit(2) from None
            raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        runtime = self.serving.runtime
        assert runtime is not None
        options = ctx.options
        self.warn(
            advice.at_start(runtime.config, runtime.access, options.mode, options.listen_host, os.environ)
        )
        endpoints = ",".join(s.name for s in self.serving.lasting.pool)
        source = runtime.config.source
        self.events.event("started", version=__version__, endpoints=endpoints, config=source)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.reload_here)
        self.serving.spawn(self.watch_file())
        self.start_metrics_server()

    def done(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()

    @command.command("fallback.reload")
    def reload(self) -> bool:
        """Reload the claude-code-fallback config file; a bad file keeps the running config.
        With `server.workers`, every worker reloads."""
        config = self.reread()
        if config is None:
            return False
        if not workers.reload_all():  # a worker's supervisor tells every worker, this one too
            self.reloaded(config)
        return True

    @command.command("fallback.status")
    def status(self) -> str:
        """The health document served on /health, as JSON."""
        return json.dumps(self.serving.health()[1], indent=2)

    def reload_here(self) -> None:
        """SIGHUP or an edited file: this process reloads (a supervisor tells each worker)."""
        if (config := self.reread()) is not None:
            self.reloaded(config)

    def read_config(self) -> Config:
        options = ctx.options
        return named_config(options.fallback_config, options.fallback_log_level, options.mode)

    def reread(self) -> Config | None:
        try:
            return self.read_config()
        except ConfigError as e:
            self.metrics.reloads.labels("error").inc()
            self.events.event("config_reload_failed", logging.ERROR, error=str(e))
            return None

    def reloaded(self, config: Config) -> None:
        self.install(config)
        self.metrics.reloads.labels("success").inc()
        self.events.event("config_reloaded", endpoints=",".join(e.name for e in config.active_endpoints))

    def install(self, config: Config) -> None:
        self.serving.install(config)
        self.config_mtime = _mtime(config.source)
        self.warn(advice.config_readable(config))

    def warn(self, advices: Iterable[advice.Advice]) -> None:
        for event, fields in advices:
            self.events.event(event, logging.WARNING, **fields)

    async def watch_file(self) -> None:
        while True:
            await asyncio.sleep(1)
            config = self.serving.current()
            if not ctx.options.fallback_watch_config or config is None or not config.source:
                continue
            mtime = _mtime(config.source)
            if mtime != self.config_mtime:
                self.config_mtime = mtime
                self.reload_here()

    def start_metrics_server(self) -> None:
        config = self.serving.current()
        assert config is not None
        port = config.server.metrics_port
        if port is None or self.metrics_server is not None or workers.this_worker()["index"]:
            return  # of a proxy's workers, the first serves every worker's metrics there
        from prometheus_client import start_http_server

        server = start_http_server(port, addr=config.server.host, registry=self.metrics.exposition)
        self.metrics_server = server[0] if isinstance(server, tuple) else None


def _mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None
