"""What a request's trace is told on the request's way: each attempt at an endpoint and how it
ended, a stream continued elsewhere, and the request's end.

A request carries its trace (`ClientRequest.trace`), as an httpx request carries a `trace`
extension that httpcore calls at each step: the failover and the accounting tell it what
happened, and what records it (telemetry/, with OpenTelemetry) stays out of their way.
With telemetry off every request carries `NO_TRACE`, whose methods do nothing, and nothing
of OpenTelemetry is loaded. This module imports nothing of the proxy when it runs, so that
every layer may read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

# What a trace is told of, named after the proxy's own types but not imported: every layer
# reads this module, so it may import none of them.
Endpoint = Any  # config.Endpoint
Spend = Any  # cost.spend.Spend: what one part of an answer used and cost
ClientRequest = Any  # request.ClientRequest


class Answer(Protocol):
    """An endpoint's answer as a trace reads it (`upstream.client.UpstreamResponse`)."""

    @property
    def endpoint(self) -> Endpoint: ...
    @property
    def status(self) -> int: ...
    @property
    def time_to_headers(self) -> float: ...
    @property
    def url(self) -> str: ...
    @property
    def held(self) -> list[bytes]: ...
    @property
    def is_event_stream(self) -> bool: ...
    @property
    def answered_model(self) -> str | None: ...
    @property
    def stop_reason(self) -> str | None: ...


class Failed(Protocol):
    """Why an attempt failed, as a trace reads it (`request.AttemptFailed`)."""

    @property
    def kind(self) -> str: ...
    @property
    def status(self) -> int | None: ...
    @property
    def retry_after(self) -> float | None: ...


class AttemptTrace(Protocol):
    """One attempt at one endpoint, told once how it ended."""

    def answered(self, answer: Answer, cooled: bool) -> None:
        """The endpoint gave the answer the client gets; `cooled`: its usage windows closed it."""

    def failed(self, failure: Failed, cooled: bool) -> None:
        """The attempt failed; `cooled`: the endpoint cools for it."""

    def abandoned(self, error: BaseException) -> None:
        """The attempt stopped half-way: the client left, or the proxy stops."""


class Trace(Protocol):
    """One client request's trace."""

    def attempt(self, endpoint: Endpoint, request: ClientRequest) -> AttemptTrace:
        """An attempt at `endpoint` begins, with `request` as sent (a continuation, on a resume)."""

    def resumed(self, broken: str, reason: str) -> None:
        """The answer's stream broke mid-answer at the endpoint `broken`, for `reason` (a `Kind`),
        and is to be continued on another."""

    def end(
        self,
        outcome: str,
        status: int | None,
        spent: Sequence[Spend],
        answer: Answer | None,
        broke: str | None,
    ) -> None:
        """The request ended, as the accounting counts it: its outcome and status, what each
        part of its answer used, the answer's last part, and why a stream was cut, if it was."""


class Traces(Protocol):
    """The requests' traces, where the accounting finds one when its request ends."""

    def pop(self, flow_id: str) -> Trace: ...


class _Untraced:
    """Every method does nothing: what a request carries while telemetry is off, and the set
    of traces that never holds one."""

    def attempt(self, endpoint: Endpoint, request: ClientRequest) -> _Untraced:
        return self

    def answered(self, answer: Answer, cooled: bool) -> None:
        pass

    def failed(self, failure: Failed, cooled: bool) -> None:
        pass

    def abandoned(self, error: BaseException) -> None:
        pass

    def resumed(self, broken: str, reason: str) -> None:
        pass

    def end(
        self,
        outcome: str,
        status: int | None,
        spent: Sequence[Spend],
        answer: Answer | None,
        broke: str | None,
    ) -> None:
        pass

    def pop(self, flow_id: str) -> _Untraced:
        return self


NO_TRACE = _Untraced()
