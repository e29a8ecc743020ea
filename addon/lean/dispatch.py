"""How the lean master runs hooks: only for the addons that have them, and on the spot
when they are plain functions.

mitmproxy's manager visits every addon for every hook of every flow, each time inside a
context manager, and then triggers every flow hook once more as `update`. With only the
addons a reverse proxy needs, nearly all those visits find nothing to call; they cost
about a tenth of a request's CPU. `HookedAddons` remembers which addons have which hook
(until an addon comes or goes) and visits only those, in the same order, with the same
error handling.

mitmproxy also starts a task for every hook a connection's layers raise, and routes its
completion back through the connection's lock and layers as an event. For a hook whose
handlers are all plain functions (`responseheaders`, `response`, `next_layer`, ...) that
round trip is all the hook costs. `InlineHooks`, a connection's top layer, runs such a
hook where it is raised and hands its completion straight back; a hook with a coroutine
handler (`request`) still gets its task. A hook that waits for an intercepted flow needs
its task too: the lean master loads no addon that intercepts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, safecall, traverse
from mitmproxy.proxy import commands, events, mode_servers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import CommandGenerator, Layer


class HookedAddons(AddonManager):
    """mitmproxy's AddonManager that runs a hook whose handlers are all plain functions where the
    connection's layers raise it, at once, instead of as a task (see the module's docstring)."""

    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self.hooked: dict[str, list[Any]] = {}
        self.plain: dict[str, list[Callable[..., Any]] | None] = {}

    def register(self, addon: Any) -> Any:
        self.forget()
        return super().register(addon)

    def remove(self, addon: Any) -> None:
        self.forget()
        super().remove(addon)

    def clear(self) -> None:
        self.forget()
        super().clear()

    def forget(self) -> None:
        self.hooked.clear()
        self.plain.clear()

    async def trigger_event(self, event: hooks.Hook) -> None:
        addons = self.hooked.get(event.name)
        if addons is None:
            addons = self.hooked[event.name] = [
                addon
                for addon in self.chain
                if any(getattr(a, event.name, None) is not None for a in traverse([addon]))
            ]
        for addon in addons:
            try:
                with safecall():
                    await self.invoke_addon(addon, event)
            except exceptions.AddonHalt:
                return

    def plain_handlers(self, name: str) -> list[Callable[..., Any]] | None:
        """The functions that take hook `name`, in chain order; None if one is a coroutine function."""
        if name not in self.plain:
            found = [func for a in traverse(self.chain) if callable(func := getattr(a, name, None))]
            self.plain[name] = None if any(inspect.iscoroutinefunction(f) for f in found) else found
        return self.plain[name]

    def run_inline(self, hook: hooks.Hook) -> bool:
        """Runs `hook` (and `update` after a flow's hook) now, if all their handlers are plain
        functions; False, having run nothing, if one is a coroutine function."""
        handlers = self.plain_handlers(hook.name)
        if handlers is None:
            return False
        args = hook.args()
        subject = args[0] if args else None
        update = self.plain_handlers(hooks.UpdateHook.name) if isinstance(subject, flow.Flow) else []
        if update is None:
            return False
        _call(handlers, args)
        if update:
            _call(update, [[subject]])
        return True


def _call(handlers: list[Callable[..., Any]], args: list[Any]) -> None:
    for handler in handlers:
        try:
            with safecall():
                handler(*args)
        except exceptions.AddonHalt:
            return


class InlineHooks:
    """A connection's top layer that runs plain-function hooks where they are raised."""

    def __init__(self, layer: Layer, addons: HookedAddons) -> None:
        self.layer = layer
        self.addons = addons

    @property
    def context(self) -> Context:
        return self.layer.context

    def handle_event(self, event: events.Event) -> CommandGenerator[None]:
        for command in self.layer.handle_event(event):
            if isinstance(command, commands.StartHook) and self.addons.run_inline(command):
                if command.blocking:
                    yield from self.handle_event(events.HookCompleted(command))
            else:
                yield command


class InlineHookConnection(mode_servers.ProxyConnectionHandler):
    """mitmproxy's client connection handler, its top layer wrapped in `InlineHooks`."""

    addons: HookedAddons

    @property  # type: ignore[override]
    def layer(self) -> InlineHooks:
        return self._top

    @layer.setter
    def layer(self, layer: Layer) -> None:
        self._top = InlineHooks(layer, self.addons)


def install(addons: HookedAddons) -> None:
    """Makes mitmproxy handle client connections with `InlineHookConnection`: for the lean
    master only, whose process runs no one else's addons."""
    InlineHookConnection.addons = addons
    mode_servers.ProxyConnectionHandler = InlineHookConnection  # type: ignore[misc]
