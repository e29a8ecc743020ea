"""The client side: the requests every benchmark sends, one keep-alive aiohttp session,
and the check that an answer came from the fake it should have."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import aiohttp

from . import BenchError

BODY = json.dumps(
    {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
)
STREAM_BODY = json.dumps(
    {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
)
HEADERS = {
    "content-type": "application/json",
    "anthropic-version": "2023-06-01",
    "x-api-key": "sk-ant-bench-000000000000",
}


def session(connections: int = 1, total_timeout: float = 60.0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=total_timeout),
        auto_decompress=False,
    )


@dataclass
class Reply:
    """One answer to a POST: its times from the request (to the headers, to the whole body),
    its status and the fake that served it (its `x-fake-name`)."""

    ttfb: float  # request sent -> status line and headers parsed
    total: float  # request sent -> body read
    status: int
    served_by: str


async def post(client: aiohttp.ClientSession, url: str, body: str = BODY) -> Reply:
    started = time.perf_counter()
    async with client.post(f"{url}/v1/messages", data=body, headers=HEADERS) as response:
        headers_at = time.perf_counter()
        await response.read()
        done = time.perf_counter()
        served_by = response.headers.get("x-fake-name", "")
        return Reply(headers_at - started, done - started, response.status, served_by)


def check(reply: Reply, status: int, served_by: str | None, what: str) -> None:
    """`reply` has `status` and came from the fake `served_by` (None: any)."""
    if reply.status != status or served_by not in (None, reply.served_by):
        raise BenchError(
            f"{what}: expected {status} from {served_by!r}, got {reply.status} from {reply.served_by!r}"
        )


async def get_text(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url) as response:
        return await response.text()


def event_name(block: bytes) -> str:
    """The `event:` field of one SSE block ('' when it has none)."""
    return next((x[6:].strip() for x in block.split(b"\n") if x.startswith(b"event:")), b"").decode()
