"""The lean master's hooks: they reach the addons that have them, in order, and plain-function
hooks run where a connection's layers raise them."""

from __future__ import annotations

import asyncio

from mitmproxy import exceptions, master, options
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from addon.lean.dispatch import HookedAddons, InlineHooks


def test_hooks_reach_the_addons_that_have_them_in_order_even_those_added_later():
    calls: list[str] = []

    class First:
        def request(self, flow):
            calls.append("first")

    class Silent:
        pass

    class Halting:
        async def request(self, flow):
            calls.append("halting")
            raise exceptions.AddonHalt

    class Last:
        def request(self, flow):
            calls.append("last")

    async def run() -> None:
        lean = master.Master(options.Options())
        lean.addons = HookedAddons(lean)
        lean.addons.add(First(), Silent())
        await lean.addons.trigger_event(HttpRequestHook(tflow.tflow()))
        assert calls == ["first"]
        assert lean.addons.hooked["request"] == [lean.addons.get("first")]
        lean.addons.add(Halting(), Last())  # a new addon is seen
        await lean.addons.trigger_event(HttpRequestHook(tflow.tflow()))
        assert calls == ["first", "first", "halting"]  # AddonHalt stops the chain, as in mitmproxy
        lean.addons.remove(lean.addons.get("halting"))
        await lean.addons.trigger_event(HttpRequestHook(tflow.tflow()))
        assert calls[-2:] == ["first", "last"]

    asyncio.run(run())


class Answering:
    """A plain `response` hook and a coroutine `request` hook, as the proxy's addon has."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def response(self, flow):
        self.calls.append("response")

    async def request(self, flow):
        self.calls.append("request")

    def update(self, flows):
        self.calls.append(f"update of {len(flows)}")


class Layer:
    """A connection's layer that raises `hook` on start and says so when the hook completes."""

    context = None

    def __init__(self, hook: commands.StartHook) -> None:
        self.hook = hook
        self.seen: list[events.Event] = []

    def handle_event(self, event: events.Event):
        self.seen.append(event)
        if isinstance(event, events.Start):
            yield commands.Log("before the hook")
            yield self.hook
        elif isinstance(event, events.HookCompleted):
            yield commands.Log("after the hook")


def raise_on_start(hook: commands.StartHook, calls: list[str]) -> tuple[Layer, list[commands.Command]]:
    """What a connection's top layer passes on to mitmproxy when `hook` is raised."""

    async def run() -> list[commands.Command]:
        lean = master.Master(options.Options())
        lean.addons = HookedAddons(lean)
        lean.addons.add(Answering(calls))
        return list(InlineHooks(layer, lean.addons).handle_event(events.Start()))

    layer = Layer(hook)
    return layer, asyncio.run(run())


def test_a_hook_of_plain_functions_runs_where_it_is_raised_and_completes_at_once():
    calls: list[str] = []
    hook = HttpResponseHook(tflow.tflow(resp=True))

    layer, raised = raise_on_start(hook, calls)

    assert calls == ["response", "update of 1"]
    assert [c.message for c in raised if isinstance(c, commands.Log)] == ["before the hook", "after the hook"]
    assert not any(isinstance(c, commands.StartHook) for c in raised)
    assert isinstance(layer.seen[-1], events.HookCompleted) and layer.seen[-1].command is hook


def test_a_hook_with_a_coroutine_handler_is_left_to_mitmproxy_and_nothing_of_it_runs():
    calls: list[str] = []
    hook = HttpRequestHook(tflow.tflow())

    layer, raised = raise_on_start(hook, calls)

    assert calls == []
    assert raised[-1] is hook
    assert not any(isinstance(e, events.HookCompleted) for e in layer.seen)
