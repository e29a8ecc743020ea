"""The lean master's addon manager: hooks reach the addons that have them, in order."""

from __future__ import annotations

import asyncio

from mitmproxy import exceptions, master, options
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow

from addon.hooks import HookedAddons


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
