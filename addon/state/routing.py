"""Which endpoint a request should try first: strategy, session affinity and stepping aside.

The failover loop asks `Router.order` once per request for the endpoints in the order it
should try them, and tells `Router.served` who answered. `priority` keeps the configured
order. `least-utilized` puts the endpoint whose fullest usage window is emptiest first
(an endpoint with no reading counts as empty; ties keep the configured order), and keeps
a session on the endpoint that last served it while that endpoint is usable, because a
prompt cache belongs to one account. With `stepAsideAt`, an endpoint whose fullest window
has reached that fraction goes to the back of the line: it is used only when nothing
ahead of it can take the request, and comes forward again once its window resets.

With `cacheAware` (and `sessionAffinity`), the prompt-cache rules have the last word, asked
in turn (`CACHE_RULES`): a tool loop finishes on the endpoint it started on unless that one
fails; a session back from a failover stays where its cache is warm while that costs less
than rebuilding the cache on the first choice (a subscription, flat-priced, gets it back at
the end of the turn); and a session that must leave its endpoint goes where its cache is
still warm, if anywhere. `cache.py` knows where each session's cache is warm.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config import Routing
from ..cost.prices import PriceTable, Rates, Tokens, shipped
from ..request import ClientRequest
from ..sse import Usage
from .cache import TTL_1H, CacheTracker, Held, Prompt
from .endpoints import HEALTHY, EndpointPool, EndpointState

SESSION_HEADER = "x-claude-code-session-id"
# Claude Code before 2.1.78: metadata.user_id = "user_<hash>_account_<uuid>_session_<uuid>"
LEGACY_SESSION = re.compile(r"_session_([0-9A-Za-z-]{1,64})$")
MAX_SESSION_ID = 128
SESSION_LIMIT = 10_000
# A prompt cache lives minutes to an hour; past that, staying put keeps nothing.
SESSION_MAX_AGE = 3600.0


def session_of(request: ClientRequest) -> str | None:
    """The client's session: Claude Code's session header, else the one in `metadata.user_id`."""
    for name, value in request.headers:
        if name.lower() == SESSION_HEADER and 0 < len(value) <= MAX_SESSION_ID:
            return value
    metadata = request.payload.get("metadata") if request.payload else None
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str) or len(user_id) > 1024:
        return None
    if user_id.startswith("{"):
        try:
            session = json.loads(user_id).get("session_id")
        except (ValueError, AttributeError):
            return None
        return session if isinstance(session, str) and 0 < len(session) <= MAX_SESSION_ID else None
    match = LEGACY_SESSION.search(user_id)
    return match[1] if match else None


class SessionMap:
    """Session → endpoint name, least recently used first; bounded in size and in age."""

    def __init__(
        self,
        limit: int = SESSION_LIMIT,
        max_age: float = SESSION_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.max_age = max_age
        self.clock = clock
        self.entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, session: str) -> str | None:
        self.expire()
        entry = self.entries.get(session)
        return entry[0] if entry else None

    def put(self, session: str, endpoint: str) -> None:
        self.entries[session] = (endpoint, self.clock())
        self.entries.move_to_end(session)
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)
        self.expire()

    def expire(self) -> None:
        oldest = self.clock() - self.max_age
        while self.entries and next(iter(self.entries.values()))[1] < oldest:
            self.entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class Choice:
    """What the cache rules look at for one request: the strategy's order and the session's cache."""

    states: list[EndpointState]
    held: Held
    prompt: Prompt
    now: float
    step_aside_at: float | None

    @property
    def here(self) -> EndpointState | None:
        """The endpoint that served the session last, while it can take requests."""
        return next((s for s in self.states if s.name == self.held.endpoint and s.status == HEALTHY), None)

    @property
    def first(self) -> EndpointState | None:
        """The strategy's choice: its first endpoint that can take requests."""
        return next((s for s in self.states if s.status == HEALTHY), None)

    def open(self, state: EndpointState) -> bool:
        """Usable and not stepping aside: where a session may be kept for its cache."""
        saturated = self.step_aside_at is not None and state.worst_utilization() >= self.step_aside_at
        return state.status == HEALTHY and not saturated

    def warm(self, state: EndpointState) -> bool:
        return self.held.warm_on(state.name, self.now)


CacheRule = Callable[[Choice, PriceTable], EndpointState | None]


def finish_the_tool_loop(choice: Choice, prices: PriceTable) -> EndpointState | None:
    """A request that answers tool calls goes where the loop began, unless that endpoint fails."""
    return choice.here if choice.prompt.tool_loop else None


def stay_while_cheaper(choice: Choice, prices: PriceTable) -> EndpointState | None:
    """A session kept off the first choice (back from a failover, say) stays where its cache is
    warm while the turns there have cost less extra than rebuilding the cache on the first
    choice: for good at equal prices, never when the first choice is a subscription."""
    here, first, held = choice.here, choice.first, choice.held
    if here is None or first is None or here is first or not choice.open(here) or not choice.warm(here):
        return None
    rebuild = rebuild_cost(prices, first, choice)
    turn_here, turn_there = turn_cost(prices, here, choice), turn_cost(prices, first, choice)
    if rebuild is None or turn_here is None or turn_there is None:
        return here  # a price not known: keep the cache that is known to be warm
    if rebuild <= 0:
        return None  # nothing to rebuild there: a subscription, or a cache warm there too
    extra = turn_here - turn_there
    if extra > 0 and held.extra + extra >= rebuild:
        return None  # the turns here would have cost more than the rebuild: go back now
    held.extra += max(extra, 0.0)
    return here


def leave_for_warm(choice: Choice, prices: PriceTable) -> EndpointState | None:
    """A session that must leave its endpoint goes where its cache is still warm, if anywhere."""
    first = choice.first
    if choice.here is not None or first is None or choice.warm(first):
        return None
    return next((s for s in choice.states if choice.open(s) and choice.warm(s)), None)


CACHE_RULES: tuple[tuple[str, CacheRule], ...] = (
    ("tool_loop", finish_the_tool_loop),
    ("stay_warm", stay_while_cheaper),
    ("to_warm", leave_for_warm),
)
"""The prompt-cache rules, asked in this order; the first that names an endpoint puts it first."""


def flat_priced(state: EndpointState) -> bool:
    """A subscription: its turns and cache writes cost nothing more than it costs already."""
    return state.endpoint.auth == "oauth"


def _rates(prices: PriceTable, state: EndpointState, choice: Choice) -> Rates | None:
    model = choice.prompt.model
    price = prices.price(state.name, state.endpoint.provider, model and state.endpoint.map_model(model))
    held = choice.held
    return None if price is None else price.for_prompt(held.tokens + held.uncached)


def turn_cost(prices: PriceTable, state: EndpointState, choice: Choice) -> float | None:
    """What a turn of the session's prompt costs on `state` with its cache warm there (USD)."""
    if flat_priced(state):
        return 0.0
    rates = _rates(prices, state, choice)
    held = choice.held
    return None if rates is None else rates.cost(Tokens(input=held.uncached, cache_read=held.tokens))


def rebuild_cost(prices: PriceTable, state: EndpointState, choice: Choice) -> float | None:
    """What writing the session's cache again on `state` costs over reading it there (USD)."""
    if flat_priced(state):
        return 0.0
    rates = _rates(prices, state, choice)
    if rates is None:
        return None
    held = choice.held
    missing = max(0, held.tokens - held.cached_on(state.name, choice.now))
    one_hour = choice.prompt.ttl >= TTL_1H
    write = Tokens(cache_write_1h=missing) if one_hour else Tokens(cache_write_5m=missing)
    return rates.cost(write) - rates.cost(Tokens(cache_read=missing))


def _no_count(endpoint: str, rule: str) -> None:
    pass


class Router:
    """Orders the endpoints for each request; remembers which endpoint served each session, and
    where each session's prompt cache is warm."""

    def __init__(
        self,
        routing: Routing,
        sessions: SessionMap | None = None,
        caches: CacheTracker | None = None,
        prices: PriceTable | None = None,
        counted: Callable[[str, str], None] = _no_count,
    ) -> None:
        self.routing = routing
        self.sessions = sessions or SessionMap()
        self.caches = CacheTracker() if caches is None else caches  # an empty one is falsy
        self.caches.scale = routing.cache_ttl_scale  # a reload may change it
        self.prices = prices or shipped()
        self.counted = counted  # (endpoint, rule): a cache rule changed a request's first choice

    @property
    def affinity(self) -> bool:
        # Under `priority` the configured order decides; a session follows it like any request.
        return self.routing.session_affinity and self.routing.strategy != "priority"

    @property
    def keeps_caches(self) -> bool:
        return self.routing.cache_aware and self.routing.session_affinity

    def prompt(self, request: ClientRequest, session: str | None) -> Prompt | None:
        """What the cache rules read of `request`; None when they are off or have nothing to go by."""
        return Prompt.of(request, session) if self.keeps_caches else None

    def order(
        self, pool: EndpointPool, session: str | None, prompt: Prompt | None = None
    ) -> list[EndpointState]:
        states = list(pool)
        if self.routing.strategy == "least-utilized":
            states.sort(key=EndpointState.worst_utilization)  # stable: ties keep the configured order
        if self.affinity and session and (pinned := self.sessions.get(session)):
            states.sort(key=lambda s: not (s.name == pinned and s.status == HEALTHY))
        if (step_aside_at := self.routing.step_aside_at) is not None:
            states.sort(key=lambda s: s.worst_utilization() >= step_aside_at)
        if prompt is not None and self.keeps_caches and (held := self.caches.find(prompt)) is not None:
            states = self.keep_cache(Choice(states, held, prompt, self.caches.clock(), step_aside_at))
        return states

    def keep_cache(self, choice: Choice) -> list[EndpointState]:
        """The order with the endpoint the first cache rule names first, if one does."""
        for rule, decide in CACHE_RULES:
            if (chosen := decide(choice, self.prices)) is not None:
                if chosen is not choice.first:
                    self.counted(chosen.name, rule)
                return [chosen, *(s for s in choice.states if s is not chosen)]
        return choice.states

    def served(
        self,
        session: str | None,
        state: EndpointState,
        prompt: Prompt | None = None,
        usage: Iterable[Usage] = (),
    ) -> bool:
        """Remembers who served the session, and what its answer's `usage` says of the session's
        cache; True when the endpoint is news (a new or moved session)."""
        if prompt is not None and self.keeps_caches:
            self.caches.served(prompt, state.name, usage)
        if not (session and self.affinity):
            return False
        news = self.sessions.get(session) != state.name
        self.sessions.put(session, state.name)
        return news
