"""The benchmark's floor: a mitmproxy addon that only streams responses.

`mitmdump -s scripts/bench/stream_addon.py --mode reverse:URL@PORT` forwards every
request natively and streams each response body as it arrives: what mitmdump itself
costs. `python -O -P scripts/bench/stream_addon.py --set mode=reverse:URL@PORT` runs the
same addon in `ccf`'s lean master instead of the fallback addon: the floor a proxy
built on mitmproxy's streaming path cannot go below. The benchmark runs both
(`services.proxy_command`); this file is loaded by its path, never imported.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from mitmproxy import http


def responseheaders(flow: http.HTTPFlow) -> None:
    if flow.response is not None:
        flow.response.stream = True


class StreamAll:
    """The same hook as an addon object, for the lean master, which takes addons, not scripts."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        responseheaders(flow)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from addon.lean import master as lean

    asyncio.run(lean.serve(lean.parse(sys.argv[1:]), StreamAll()))
