"""Which endpoint a request should try first: strategy, session affinity and stepping aside.

The failover loop asks `Router.order` once per request for the endpoints in the order it
should try them, and tells `Router.served` who answered. `priority` keeps the configured
order. `least-utilized` puts the endpoint whose fullest usage window is emptiest first
(an endpoint with no reading counts as empty; ties keep the configured order), and keeps
a session on the endpoint that last served it while that endpoint is usable, because a
prompt cache belongs to one account. With `stepAsideAt`, an endpoint whose fullest window
has reached that fraction goes to the back of the line: it is used only when nothing
ahead of it can take the request, and comes forward again once its window resets.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable

from ..config import Routing
from ..request import ClientRequest
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


class Router:
    """Orders the endpoints for each request; remembers which endpoint served each session."""

    def __init__(self, routing: Routing, sessions: SessionMap | None = None) -> None:
        self.routing = routing
        self.sessions = sessions or SessionMap()

    @property
    def affinity(self) -> bool:
        # Under `priority` the configured order decides; a session follows it like any request.
        return self.routing.session_affinity and self.routing.strategy != "priority"

    def order(self, pool: EndpointPool, session: str | None) -> list[EndpointState]:
        states = list(pool)
        if self.routing.strategy == "least-utilized":
            states.sort(key=EndpointState.worst_utilization)  # stable: ties keep the configured order
        if self.affinity and session and (pinned := self.sessions.get(session)):
            states.sort(key=lambda s: not (s.name == pinned and s.status == HEALTHY))
        if (step_aside_at := self.routing.step_aside_at) is not None:
            states.sort(key=lambda s: s.worst_utilization() >= step_aside_at)
        return states

    def served(self, session: str | None, state: EndpointState) -> bool:
        """Remembers who served the session; True when that is news (a new or moved session)."""
        if not (session and self.affinity):
            return False
        news = self.sessions.get(session) != state.name
        self.sessions.put(session, state.name)
        return news
