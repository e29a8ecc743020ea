"""The benchmark's floor: a mitmproxy addon that only streams responses.

`mitmdump -s scripts/bench_stream_addon.py --mode reverse:URL@PORT` forwards every
request natively and streams each response body as it arrives. `scripts/bench.py`
uses it to measure what mitmproxy itself costs, so the fallback addon can be judged
against the floor it cannot go below.
"""

from __future__ import annotations

from mitmproxy import http


def responseheaders(flow: http.HTTPFlow) -> None:
    if flow.response is not None:
        flow.response.stream = True
