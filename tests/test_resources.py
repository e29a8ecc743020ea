"""Nothing spent for nothing: a stale pooled connection costs no cooldown, a client that
leaves stops the upstream attempt, and an oversized body is not kept in memory.

Every fault is real: fake upstreams on loopback that close idle connections or answer
slowly, clients that really go away, a real mitmdump running the addon.
"""

from __future__ import annotations

import time

from .conftest import endpoints_config
from .test_failover import post


def test_a_pooled_connection_closed_while_idle_is_retried_fresh_without_cooling(
    proxy_factory, primary, backup
):
    primary.idle_close = 1.0
    proxy = proxy_factory(endpoints_config(primary, backup))
    for i in range(4):
        if i:
            time.sleep(2)  # the fault itself: the pooled connection idles past the endpoint's limit
        response = post(proxy, stream=i == 3)
        assert response.status_code == 200
        assert response.headers["x-fake-name"] == "primary"
    # The fault happened twice: requests 2 (JSON) and 4 (SSE) went out on a pooled connection
    # that the endpoint then closed. The retry's own connection is not kept, so request 3
    # opens a new one that request 4 reuses.
    assert primary.idle_closes == 2
    assert len(primary.requests) == 4 and backup.requests == []
    assert proxy.metric("ccf_endpoint_cooldowns_total", endpoint="primary", reason="closed") == 0
    assert proxy.metric("ccf_failovers_total", from_endpoint="primary", to_endpoint="backup") == 0
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="ok") == 4
    assert proxy.metric("ccf_requests_total", outcome="success") == 4
    state = proxy.endpoint("primary")
    assert state["status"] == "healthy" and state["consecutiveFailures"] == 0
