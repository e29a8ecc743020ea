"""The fault matrix's rules for a request before its first byte, in-process: `Failover.run`
against a scripted upstream, no socket.

`Upstream` stands where `UpstreamClient` stands, as httpx's `MockTransport` stands where a
transport does: each endpoint answers each attempt as the test scripts it, an answer the
client should get or the `AttemptFailed` the real client raises for that fault. Each test
reads back what the client got, what each endpoint saw, how each endpoint stands and what
the metrics counted. Which answers fail over (a status of `retry.statuses`, a refusal of
the proxy's own key) is the real client's judgement, shown on the wire by test_failover.py,
test_credentials.py and test_faults.py; here is what the failover loop does with it.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import pytest

from addon import providers, sse
from addon.config import Config, Endpoint, Retry, Routing
from addon.fleet.shared_state import LocalState
from addon.logs import EventLog
from addon.metrics import Metrics
from addon.request import AttemptFailed, ClientRequest, ErrorResponse, Failure, Kind
from addon.state.endpoints import COOLING, HEALTHY, PROBING, EndpointPool, EndpointState, reason_text
from addon.state.policy import RetryBudget
from addon.state.routing import Router
from addon.upstream.client import FAILURE_TEXT, UpstreamClient, UpstreamResponse
from addon.upstream.failover import Failover, Outcome, final_failure

SESSION = "5f0c7f4e-2a51-4c3b-9d1e-7a6b5c4d3e2f"
# No request here waits half a second; one that waits this long is a failure, not a slow test.
RUN_LIMIT = 5.0
Headers = tuple[tuple[str, str], ...]


# -- the scripted upstream --------------------------------------------------------------------


class Gate:
    """Holds an attempt until the test opens it, and says when one is waiting there."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def pass_through(self) -> None:
        self.reached.set()
        await self.opened.wait()


@dataclass(frozen=True)
class Answer:
    """An answer the client should get (a success, or a 4xx that is the request's own fault)."""

    status: int = 200
    headers: Headers = ()
    body: bytes = b'{"type":"message","content":[]}'
    gate: Gate | None = None

    def response(self, endpoint: Endpoint) -> UpstreamResponse:
        # read whole, as the real client holds an answer it has read to its end
        return UpstreamResponse(
            endpoint=endpoint,
            response=cast(aiohttp.ClientResponse, NoConnection()),
            status=self.status,
            reason="",
            headers=encoded(self.headers),
            time_to_headers=0.0,
            idle_timeout=90.0,
            held=[self.body],
            complete=True,
        )


@dataclass(frozen=True)
class Fail:
    """An attempt that fails before the first byte, as the real client reports it."""

    kind: Kind
    detail: str
    status: int | None = None
    headers: Headers = ()
    body: bytes | None = None  # the error answer kept whole, for the client when nothing better comes
    final: bool = False
    gate: Gate | None = None

    def failure(self, endpoint: str) -> AttemptFailed:
        raw = encoded(self.headers)
        response = (
            None if self.body is None or self.status is None else ErrorResponse(self.status, raw, self.body)
        )
        return AttemptFailed(
            endpoint,
            self.kind,
            self.detail,
            status=self.status,
            retry_after=providers.retry_after(raw),
            response=response,
            final=self.final,
        )


Step = Answer | Fail


class NoConnection:
    """The connection behind a scripted answer: there is none to close."""

    def close(self) -> None:
        return None

    def release(self) -> None:
        return None


class Declines:
    """What failover asks of an endpoint's provider: whether it takes the request at all."""

    def __init__(self, why: str | None) -> None:
        self.why = why

    def declines(self, request: ClientRequest) -> str | None:
        return self.why


class Upstream:
    """Stands where `UpstreamClient` stands: `send` and `provider`, and nothing else.

    Each endpoint (in the order given) answers its attempts with its steps in turn; its last
    step answers every attempt after it. An endpoint no attempt should reach gets no step.
    """

    def __init__(self, **scripts: list[Step]) -> None:
        self.scripts = {name: list(steps) for name, steps in scripts.items()}
        self.seen: dict[str, list[ClientRequest]] = defaultdict(list)
        self.declined: dict[str, str] = {}

    async def send(
        self,
        endpoint: Endpoint,
        request: ClientRequest,
        deadline: float,
        judge: Callable[[UpstreamResponse], None] | None = None,
    ) -> UpstreamResponse:
        self.seen[endpoint.name].append(request)
        steps = self.scripts[endpoint.name]
        assert steps, f"{endpoint.name} was sent a request it should never see"
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        if step.gate is not None:
            await step.gate.pass_through()
        if isinstance(step, Fail):
            raise step.failure(endpoint.name)
        response = step.response(endpoint)
        if judge is not None:  # the real client lets failover judge an answer's headers, then holds it
            judge(response)
        return response

    def provider(self, endpoint: Endpoint) -> Declines:
        return Declines(self.declined.get(endpoint.name))

    def times(self, name: str) -> int:
        return len(self.seen[name])


def encoded(headers: Headers) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)


def ok(*headers: tuple[str, str], gate: Gate | None = None) -> Answer:
    return Answer(200, headers, gate=gate)


def error(status: int, *headers: tuple[str, str]) -> Fail:
    """An error status of `retry.statuses`, its answer kept whole."""
    error_type = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
    return Fail(Kind.STATUS, f"HTTP {status}", status, headers, sse.error_body(error_type, f"HTTP {status}"))


def broken(kind: Kind) -> Fail:
    """A failure before any answer: a connection that failed, a stream that broke before content."""
    if kind == Kind.SSE_ERROR:
        return Fail(kind, "stream error event before content (529)", 529)
    if kind == Kind.FIRST_BYTE_TIMEOUT:
        return Fail(kind, "no response headers within 30 s")
    if kind == Kind.IDLE_TIMEOUT:
        return Fail(kind, "stream silent for 90 s before content")
    return Fail(kind, FAILURE_TEXT[kind])


def refused_key(status: int = 401) -> Fail:
    """The endpoint refused credentials the proxy chose: no answer to relay."""
    return Fail(
        Kind.CREDENTIALS, f"HTTP {status}: the endpoint refused the proxy's credentials", status, final=True
    )


def retry_after(seconds: object) -> tuple[str, str]:
    return ("retry-after", str(seconds))


# -- the core, assembled as the proxy assembles it --------------------------------------------


class Clock:
    """The endpoints' clock, moved by the test: a cooldown ends without waiting for it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Core:
    upstream: Upstream
    pool: EndpointPool
    metrics: Metrics
    events: list[tuple[str, dict[str, Any]]]
    failover: Failover

    def send(self, request: ClientRequest | None = None) -> Outcome:
        return asyncio.run(self.run(request))

    async def run(self, request: ClientRequest | None = None) -> Outcome:
        return await asyncio.wait_for(self.failover.run(request or message()), RUN_LIMIT)

    def state(self, name: str) -> EndpointState:
        state = self.pool.get(name)
        assert state is not None
        return state

    def count(self, metric: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(f"ccf_{metric}_total", labels) or 0.0

    def said(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]


def core(
    upstream: Upstream,
    retry: Retry | None = None,
    routing: Routing | None = None,
    clock: Callable[[], float] = time.time,
) -> Core:
    retry, routing = retry or Retry(), routing or Routing()
    endpoints = tuple(Endpoint(name=name, base_url=f"https://{name}.example") for name in upstream.scripts)
    config = Config(endpoints=endpoints, retry=retry, routing=routing)
    pool = EndpointPool.build(config.endpoints, clock=clock)
    metrics = Metrics(pool)
    events = EventLog()
    heard: list[tuple[str, dict[str, Any]]] = []
    events.listeners.append(lambda name, fields: heard.append((name, dict(fields))))
    budget = RetryBudget(retry.budget_ratio, retry.budget_min_retries)
    client = cast(UpstreamClient, upstream)
    failover = Failover(config, pool, client, metrics, events, budget, Router(routing), LocalState())
    return Core(upstream, pool, metrics, heard, failover)


def message(stream: bool = False, session: str | None = None, path: str = "/v1/messages") -> ClientRequest:
    payload = {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream, "messages": []}
    headers = [("content-type", "application/json")]
    if session:
        headers.append(("x-claude-code-session-id", session))
    return ClientRequest.parse("POST", path, headers, json.dumps(payload).encode())


def served_by(outcome: Outcome) -> str:
    assert outcome.response is not None, outcome.failure
    return outcome.response.endpoint.name


def tried(outcome: Outcome) -> list[tuple[str, str]]:
    return [(a.endpoint, a.outcome) for a in outcome.attempts]


def error_of(failure: Failure | None) -> dict[str, str]:
    assert failure is not None
    return cast(dict[str, str], json.loads(failure.body)["error"])


# -- failing over before the first byte -------------------------------------------------------


def test_a_429_fails_over_and_the_primary_cools_for_its_retry_after() -> None:
    proxy = core(Upstream(primary=[error(429, retry_after(600))], backup=[ok()]))
    request = message()
    outcome = proxy.send(request)
    assert served_by(outcome) == "backup"
    assert tried(outcome) == [("primary", "status"), ("backup", "ok")]
    assert [r.body for r in proxy.upstream.seen["backup"]] == [request.body]  # the same bytes again
    primary = proxy.state("primary")
    assert primary.status == COOLING and 599 < primary.cooldown_left() <= 600  # past cooldownSeconds (300)
    assert (primary.cooling_reason, primary.last_status) == ("status", 429)
    assert proxy.count("upstream_attempts", endpoint="primary", outcome="status") == 1
    assert proxy.count("upstream_attempts", endpoint="backup", outcome="ok") == 1
    assert proxy.count("failovers", from_endpoint="primary", to_endpoint="backup") == 1
    assert proxy.count("endpoint_cooldowns", endpoint="primary", reason="status") == 1
    assert proxy.count("retries") == 0 and proxy.count("backoff_seconds") == 0
    (failover,) = proxy.said("failover")
    assert failover == {"from_endpoint": "primary", "to_endpoint": "backup", "reason": "status"}


def test_the_next_requests_skip_an_endpoint_that_cools() -> None:
    proxy = core(Upstream(primary=[error(429, retry_after(30))], backup=[ok()]))
    proxy.send()
    later = [proxy.send() for _ in range(3)]
    assert [tried(outcome) for outcome in later] == [[("backup", "ok")]] * 3
    assert proxy.upstream.times("primary") == 1 and proxy.upstream.times("backup") == 4
    assert proxy.count("failovers", from_endpoint="primary", to_endpoint="backup") == 1


@pytest.mark.parametrize(("form", "seconds"), [("http-date", 900), ("milliseconds", 700)])
def test_a_retry_after_as_a_date_or_in_milliseconds_sets_the_cooldown(form: str, seconds: float) -> None:
    header = (
        ("retry-after", email.utils.formatdate(time.time() + seconds, usegmt=True))  # dated when it runs
        if form == "http-date"
        else ("retry-after-ms", str(seconds * 1000))
    )
    proxy = core(Upstream(primary=[error(429, header)], backup=[ok()]))
    assert served_by(proxy.send()) == "backup"
    assert seconds - 3 < proxy.state("primary").cooldown_left() <= seconds  # a date counts in whole seconds


@pytest.mark.parametrize("status", [529, 500, 502, 503, 504])
def test_an_overloaded_or_failing_endpoint_fails_over_and_cools(status: int) -> None:
    proxy = core(Upstream(primary=[error(status)], backup=[ok()]), Retry(cooldown_seconds=45))
    outcome = proxy.send()
    assert served_by(outcome) == "backup"
    assert tried(outcome) == [("primary", "status"), ("backup", "ok")]
    primary = proxy.state("primary")
    assert 44 < primary.cooldown_left() <= 45 and primary.last_status == status
    assert proxy.state("backup").status == HEALTHY
    assert proxy.count("failovers", from_endpoint="primary", to_endpoint="backup") == 1
    assert proxy.count("endpoint_cooldowns", endpoint="primary", reason="status") == 1


@pytest.mark.parametrize(
    "kind",
    [
        Kind.REFUSED,
        Kind.DNS,
        Kind.RESET,
        Kind.TLS,
        Kind.CONNECT_TIMEOUT,
        Kind.FIRST_BYTE_TIMEOUT,
        Kind.CLOSED,
        Kind.MALFORMED,
        Kind.SSE_ERROR,
        Kind.IDLE_TIMEOUT,
    ],
)
def test_a_broken_attempt_fails_over_at_once(kind: Kind) -> None:
    proxy = core(Upstream(primary=[broken(kind)], backup=[ok()]))
    outcome = proxy.send()
    assert tried(outcome) == [("primary", kind), ("backup", "ok")]
    assert proxy.count("backoff_seconds") == 0 and proxy.count("retries") == 0  # no sleep: another was free
    assert proxy.state("primary").cooling_reason == kind
    assert proxy.count("upstream_attempts", endpoint="primary", outcome=kind) == 1
    assert proxy.count("endpoint_cooldowns", endpoint="primary", reason=kind) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_a_client_error_is_relayed_untouched_and_nothing_else_is_tried_or_cooled(status: int) -> None:
    body = sse.error_body("invalid_request_error", "the request's own fault")
    answer = Answer(status, (("request-id", "req_0001"),), body)
    proxy = core(Upstream(primary=[answer], backup=[]))
    outcome = proxy.send()
    assert outcome.response is not None and outcome.failure is None
    assert (outcome.response.status, outcome.response.held) == (status, [body])
    assert outcome.response.headers == ((b"request-id", b"req_0001"),)
    assert tried(outcome) == [("primary", "client_error")]
    assert proxy.upstream.times("backup") == 0
    assert [s.status for s in proxy.pool] == [HEALTHY, HEALTHY]
    assert proxy.count("upstream_attempts", endpoint="primary", outcome="client_error") == 1
    assert proxy.metrics.registry.get_sample_value(
        "ccf_endpoint_cooldowns_total", {"endpoint": "primary", "reason": "status"}
    ) in (None, 0.0)
    assert not proxy.said("failover") and not proxy.said("endpoint_cooling")


def test_a_refused_key_of_the_proxys_own_fails_over_and_cools_for_the_credentials_cooldown() -> None:
    retry = Retry(cooldown_seconds=30, credentials_cooldown_seconds=3600)
    proxy = core(Upstream(primary=[refused_key(403)], backup=[ok()]), retry)
    outcome = proxy.send()
    assert served_by(outcome) == "backup"
    assert tried(outcome) == [("primary", "credentials"), ("backup", "ok")]
    primary = proxy.state("primary")
    assert 3599 < primary.cooldown_left() <= 3600
    assert reason_text(primary.cooling_reason, primary.last_status) == "credentials refused (HTTP 403)"
    assert proxy.count("endpoint_credentials_refused", endpoint="primary") == 1
    assert proxy.count("endpoint_cooldowns", endpoint="primary", reason="credentials") == 1
    assert [e["status"] for e in proxy.said("endpoint_credentials_refused")] == [403]


def test_when_every_endpoint_refuses_the_proxys_credentials_the_client_gets_a_502_naming_ccf_status() -> None:
    # Nothing but the refusal keeps the request from going back: no cooldown, no backoff.
    retry = Retry(cooldown_seconds=0, credentials_cooldown_seconds=0, initial_delay=0, max_delay=0)
    proxy = core(Upstream(primary=[refused_key(401)], backup=[refused_key(403)]), retry)
    outcome = proxy.send()
    assert outcome.failure is not None and outcome.failure.status == 502
    error = error_of(outcome.failure)
    assert error["type"] == "api_error" and "`ccf status`" in error["message"]
    assert error["message"].startswith("Every endpoint refused the proxy's credentials: primary: HTTP 401")
    assert tried(outcome) == [("primary", "credentials"), ("backup", "credentials")]  # neither again
    assert proxy.count("retries") == 0
    assert proxy.count("endpoint_credentials_refused", endpoint="backup") == 1


def test_a_refusal_of_the_proxys_credentials_gives_way_to_another_endpoints_429() -> None:
    proxy = core(Upstream(primary=[refused_key()], backup=[error(429, retry_after(20))]))
    failure = proxy.send().failure
    assert failure is not None and failure.status == 429
    assert dict(failure.headers)[b"retry-after"] == b"20"


def test_missing_credentials_fail_over_and_cool_for_the_ordinary_cooldown() -> None:
    missing = Fail(Kind.CREDENTIALS, "no AWS credentials found", final=True)
    retry = Retry(cooldown_seconds=30, credentials_cooldown_seconds=3600)
    proxy = core(Upstream(primary=[missing], backup=[ok()]), retry)
    assert served_by(proxy.send()) == "backup"
    primary = proxy.state("primary")
    assert 29 < primary.cooldown_left() <= 30 and primary.cooling_reason == "credentials"
    assert proxy.count("endpoint_credentials_refused", endpoint="primary") == 0
    assert not proxy.said("endpoint_credentials_refused")


def test_a_request_only_an_endpoint_without_credentials_could_serve_gets_a_502_naming_it_at_once() -> None:
    missing = Fail(Kind.CREDENTIALS, "no AWS credentials found", final=True)
    proxy = core(Upstream(bedrock=[missing]), Retry(cooldown_seconds=0, initial_delay=0))
    outcome = proxy.send()
    assert outcome.failure is not None and outcome.failure.status == 502
    assert "bedrock: no AWS credentials found" in error_of(outcome.failure)["message"]
    assert len(outcome.attempts) == 1 and proxy.count("retries") == 0


UNTRANSLATABLE = Fail(
    Kind.UNTRANSLATABLE,
    "a document block has no OpenAI form",
    400,
    body=sse.error_body("invalid_request_error", "a document block has no OpenAI form"),
    final=True,
)


def test_a_request_an_endpoint_cannot_express_passes_it_over_without_cooling_it() -> None:
    proxy = core(Upstream(openai=[UNTRANSLATABLE], backup=[ok()]))
    outcome = proxy.send()
    assert served_by(outcome) == "backup"
    assert tried(outcome) == [("openai", "untranslatable"), ("backup", "ok")]
    assert proxy.state("openai").status == HEALTHY and proxy.state("openai").cooling_until == 0
    assert not proxy.said("endpoint_cooling")


def test_a_request_no_other_endpoint_can_take_gets_the_400_that_says_why() -> None:
    proxy = core(Upstream(openai=[UNTRANSLATABLE]), Retry(cooldown_seconds=0, initial_delay=0))
    outcome = proxy.send()
    assert outcome.failure is not None and outcome.failure.status == 400
    assert error_of(outcome.failure) == {
        "type": "invalid_request_error",
        "message": "a document block has no OpenAI form",
    }
    assert proxy.upstream.times("openai") == 1 and proxy.state("openai").status == HEALTHY


def test_a_declined_endpoint_is_never_sent_the_request() -> None:
    upstream = Upstream(bedrock=[], backup=[ok()])
    upstream.declined["bedrock"] = "Bedrock counts no tokens"
    proxy = core(upstream)
    outcome = proxy.send(message(path="/v1/messages/count_tokens"))
    assert tried(outcome) == [("backup", "ok")]
    assert upstream.times("bedrock") == 0 and proxy.state("bedrock").status == HEALTHY
    assert not proxy.said("failover")


@pytest.mark.parametrize(
    ("path", "status", "error_type"),
    [("/v1/messages", 404, "not_found_error"), ("/v1/messages/count_tokens", 501, "not_supported")],
)
def test_a_request_every_endpoint_declines_is_answered_by_the_proxy(
    path: str, status: int, error_type: str
) -> None:
    upstream = Upstream(bedrock=[], openai=[])
    upstream.declined.update(bedrock="not served on Bedrock", openai="not served by Chat Completions")
    outcome = core(upstream).send(message(path=path))
    assert outcome.failure is not None and outcome.failure.status == status
    error = error_of(outcome.failure)
    assert error["type"] == error_type
    assert "bedrock: not served on Bedrock; openai: not served by Chat Completions" in error["message"]
    assert outcome.attempts == [] and dict(upstream.seen) == {}


# -- when every endpoint fails ----------------------------------------------------------------


def test_every_endpoint_rate_limited_answers_at_once_with_the_soonest_retry_after() -> None:
    upstream = Upstream(
        primary=[error(429, retry_after(30), ("x-from", "primary"))],
        backup=[error(429, retry_after(20), ("x-from", "backup"))],
    )
    proxy = core(upstream, Retry(max_wait_seconds=5))
    outcome = proxy.send()
    assert outcome.failure is not None and outcome.failure.status == 429
    assert dict(outcome.failure.headers) == {b"retry-after": b"20", b"x-from": b"backup"}
    assert error_of(outcome.failure)["type"] == "rate_limit_error"
    assert tried(outcome) == [("primary", "status"), ("backup", "status")]  # each once, no wait
    assert proxy.count("retries") == 0 and proxy.count("backoff_seconds") == 0


def test_every_endpoint_overloaded_answers_the_last_529_once_each_was_tried() -> None:
    upstream = Upstream(
        primary=[error(529, ("x-from", "primary"))], backup=[error(529, ("x-from", "backup"))]
    )
    proxy = core(upstream, Retry(cooldown_seconds=300, max_wait_seconds=5))
    outcome = proxy.send()
    assert outcome.failure is not None and outcome.failure.status == 529
    assert dict(outcome.failure.headers)[b"x-from"] == b"backup"
    assert error_of(outcome.failure)["type"] == "overloaded_error"
    assert len(outcome.attempts) == 2 and proxy.count("retries") == 0


def test_every_endpoint_unreachable_gives_a_502_naming_each_attempt() -> None:
    proxy = core(Upstream(primary=[broken(Kind.REFUSED)], backup=[broken(Kind.DNS)]))
    outcome = proxy.send()
    assert outcome.failure is not None and outcome.failure.status == 502
    error = error_of(outcome.failure)
    assert error["type"] == "api_error"
    assert error["message"] == (
        "All endpoints failed: primary: connection refused; backup: host name does not resolve"
    )


def test_every_endpoint_timing_out_gives_a_504() -> None:
    proxy = core(Upstream(primary=[broken(Kind.CONNECT_TIMEOUT)], backup=[broken(Kind.FIRST_BYTE_TIMEOUT)]))
    outcome = proxy.send()
    assert outcome.failure is not None and outcome.failure.status == 504
    assert error_of(outcome.failure)["type"] == "timeout_error"


def test_a_retry_after_within_max_wait_is_waited_for_and_that_endpoint_serves() -> None:
    upstream = Upstream(
        primary=[error(429, retry_after(0.1)), ok()],
        backup=[error(429, retry_after(30))],
    )
    proxy = core(upstream, Retry(initial_delay=0.01, max_wait_seconds=0.3))
    outcome = proxy.send()
    assert served_by(outcome) == "primary"
    assert tried(outcome) == [("primary", "status"), ("backup", "status"), ("primary", "ok")]
    assert proxy.count("retries") == 1
    assert 0.05 < proxy.count("backoff_seconds") <= 0.1  # the wait it asked for, not the backoff's 0.01
    assert proxy.state("primary").status == HEALTHY and proxy.state("backup").status == COOLING
    assert proxy.count("failovers", from_endpoint="backup", to_endpoint="primary") == 1


def test_waiting_stops_once_the_waits_would_add_up_past_max_wait() -> None:
    upstream = Upstream(primary=[error(429, retry_after(0.1))], backup=[error(429, retry_after(30))])
    proxy = core(upstream, Retry(initial_delay=0.01, max_wait_seconds=0.25, max_retries=5))
    outcome = proxy.send()
    # two waits of 0.1 s fit within 0.25 s; a third would not
    assert [a.endpoint for a in outcome.attempts] == ["primary", "backup", "primary", "primary"]
    assert proxy.count("retries") == 2
    assert outcome.failure is not None and dict(outcome.failure.headers)[b"retry-after"] == b"0.1"


def test_the_retry_budget_bounds_retries_in_a_total_outage() -> None:
    # Nothing else stops a retry here: no cooldown, no backoff, three attempts per endpoint.
    retry = Retry(
        cooldown_seconds=0, initial_delay=0, max_delay=0, max_retries=3, budget_min_retries=2, budget_ratio=0
    )
    proxy = core(Upstream(primary=[error(503)], backup=[error(503)]), retry)
    outcomes = [proxy.send() for _ in range(5)]
    assert [len(o.attempts) for o in outcomes] == [4, 2, 2, 2, 2]  # failing over is free; going back is not
    assert all(o.failure is not None and o.failure.status == 503 for o in outcomes)
    assert proxy.upstream.times("primary") + proxy.upstream.times("backup") == 12
    assert proxy.count("retries") == 2
    assert proxy.count("retry_budget_exhausted") == 5


def test_with_retry_off_each_endpoint_is_tried_once() -> None:
    retry = Retry(enabled=False, cooldown_seconds=0, initial_delay=0, max_delay=0)
    proxy = core(Upstream(primary=[error(503)], backup=[error(503)]), retry)
    outcome = proxy.send()
    assert tried(outcome) == [("primary", "status"), ("backup", "status")]
    assert proxy.count("retries") == 0


def test_of_equal_retry_afters_the_last_429_is_the_answer() -> None:
    upstream = Upstream(
        primary=[error(429, retry_after(20), ("x-from", "primary"))],
        backup=[error(429, retry_after(20), ("x-from", "backup"))],
    )
    failure = core(upstream).send().failure
    assert failure is not None and dict(failure.headers)[b"x-from"] == b"backup"


@pytest.mark.parametrize(("status", "error_type"), [(529, "overloaded_error"), (429, "rate_limit_error")])
def test_an_error_event_last_gives_an_anthropic_shaped_error_of_its_kind(
    status: int, error_type: str
) -> None:
    event = Fail(Kind.SSE_ERROR, f"stream error event before content ({status})", status)
    failure = final_failure([broken(Kind.RESET).failure("primary"), event.failure("backup")])
    assert failure.status == status and error_of(failure)["type"] == error_type


# -- cooldowns, probes and what the answers say about the limits ------------------------------


def test_after_a_cooldown_exactly_one_request_probes_while_the_others_stay_on_the_backup() -> None:
    gate, clock = Gate(), Clock()
    proxy = core(Upstream(primary=[error(503), ok(gate=gate), ok()], backup=[ok()]), clock=clock)
    primary = proxy.state("primary")

    async def scenario() -> None:
        assert served_by(await proxy.run()) == "backup"
        clock.now += 300  # cooldownSeconds
        probe = asyncio.create_task(proxy.run())
        await gate.reached.wait()
        assert primary.status == PROBING
        meanwhile = [await proxy.run() for _ in range(3)]
        assert [served_by(o) for o in meanwhile] == ["backup"] * 3
        assert proxy.upstream.times("primary") == 2  # the first request and the probe
        gate.opened.set()
        assert served_by(await probe) == "primary"
        assert primary.status == HEALTHY and primary.cooling_until == 0
        assert served_by(await proxy.run()) == "primary"

    asyncio.run(scenario())
    assert proxy.upstream.times("primary") == 3 and proxy.upstream.times("backup") == 4
    assert proxy.count("endpoint_cooldowns", endpoint="primary", reason="status") == 1


def test_a_failed_probe_starts_the_cooldown_again() -> None:
    clock = Clock()
    proxy = core(Upstream(primary=[error(503)], backup=[ok()]), Retry(cooldown_seconds=60), clock=clock)
    proxy.send()
    clock.now += 60
    outcome = proxy.send()
    assert tried(outcome) == [("primary", "status"), ("backup", "ok")]
    primary = proxy.state("primary")
    assert primary.cooldown_left() == 60 and primary.consecutive_failures == 2
    assert not primary.probe_in_flight
    assert proxy.count("endpoint_cooldowns", endpoint="primary", reason="status") == 2


def test_a_request_that_leaves_during_its_probe_frees_the_probe_and_cools_nothing() -> None:
    gate, clock = Gate(), Clock()
    proxy = core(Upstream(primary=[error(503), ok(gate=gate), ok()], backup=[ok()]), clock=clock)
    primary = proxy.state("primary")

    async def scenario() -> None:
        await proxy.run()
        clock.now += 300
        probe = asyncio.create_task(proxy.run())
        await gate.reached.wait()
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert not primary.probe_in_flight and primary.status == HEALTHY
        assert served_by(await proxy.run()) == "primary"  # the next request probes

    asyncio.run(scenario())
    assert proxy.count("endpoint_cooldowns", endpoint="primary", reason="status") == 1
    assert proxy.count("upstream_attempts", endpoint="primary", outcome="ok") == 1  # the one that left: none


def test_exhausted_rate_limit_headers_cool_the_endpoint_until_the_reset() -> None:
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    exhausted = ok(
        ("anthropic-ratelimit-requests-limit", "50"),
        ("anthropic-ratelimit-requests-remaining", "0"),
        ("anthropic-ratelimit-requests-reset", reset),
    )
    proxy = core(Upstream(primary=[exhausted], backup=[ok()]))
    first = proxy.send()
    assert served_by(first) == "primary"  # that request was accepted: its answer is relayed
    primary = proxy.state("primary")
    assert primary.cooling_reason == "ratelimit_requests_exhausted" and 57 < primary.cooldown_left() <= 60
    assert proxy.count("endpoint_cooldowns", endpoint="primary", reason="ratelimit") == 1
    assert [e["state"] for e in proxy.said("endpoint_limits")] == ["exhausted"]
    assert tried(proxy.send()) == [("backup", "ok")]
    assert proxy.upstream.times("primary") == 1


def test_a_streamed_answer_from_a_refused_usage_window_goes_to_another_account() -> None:
    reset = int(time.time()) + 3600  # Unix time, in whole seconds
    refused_window = ok(
        ("anthropic-ratelimit-unified-status", "rejected"), ("anthropic-ratelimit-unified-reset", str(reset))
    )
    proxy = core(Upstream(max=[refused_window], pro=[ok()]))
    outcome = proxy.send(message(stream=True))
    assert tried(outcome) == [("max", "window_rejected"), ("pro", "ok")]
    account = proxy.state("max")
    assert account.cooling_reason == "window_rejected" and 3598 < account.cooldown_left() <= 3600


def test_a_session_stays_on_the_endpoint_that_served_it_once_the_primary_is_back() -> None:
    clock = Clock()
    routing = Routing(strategy="least-utilized", session_affinity=True)
    proxy = core(Upstream(primary=[error(503), ok()], backup=[ok()]), routing=routing, clock=clock)
    assert served_by(proxy.send(message(session=SESSION))) == "backup"
    clock.now += 300
    assert served_by(proxy.send(message(session=SESSION))) == "backup"  # its prompt cache is there
    assert proxy.upstream.times("primary") == 1
    assert served_by(proxy.send(message())) == "primary"  # any other request probes the primary
