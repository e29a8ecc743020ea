"""The API's prompt cache as one fake account plays it: reads, writes and their lifetimes.

A request's prompt is a row of blocks in the order the API caches them: each tool, the
system prompt's blocks, then each message's content blocks. A block with `cache_control`
is a breakpoint: the prompt up to it is written to the cache, for 5 minutes (an hour with
`"ttl": "1h"`) times `ttl_scale`. A later request reads the longest prefix still cached,
looked up at each block boundary up to 20 blocks before each of its breakpoints, as the API
does; the rest up to its last breakpoint is written, and what follows is plain input. A
read renews what it read. `cache_control` markers are not part of what is cached: clients
move them from turn to turn. A token is about four characters of a block's JSON. The
answer's `usage` says so: `cache_read_input_tokens`, `cache_creation_input_tokens` and
their split, `cache_creation.ephemeral_5m_input_tokens` and `ephemeral_1h_input_tokens`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

LOOKBACK = 20  # block boundaries the API checks before each breakpoint
TTL_5M, TTL_1H = 300.0, 3600.0
CHARS_PER_TOKEN = 4


def _blocks(payload: dict[str, Any]) -> list[tuple[str, Any]]:
    """The prompt's blocks in cache order, each with what it belongs to (a tool, the system, a role)."""
    rows: list[tuple[str, Any]] = []
    tools = payload.get("tools")
    rows += [("tool", tool) for tool in tools if isinstance(tool, dict)] if isinstance(tools, list) else []
    system = payload.get("system")
    if isinstance(system, str):
        rows.append(("system", {"type": "text", "text": system}))
    elif isinstance(system, list):
        rows += [("system", block) for block in system]
    messages = payload.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        role, content = str(message.get("role")), message.get("content")
        if isinstance(content, str):
            rows.append((role, {"type": "text", "text": content}))
        elif isinstance(content, list):
            rows += [(role, block) for block in content]
    return rows


def _ttl(block: Any) -> float | None:
    marker = block.get("cache_control") if isinstance(block, dict) else None
    if not isinstance(marker, dict):
        return None
    return TTL_1H if marker.get("ttl") == "1h" else TTL_5M


class PromptCache:
    """One account's prompt cache; `use` answers a request's usage and updates the cache.

    Thread-safe: the fake's thread uses it while a test reads `reads` and `writes`.
    """

    def __init__(self, ttl_scale: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_scale = ttl_scale
        self.clock = clock
        self.entries: dict[str, float] = {}  # prefix hash: until when it is cached
        self.reads = 0  # tokens read from the cache so far
        self.writes = 0  # tokens written to it so far
        self._lock = threading.Lock()

    def use(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The input side of the `usage` of an answer to `payload`; the cache as it leaves it."""
        blocks = _blocks(payload)
        digest = hashlib.sha256()
        hashes, totals, ttls = [], [], []
        total = 0
        for owner, block in blocks:
            unmarked = (
                {k: v for k, v in block.items() if k != "cache_control"} if isinstance(block, dict) else block
            )
            text = json.dumps([owner, unmarked], sort_keys=True)
            digest.update(text.encode())
            hashes.append(digest.hexdigest())
            total += max(1, len(text) // CHARS_PER_TOKEN)
            totals.append(total)
            ttls.append(_ttl(block))
        points = [i for i, ttl in enumerate(ttls) if ttl is not None]
        with self._lock:
            now = self.clock()
            self.entries = {h: until for h, until in self.entries.items() if until > now}
            hit = self._longest_hit(hashes, points)
            read = totals[hit] if hit is not None else 0
            written = {TTL_5M: 0, TTL_1H: 0}
            start = read
            for point in points:
                ttl = ttls[point]
                assert ttl is not None
                if totals[point] > start:
                    written[ttl] += totals[point] - start
                    start = totals[point]
                self.entries[hashes[point]] = max(
                    self.entries.get(hashes[point], 0.0), now + ttl * self.ttl_scale
                )
            if hit is not None:
                covering = next(p for p in points if p >= hit)
                ttl = ttls[covering]
                assert ttl is not None
                self.entries[hashes[hit]] = max(self.entries[hashes[hit]], now + ttl * self.ttl_scale)
            self.reads += read
            self.writes += written[TTL_5M] + written[TTL_1H]
        cached = totals[points[-1]] if points else 0
        return {
            "input_tokens": total - cached,
            "cache_creation_input_tokens": written[TTL_5M] + written[TTL_1H],
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": written[TTL_5M],
                "ephemeral_1h_input_tokens": written[TTL_1H],
            },
        }

    def _longest_hit(self, hashes: list[str], points: list[int]) -> int | None:
        """The last block boundary, within the lookback of a breakpoint, whose prefix is cached."""
        candidates = {i for point in points for i in range(max(0, point - LOOKBACK + 1), point + 1)}
        return next((i for i in sorted(candidates, reverse=True) if hashes[i] in self.entries), None)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.reads = self.writes = 0


def with_usage(data: bytes, usage: dict[str, Any], streamed: bool) -> bytes:
    """A message body, or a stream's `message_start` event, with `usage` in its usage."""
    if not streamed:
        message = json.loads(data)
        message["usage"].update(usage)
        return json.dumps(message, separators=(",", ":")).encode()
    head, _, rest = data.partition(b"data: ")
    event = json.loads(rest)
    event["message"]["usage"].update(usage)
    return head + b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
