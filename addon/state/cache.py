"""Where each session's prompt cache is warm, and until when.

A prompt cache belongs to one account (one endpoint): a session moved elsewhere sends its
whole context again as cache writes, at 1.25 times the input price (2 times for a 1-hour
cache) instead of a tenth of it. So routing asks, per session, which endpoints hold its
cache. What a request says of its cache is read once (`Prompt.of`): the session it
belongs to, how long the API keeps what it marks (the last `cache_control` breakpoint's
`ttl`: 5 minutes, or 1 hour for `"1h"`), and whether it continues a tool loop. The
tracker (`CacheTracker`) learns from each answer's `usage`: cache reads or writes on an
endpoint mean the cache is warm there for another TTL (times `routing.cacheTtlScale`); an
answer whose usage shows neither means it is not. An answer whose usage the proxy does
not read before it is relayed (a whole JSON body) counts as warm when the request marked
a breakpoint, as the API does with a request it answers.

Without Claude Code's session id, a conversation is known by a hash of its content up to
the end of the message that holds its last breakpoint (`cache_control` markers left out,
since clients move them from turn to turn); the next turn finds it again by the hashes of
its own earlier messages. Like `SessionMap`, the tracker is bounded in size and age, and
lives in one process: each instance of a fleet learns from the answers it relays.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..request import ClientRequest
from ..sse import Usage

TTL_5M = 300.0
TTL_1H = 3600.0
SESSION_LIMIT = 10_000
# A session idle this long has nothing warm left; its entry goes (as SessionMap's does).
MAX_IDLE = 3600.0
TOKEN_BYTES = 4  # a rough size of a request whose usage is not known yet: 4 bytes a token


@dataclass(frozen=True)
class Prompt:
    """What one request says about its prompt cache."""

    key: str  # the session id, else the hash of the conversation up to its last breakpoint
    ttl: float  # seconds the API keeps it, as the last breakpoint asks
    marked: bool  # whether the request has a `cache_control` breakpoint at all
    tool_loop: bool  # its last user turn carries `tool_result` blocks
    model: str | None
    size: int  # tokens, roughly: for the prices before an answer has said
    earlier: tuple[str, ...] = ()  # without a session id: the hashes of earlier turns, latest first

    @classmethod
    def of(cls, request: ClientRequest, session: str | None) -> Prompt | None:
        """The request's prompt; None when it has neither a session nor a breakpoint to know it by."""
        payload = request.payload
        if payload is None:
            return None
        marker = last_breakpoint(payload) if b'"cache_control"' in request.body else None
        ttl = TTL_1H if marker is not None and marker.get("ttl") == "1h" else TTL_5M
        earlier: tuple[str, ...] = ()
        if session is None:
            if marker is None:
                return None
            *before, key = conversation_hashes(payload)
            earlier = tuple(reversed(before))
        else:
            key = session
        return cls(
            key=key,
            ttl=ttl,
            marked=marker is not None,
            tool_loop=in_tool_loop(payload),
            model=request.model,
            size=len(request.body) // TOKEN_BYTES,
            earlier=earlier,
        )


def _blocks(content: Any) -> list[Any]:
    return content if isinstance(content, list) else []


def _marker(block: Any) -> dict[str, Any] | None:
    marker = block.get("cache_control") if isinstance(block, dict) else None
    return marker if isinstance(marker, dict) else None


def last_breakpoint(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The last `cache_control` of the prompt, in the order the API caches it: tools, system,
    messages. Searched from the end, where Claude Code puts it."""
    for message in reversed(_blocks(payload.get("messages"))):
        if isinstance(message, dict):
            for block in reversed(_blocks(message.get("content"))):
                if (marker := _marker(block)) is not None:
                    return marker
    for block in reversed([*_blocks(payload.get("tools")), *_blocks(payload.get("system"))]):
        if (marker := _marker(block)) is not None:
            return marker
    return None


def in_tool_loop(payload: dict[str, Any]) -> bool:
    """Whether the request answers tool calls: its last user turn carries `tool_result` blocks."""
    messages = _blocks(payload.get("messages"))
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return False
    return any(isinstance(b, dict) and b.get("type") == "tool_result" for b in _blocks(last.get("content")))


def _unmarked(value: Any) -> Any:
    """`value` without its `cache_control` markers, which do not change what is cached."""
    if isinstance(value, dict):
        return {k: _unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_unmarked(v) for v in value]
    return value


def conversation_hashes(payload: dict[str, Any]) -> list[str]:
    """Hashes of the conversation's prefixes: tools and system, then each message in turn, up
    to the message that holds the last breakpoint (the last hash is the conversation's key)."""
    messages = _blocks(payload.get("messages"))
    end = 0
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if any(_marker(block) is not None for block in _blocks(content)):
            end = i + 1
    digest = hashlib.sha256()
    head = {"tools": payload.get("tools"), "system": payload.get("system")}
    digest.update(json.dumps(_unmarked(head), sort_keys=True).encode())
    hashes = [digest.hexdigest()]
    for message in messages[:end]:
        digest.update(json.dumps(_unmarked(message), sort_keys=True).encode())
        hashes.append(digest.hexdigest())
    return hashes


@dataclass
class Held:
    """One session's cache as the tracker knows it."""

    endpoint: str | None = None  # the endpoint that served it last
    warm: dict[str, tuple[float, int]] = field(default_factory=dict)  # endpoint: (until, tokens)
    tokens: int = 0  # the cached part of its prompt, as the last answer said (0: not known)
    uncached: int = 0  # the rest of its prompt, after the last breakpoint
    extra: float = 0.0  # what staying off the first choice has cost so far (USD)
    seen: float = 0.0

    def warm_on(self, endpoint: str, now: float) -> bool:
        entry = self.warm.get(endpoint)
        return entry is not None and entry[0] > now

    def cached_on(self, endpoint: str, now: float) -> int:
        """Tokens of the session's prompt warm on `endpoint` (0 when cold)."""
        entry = self.warm.get(endpoint)
        return entry[1] if entry is not None and entry[0] > now else 0


class CacheTracker:
    """Sessions → where their caches are warm; least recently seen first, bounded in size and age."""

    def __init__(
        self,
        scale: float = 1.0,
        limit: int = SESSION_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scale = scale
        self.limit = limit
        self.clock = clock
        self.entries: OrderedDict[str, Held] = OrderedDict()

    def find(self, prompt: Prompt) -> Held | None:
        """The session's entry; a conversation known by its hash is found by an earlier turn's."""
        self.expire()
        held = self.entries.get(prompt.key)
        if held is None:
            found = next((k for k in prompt.earlier if k in self.entries), None)
            if found is None:
                return None
            held = self.entries[prompt.key] = self.entries.pop(found)
        return held

    def served(self, prompt: Prompt, endpoint: str, usage: Iterable[Usage]) -> Held:
        """Learns from an answer of `endpoint` to `prompt`; `usage`: what its usage said so far."""
        now = self.clock()
        held = self.find(prompt) or Held()
        figures = list(usage)
        if figures:
            read = max(u.cache_read for u in figures)
            written = max(u.cache_creation for u in figures)
            held.tokens, held.uncached = read + written, max(u.input for u in figures)
        else:
            held.tokens, held.uncached = (prompt.size if prompt.marked else 0), 0
        if held.tokens > 0:
            held.warm[endpoint] = (now + prompt.ttl * self.scale, held.tokens)
        else:
            held.warm.pop(endpoint, None)
        if held.endpoint != endpoint:
            held.extra = 0.0
        held.endpoint, held.seen = endpoint, now
        self.entries[prompt.key] = held
        self.entries.move_to_end(prompt.key)
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)
        return held

    def expire(self) -> None:
        oldest = self.clock() - MAX_IDLE * max(self.scale, 1.0)
        while self.entries and next(iter(self.entries.values())).seen < oldest:
            self.entries.popitem(last=False)

    def warm_sessions(self) -> Iterator[tuple[str, str]]:
        """(session key, endpoint) of every cache believed warm now."""
        now = self.clock()
        for key, held in self.entries.items():
            for endpoint, (until, _) in held.warm.items():
                if until > now:
                    yield key, endpoint

    def __len__(self) -> int:
        return len(self.entries)
