"""The failover loop: try endpoints in order until one gives an answer worth sending.

Written with tenacity: the stop, wait and retry strategies are small pieces combined,
and the plan (`policy.Plan`) decides which endpoint each attempt goes to. Nothing here
reaches the client; the caller gets either an `UpstreamResponse` to relay or a `Failure`
to send whole.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from ..config import Config
from ..fleet.shared_state import LocalState
from ..logs import EventLog
from ..metrics import Metrics
from ..providers import CredentialsError, Provider
from ..request import TIMEOUT_KINDS, AttemptFailed, ClientRequest, ErrorResponse, Failure, Kind, error_failure
from ..state import limits
from ..state.endpoints import LIMITS_OK, EndpointPool, EndpointState, iso_time
from ..state.policy import Plan, RetryBudget, backoff_delay, cooldown, worth_waiting
from ..state.routing import Router, session_of
from . import gateway
from .client import UpstreamClient, UpstreamResponse

WINDOW_REJECTED = Kind.WINDOW_REJECTED
PROBE_ASK_AGAIN = 1.0  # while another instance probes, how often to ask for the probe again
UTILIZATION_STEP = 0.01  # a window that moved less than this is not news for the fleet


@dataclass(frozen=True)
class Attempt:
    """One attempt's record: the endpoint, its outcome (a `Kind`, `ok` or `client_error`), how long
    it took and what it said."""

    endpoint: str
    outcome: str
    duration: float
    detail: str = ""


@dataclass
class Outcome:
    """What a request's failover ends with: its attempts, and an answer to relay or a failure to send."""

    attempts: list[Attempt] = field(default_factory=list)
    response: UpstreamResponse | None = None
    failure: Failure | None = None


class _NoEndpointLeft(Exception):
    pass


class Failover:
    """Tries the endpoints for each request (`run`), cools those that fail and reads the limits
    their answers carry; one per runtime (runtime.py)."""

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
        """Tries the endpoints for `request` until one gives an answer worth sending."""
        return await _Run(self, request).go()

    async def attempt(
        self, state: EndpointState, request: ClientRequest, plan: Plan, outcome: Outcome, deadline: float
    ) -> UpstreamResponse:
        """One attempt at `state`'s endpoint, recorded in `outcome`, the metrics and the endpoint's state."""
        plan.record(state)
        started = time.monotonic()
        probing = state.probe_in_flight
        traced = request.trace.attempt(state.endpoint, request)
        try:
            judge = functools.partial(self._judge, state, request, plan)
            response = await self.client.send(state.endpoint, request, deadline, judge)
        except AttemptFailed as failure:
            self._attempt_failed(state, failure, plan, outcome, time.monotonic() - started)
            self._release_probe(state, probing)
            traced.failed(failure, failure.cools)
            raise
        except BaseException as error:
            traced.abandoned(error)
            state.released()
            self._release_probe(state, probing)
            raise
        kind = "ok" if response.status < 400 else "client_error"
        self.metrics.time_to_headers.labels(state.name).observe(response.time_to_headers)
        self.metrics.attempts.labels(state.name, kind).inc()
        outcome.attempts.append(
            Attempt(state.name, kind, time.monotonic() - started, f"HTTP {response.status}")
        )
        state.succeeded()
        if until := state.closed_until():
            self._cool_for_limits(state, until)
        elif probing:
            self.shared.recovered(state)
        self._release_probe(state, probing)
        traced.answered(response, bool(until))
        return response

    def _release_probe(self, state: EndpointState, probing: bool) -> None:
        if probing:
            self.shared.release_probe(state.name)

    def _judge(
        self, state: EndpointState, request: ClientRequest, plan: Plan, response: UpstreamResponse
    ) -> None:
        """Reads an acceptable answer's limits; refuses one from a subscription's refused window.

        Such a streamed answer is billed as extra usage and has not begun: another account
        with room should give it instead. An API key's exhausted window is no such case: it
        accepted this request.
        """
        self._read_limits(state, response.headers)
        until = state.rejected_until()
        if until and request.streaming and response.status == 200 and plan.has_alternative(state):
            raise AttemptFailed(
                state.name,
                WINDOW_REJECTED,
                f"usage window rejected until {iso_time(until)}",
                retry_after=until - time.time(),
                cool_until=until,
            )

    def _attempt_failed(
        self, state: EndpointState, failure: AttemptFailed, plan: Plan, outcome: Outcome, duration: float
    ) -> None:
        if failure.kind != WINDOW_REJECTED:  # declined, not failed: still a last resort
            plan.mark_failed(state, failure, time.time())
        outcome.attempts.append(Attempt(state.name, failure.kind, duration, failure.detail))
        self.metrics.attempts.labels(state.name, failure.kind).inc()
        if failure.response is not None:
            self._read_limits(state, failure.response.headers)
        if failure.cools:
            attempt, duration_ms = len(outcome.attempts), round(duration * 1000, 1)
            self.endpoint_failed(state, failure, attempt=attempt, duration_ms=duration_ms)
        else:
            state.released()

    async def resume(self, request: ClientRequest, broken: str, reason: Kind) -> UpstreamResponse | None:
        """Continues a stream that broke mid-answer on the next endpoint that answers."""
        request.trace.resumed(broken, reason)
        if state := self.pool.get(broken):
            self.endpoint_failed(state, AttemptFailed(broken, reason, "stream broke mid-answer"))
        response = (await self.run(request)).response
        if response is None or response.status != 200:
            self.events.event("stream_resume_failed", logging.WARNING, from_endpoint=broken, reason=reason)
            return response
        to = response.endpoint.name
        self.metrics.resumes.labels(broken, to).inc()
        self.events.event(
            "stream_resumed", logging.WARNING, from_endpoint=broken, to_endpoint=to, reason=reason
        )
        return response

    async def session_elsewhere(self, session: str) -> None:
        """A session new to this instance may have been served by another one of the fleet."""
        if pinned := await self.shared.session(session):
            self.router.sessions.put(session, pinned)

    async def claim_probe(self, state: EndpointState) -> bool:
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
                self.endpoint_failed(state, AttemptFailed(name, Kind.CREDENTIALS, str(e)))
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


class _Run:
    """One request's way through the endpoints: its plan, its failures and its waits.

    tenacity's stop, wait and before-sleep strategies are its methods, each deciding one
    thing; the plan (`policy.Plan`) says which endpoint each attempt goes to.
    """

    def __init__(self, failover: Failover, request: ClientRequest) -> None:
        self.failover = failover
        self.request = request
        self.retry = failover.config.retry
        started = time.monotonic()
        self.deadline = started + failover.config.timeouts.total
        failover.budget.record_request(started)
        self.session = session_of(request)
        self.prompt = failover.router.prompt(request, self.session)  # what the cache rules read
        self.outcome = Outcome()
        self.plan = Plan([], 0, failover.claim_probe)
        self.failures: list[AttemptFailed] = []
        self.backoffs = 0  # waits so far, for the backoff's growth
        self.waited = 0.0  # seconds waited so far, against `maxWaitSeconds`
        self.previous: EndpointState | None = None

    async def go(self) -> Outcome:
        order = await self.endpoints()
        if self.outcome.failure is not None:
            return self.outcome
        self.plan = Plan(
            order, self.retry.max_retries if self.retry.enabled else 1, self.failover.claim_probe
        )
        # The first attempt runs outside tenacity's loop, whose machinery costs about 7% of a
        # healthy request's CPU; its failure enters the loop as the loop's first attempt.
        try:
            await self.attempt()
            return self.outcome
        except _NoEndpointLeft:
            return self.failed()
        except AttemptFailed as failure:
            first = [failure]
        retrying = AsyncRetrying(
            stop=self.stop,
            wait=self.wait,
            retry=retry_if_exception_type(AttemptFailed),
            before_sleep=self.before_sleep,
            reraise=True,
        )
        try:
            async for retry_call in retrying:
                with retry_call:
                    if first:
                        raise first.pop()
                    await self.attempt()
        except (AttemptFailed, _NoEndpointLeft):
            return self.failed()
        return self.outcome

    async def endpoints(self) -> list[EndpointState]:
        """The endpoints to try, in routing's order, less those that decline the request.

        When all decline, the proxy answers itself: a list of models, 501 for token counts,
        else 404.
        """
        failover, request, session = self.failover, self.request, self.session
        if session and failover.router.affinity and failover.router.sessions.get(session) is None:
            await failover.session_elsewhere(session)
        order = failover.router.order(failover.pool, session, self.prompt)
        declined = {
            s.name: why for s in order if (why := failover.client.provider(s.endpoint).declines(request))
        }
        order = [state for state in order if state.name not in declined]
        if declined and not order:
            unserved = gateway.unserved(request, declined, failover.config.active_endpoints)
            self.outcome.failure = Failure(*unserved)
        return order

    async def attempt(self) -> None:
        failover, plan = self.failover, self.plan
        state = await plan.fresh() or plan.fallback()
        if state is None:
            raise _NoEndpointLeft
        if self.previous is not None and self.previous is not state:
            failover.metrics.failovers.labels(self.previous.name, state.name).inc()
            reason = self.failures[-1].kind if self.failures else None
            failover.events.event(
                "failover", from_endpoint=self.previous.name, to_endpoint=state.name, reason=reason
            )
        self.previous = state
        try:
            self.outcome.response = response = await failover.attempt(
                state, self.request, plan, self.outcome, self.deadline
            )
        except AttemptFailed as failure:
            self.failures.append(failure)
            raise
        # A stream's usage so far is its message_start's, read with the held preamble.
        prompt = self.prompt if response.status < 300 else None
        if failover.router.served(self.session, state, prompt, response.usage):
            failover.shared.session_moved(self.session or "", state.name)

    def wait(self, retry_state: RetryCallState) -> float:
        """No wait while a fresh endpoint is left; else backoff, at least what the endpoint asked."""
        if self.plan.has_fresh():
            return 0.0
        return backoff_delay(self.retry, self.backoffs, self.plan.asked_to_wait(time.time()))

    def stop(self, retry_state: RetryCallState) -> bool:
        """Whether to give the client what the endpoints said rather than wait and try again."""
        retry, plan = self.retry, self.plan
        if time.monotonic() >= self.deadline:
            return True
        if plan.has_fresh():
            return False
        if plan.exhausted() or not retry.enabled:
            return True
        delay = retry_state.upcoming_sleep
        if delay > retry.max_delay or time.monotonic() + delay >= self.deadline:
            return True  # the client's own retry logic is better placed to wait this long
        if not worth_waiting(retry, self.waited, delay, plan.until_back(time.time())):
            return True  # no endpoint is expected back soon: the client hears so at once
        metrics = self.failover.metrics
        if not self.failover.budget.try_spend(time.monotonic()):
            metrics.budget_exhausted.inc()
            return True
        self.backoffs += 1
        self.waited += delay
        metrics.retries.inc()
        return False

    def before_sleep(self, retry_state: RetryCallState) -> None:
        self.failover.metrics.backoff.inc(retry_state.upcoming_sleep)

    def failed(self) -> Outcome:
        self.outcome.failure = final_failure(self.failures)
        return self.outcome


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
