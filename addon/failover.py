"""The failover loop: try endpoints in order until one gives an answer worth sending.

Written with tenacity: the stop, wait and retry strategies are small pieces combined,
and the plan (`policy.Plan`) decides which endpoint each attempt goes to. Nothing here
reaches the client; the caller gets either an `UpstreamResponse` to relay or a `Failure`
to send whole.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from . import gateway, limits, sse
from .config import Config
from .endpoints import LIMITS_OK, EndpointPool, EndpointState, iso_time
from .logs import EventLog
from .metrics import Metrics
from .policy import (
    TIMEOUT_KINDS,
    AttemptFailed,
    ErrorResponse,
    Plan,
    RetryBudget,
    backoff_delay,
    cooldown,
    worth_waiting,
)
from .providers import CredentialsError, Provider
from .routing import Router, session_of
from .shared import LocalState
from .upstream import ClientRequest, UpstreamClient, UpstreamResponse

WINDOW_REJECTED = "window_rejected"
PROBE_ASK_AGAIN = 1.0  # while another instance probes, how often to ask for the probe again
UTILIZATION_STEP = 0.01  # a window that moved less than this is not news for the fleet


@dataclass(frozen=True)
class Attempt:
    endpoint: str
    outcome: str
    duration: float
    detail: str = ""


@dataclass
class Failure:
    """What the client gets when no endpoint gave a usable answer."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    reason: str


@dataclass
class Outcome:
    attempts: list[Attempt] = field(default_factory=list)
    response: UpstreamResponse | None = None
    failure: Failure | None = None


class _NoEndpointLeft(Exception):
    pass


class Failover:
    def __init__(
        self,
        config: Config,
        pool: EndpointPool,
        client: UpstreamClient,
        metrics: Metrics,
        events: EventLog,
        budget: RetryBudget,
        router: Router,
        shared: LocalState,
    ) -> None:
        self.config = config
        self.pool = pool
        self.client = client
        self.metrics = metrics
        self.events = events
        self.budget = budget
        self.router = router
        self.shared = shared
        self.published: dict[str, float] = {}  # the worst utilization the fleet last heard of

    async def run(self, request: ClientRequest) -> Outcome:
        retry = self.config.retry
        started = time.monotonic()
        deadline = started + self.config.timeouts.total
        self.budget.record_request(started)
        session = session_of(request)
        if session and self.router.affinity and self.router.sessions.get(session) is None:
            await self._session_elsewhere(session)
        order = self.router.order(self.pool, session)
        outcome = Outcome()
        declined = {s.name: why for s in order if (why := self.client.provider(s.endpoint).declines(request))}
        if declined:
            order = [state for state in order if state.name not in declined]
            if not order:  # the proxy answers: a list of models, 501 for token counts, else 404
                outcome.failure = Failure(*gateway.unserved(request, declined, self.config.active_endpoints))
                return outcome
        plan = Plan(order, retry.max_retries if retry.enabled else 1, self._claim_probe)
        last_failure: list[AttemptFailed] = []
        backoffs = [0]
        waited = [0.0]

        def wait(state: RetryCallState) -> float:
            if plan.has_fresh():
                return 0.0
            return backoff_delay(retry, backoffs[0], plan.asked_to_wait(time.time()))

        def stop(state: RetryCallState) -> bool:
            if time.monotonic() >= deadline:
                return True
            if plan.has_fresh():
                return False
            if plan.exhausted() or not retry.enabled:
                return True
            delay = state.upcoming_sleep
            if delay > retry.max_delay or time.monotonic() + delay >= deadline:
                return True  # the client's own retry logic is better placed to wait this long
            if not worth_waiting(retry, waited[0], delay, plan.until_back(time.time())):
                return True  # no endpoint is expected back soon: the client hears so at once
            if not self.budget.try_spend(time.monotonic()):
                self.metrics.budget_exhausted.inc()
                return True
            backoffs[0] += 1
            waited[0] += delay
            self.metrics.retries.inc()
            return False

        def before_sleep(state: RetryCallState) -> None:
            self.metrics.backoff.inc(state.upcoming_sleep)

        previous: EndpointState | None = None

        async def attempt() -> None:
            nonlocal previous
            state = await plan.fresh() or plan.fallback()
            if state is None:
                raise _NoEndpointLeft
            if previous is not None and previous is not state:
                self.metrics.failovers.labels(previous.name, state.name).inc()
                self.events.event(
                    "failover",
                    from_endpoint=previous.name,
                    to_endpoint=state.name,
                    reason=last_failure[-1].kind if last_failure else None,
                )
            previous = state
            try:
                outcome.response = await self._attempt(state, request, plan, outcome, deadline)
            except AttemptFailed as failure:
                last_failure.append(failure)
                raise
            if self.router.served(session, state):
                self.shared.session_moved(session or "", state.name)

        # The first attempt runs outside tenacity's loop, whose machinery costs about 7% of a
        # healthy request's CPU; its failure enters the loop as the loop's first attempt.
        try:
            await attempt()
            return outcome
        except _NoEndpointLeft:
            outcome.failure = final_failure(last_failure)
            return outcome
        except AttemptFailed as failure:
            replay: list[AttemptFailed] = [failure]
        retrying = AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception_type(AttemptFailed),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for retry_call in retrying:
                with retry_call:
                    if replay:
                        raise replay.pop()
                    await attempt()
        except (AttemptFailed, _NoEndpointLeft):
            outcome.failure = final_failure(last_failure)
        return outcome

    async def _attempt(
        self,
        state: EndpointState,
        request: ClientRequest,
        plan: Plan,
        outcome: Outcome,
        deadline: float,
    ) -> UpstreamResponse:
        plan.record(state)
        name = state.name
        started = time.monotonic()
        probing = state.probe_in_flight

        def judge(response: UpstreamResponse) -> None:
            self._read_limits(state, response.headers)
            # A streamed answer from a subscription's refused window is billed as extra usage
            # and has not begun: another account with room should give it instead. An API
            # key's exhausted window is no such case: it accepted this request.
            until = state.rejected_until()
            if until and request.streaming and response.status == 200 and plan.has_alternative(state):
                raise AttemptFailed(
                    name,
                    WINDOW_REJECTED,
                    f"usage window rejected until {iso_time(until)}",
                    retry_after=until - time.time(),
                    cool_until=until,
                )

        try:
            response = await self.client.send(state.endpoint, request, deadline, judge)
        except AttemptFailed as failure:
            duration = time.monotonic() - started
            if failure.kind != WINDOW_REJECTED:  # declined, not failed: still a last resort
                plan.mark_failed(state, failure, time.time())
            outcome.attempts.append(Attempt(name, failure.kind, duration, failure.detail))
            self.metrics.attempts.labels(name, failure.kind).inc()
            if failure.response is not None:
                self._read_limits(state, failure.response.headers)
            if failure.cools:
                self.endpoint_failed(
                    state, failure, attempt=len(outcome.attempts), duration_ms=round(duration * 1000, 1)
                )
            else:
                state.released()
            if probing:
                self.shared.release_probe(name)
            raise
        except BaseException:
            state.released()
            if probing:
                self.shared.release_probe(name)
            raise
        duration = time.monotonic() - started
        self.metrics.time_to_headers.labels(name).observe(response.time_to_headers)
        kind = "ok" if response.status < 400 else "client_error"
        self.metrics.attempts.labels(name, kind).inc()
        outcome.attempts.append(Attempt(name, kind, duration, f"HTTP {response.status}"))
        state.succeeded()
        if until := state.closed_until():
            self._cool_for_limits(state, until)
        elif probing:
            self.shared.recovered(state)
        if probing:
            self.shared.release_probe(name)
        return response

    async def _session_elsewhere(self, session: str) -> None:
        """A session new to this instance may have been served by another one of the fleet."""
        if pinned := await self.shared.session(session):
            self.router.sessions.put(session, pinned)

    async def _claim_probe(self, state: EndpointState) -> bool:
        if await self.shared.claim_probe(state.name):
            return True
        state.probed_elsewhere(PROBE_ASK_AGAIN)
        return False

    async def prepare(self, provider: Provider) -> None:
        """Finds an endpoint's credentials before its first request; without any, it cools."""
        name = provider.endpoint.name
        # a series at 0 from the start, so that the first refusal is an increase Prometheus sees
        self.metrics.credentials_refused.labels(name)
        try:
            found = await provider.prepare()
        except CredentialsError as e:
            self.events.event("endpoint_credentials_missing", logging.ERROR, endpoint=name, error=str(e))
            if state := self.pool.get(name):
                self.endpoint_failed(state, AttemptFailed(name, "credentials", str(e)))
            return
        self.events.event("endpoint_credentials", logging.DEBUG, endpoint=name, found=found)

    def endpoint_failed(self, state: EndpointState, failure: AttemptFailed, **details: object) -> None:
        """Cools an endpoint that failed a request, and says so in the metrics and the log."""
        seconds = cooldown(self.config.retry, failure, time.time())
        state.failed(failure.kind, seconds, failure.status)
        self.shared.cooled(state)
        self.metrics.cooldowns.labels(state.name, failure.kind).inc()
        if failure.refused_credentials:
            self.metrics.credentials_refused.labels(state.name).inc()
            self.events.event(
                "endpoint_credentials_refused", logging.ERROR, endpoint=state.name, status=failure.status
            )
        self.events.event(
            "endpoint_cooling",
            logging.WARNING,
            endpoint=state.name,
            reason=failure.kind,
            status=failure.status,
            detail=failure.detail,
            cooldown_seconds=round(seconds, 3),
            **{k: v for k, v in details.items() if v is not None},
        )

    def _read_limits(self, state: EndpointState, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        reading = limits.read(
            ((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers),
            self.config.streaming.ratelimit_threshold,
        )
        if not reading:
            return
        state.observe(reading)
        limit_state = state.limit_state(self.config.routing.step_aside_at)
        worst = state.worst_utilization()
        if (
            limit_state != state.limits_logged
            or abs(worst - self.published.get(state.name, -1)) >= UTILIZATION_STEP
        ):
            self.published[state.name] = worst
            self.shared.read_limits(state)
        if limit_state != state.limits_logged:
            windows = state.current_windows()
            self.events.event(
                "endpoint_limits",
                logging.INFO if limit_state == LIMITS_OK else logging.WARNING,
                endpoint=state.name,
                state="reset" if limit_state == LIMITS_OK else limit_state,
                previous=state.limits_logged,
                windows=" ".join(
                    f"{name}={w.utilization:.0%}" for name, w in windows.items() if w.utilization is not None
                )
                or None,
                resets_at=iso_time(state.closed_until()),
            )
            state.limits_logged = limit_state

    def _cool_for_limits(self, state: EndpointState, until: float) -> None:
        """Skips an endpoint whose answer came from a closed window, until the window reopens."""
        if until <= state.cooling_until:
            return
        windows = state.current_windows()
        exhausted = [n for n, w in windows.items() if w.status == limits.EXHAUSTED and w.resets_at == until]
        api_key = bool(exhausted)
        reason = f"ratelimit_{exhausted[0].replace('-', '_')}_exhausted" if api_key else WINDOW_REJECTED
        state.cool(until, reason)
        self.shared.cooled(state)
        self.metrics.cooldowns.labels(state.name, "ratelimit" if api_key else WINDOW_REJECTED).inc()
        self.events.event(
            "endpoint_cooling", logging.WARNING, endpoint=state.name, reason=reason, until=iso_time(until)
        )


def final_failure(failures: list[AttemptFailed]) -> Failure:
    """What the endpoints said, when none gave an answer worth relaying.

    A 429 when one came, the one with the soonest `retry-after` (the client's own retry
    logic then waits the least); else the last upstream error response as it came; else an
    Anthropic-shaped error naming every attempt. A refusal of the proxy's own credentials
    carries no response to relay: to Claude Code a 401 means that the user's login is bad.
    """
    answered = [f for f in failures if f.response is not None]
    limited = [f for f in answered if f.status == 429]
    if limited:  # of equal waits, the last one, as the rule was before
        answered = [min(reversed(limited), key=_wait_asked)]
    if answered:
        response = answered[-1].response
        assert isinstance(response, ErrorResponse)
        return Failure(response.status, response.headers, response.body, f"HTTP {response.status}")
    counts = Counter((f.endpoint, f.detail) for f in failures)
    tried = "; ".join(
        f"{name}: {detail}" + (f" ({n} attempts)" if n > 1 else "") for (name, detail), n in counts.items()
    )
    refused = [f for f in failures if f.refused_credentials]
    if refused and len(refused) == len(failures):
        message = f"Every endpoint refused the proxy's credentials: {tried}. Check each endpoint's key"
        return error_failure(502, "api_error", f"{message} or cloud credentials; `ccf status` shows them.")
    last = failures[-1] if failures else None
    if last is not None and last.kind == "sse_error":
        status, error_type = (last.status or 529), "overloaded_error"
        if status == 429:
            error_type = "rate_limit_error"
    elif failures and all(f.kind in TIMEOUT_KINDS for f in failures):
        status, error_type = 504, "timeout_error"
    else:
        status, error_type = 502, "api_error"
    message = f"All endpoints failed: {tried or 'no endpoint is enabled'}"
    if refused:
        message += " (`ccf status` shows which endpoints refused the proxy's credentials)"
    return error_failure(status, error_type, message)


def _wait_asked(failure: AttemptFailed) -> float:
    return math.inf if failure.retry_after is None else failure.retry_after


def error_failure(status: int, error_type: str, message: str) -> Failure:
    return Failure(
        status, ((b"content-type", b"application/json"),), sse.error_body(error_type, message), message
    )
