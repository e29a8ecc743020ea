"""Keeps mitmweb's flow list to the most recent flows (`fallback_web_max_flows`).

mitmweb keeps every flow in memory, each with its request body: a Claude Code request
carries the whole conversation, hundreds of KB. A day of traffic through `ccf web` would
hold gigabytes. So, as new flows come, the oldest finished ones leave the view, the way
a log rotates; a flow still streaming stays until it ends. Without a view (mitmdump, the
lean master) there is nothing to trim.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx

if TYPE_CHECKING:
    from mitmproxy import http

DEFAULT_MAX_FLOWS = 500


class FlowCap:
    """Keeps at most `fallback_web_max_flows` flows in mitmweb's view, the oldest dropped first, so
    that inspecting a long session does not grow the proxy's memory without bound."""

    def __init__(self) -> None:
        self.kept: deque[http.HTTPFlow] = deque()  # in the order the view got them
        self.view: Any = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fallback_web_max_flows",
            int,
            DEFAULT_MAX_FLOWS,
            """
            How many of the most recent flows mitmweb keeps; older finished ones are dropped
            as new ones come, so memory stays flat. 0 keeps every flow.
            """,
        )

    def running(self) -> None:
        self.view = ctx.master.addons.get("view")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.view is None:
            return
        self.kept.append(flow)
        self.trim()

    def trim(self) -> None:
        cap = ctx.options.fallback_web_max_flows
        if cap <= 0:
            self.kept.clear()  # nothing to trim: hold no reference either
            return
        while len(self.kept) > cap:
            oldest = self.kept[0]
            if oldest.live:
                return  # still streaming: it goes once it ends and the next flow comes
            self.kept.popleft()
            if self.view.get_by_id(oldest.id) is not None:  # the user may have deleted it already
                self.view.remove([oldest])
