"""What a flow shows to whoever inspects it (mitmweb, saved flows): the attempts, never a key."""

from __future__ import annotations

from mitmproxy import http

from ..config import mask_secret
from ..state.access import ACCESS_HEADER, AUTH_HEADERS
from ..upstream.failover import Outcome

META_KEY = "claude-code-fallback"


def annotate(flow: http.HTTPFlow, outcome: Outcome) -> None:
    """Each attempt (endpoint, outcome, time, detail) in the flow's metadata and comment."""
    attempts = [
        {
            "endpoint": a.endpoint,
            "outcome": a.outcome,
            "durationMs": round(a.duration * 1000, 1),
            "detail": a.detail,
        }
        for a in outcome.attempts
    ]
    flow.metadata[META_KEY] = {"attempts": attempts}
    flow.comment = " → ".join(
        f"{a.endpoint}: {a.outcome} ({a.duration * 1000:.0f} ms)" for a in outcome.attempts
    )


def mask_flow_keys(flow: http.HTTPFlow) -> None:
    """The client's keys, masked on the flow that inspection shows."""
    for name in (*AUTH_HEADERS, ACCESS_HEADER):
        if value := flow.request.headers.get(name):
            scheme, _, secret = value.rpartition(" ")
            masked = mask_secret(secret)
            flow.request.headers[name] = f"{scheme} {masked}" if scheme else masked
