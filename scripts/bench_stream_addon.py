"""The benchmark's floor: a mitmproxy addon that only streams responses.

`mitmdump -s scripts/bench_stream_addon.py --mode reverse:URL@PORT` forwards every
request natively and streams each response body as it arrives: what mitmdump itself
costs. `python -P scripts/bench_stream_addon.py --set mode=reverse:URL@PORT` runs the
same addon in `ccf`'s lean master instead of the fallback addon: the floor a proxy
built on mitmproxy's streaming path cannot go below. `scripts/bench.py` uses both.
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
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        responseheaders(flow)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from addon import lean

    asyncio.run(lean.serve(lean.parse(sys.argv[1:]), StreamAll()))
