"""Claude subscriptions end to end: usage windows, OAuth keys, sessions spread over accounts.

Real mitmdump with the addon, fake subscription accounts on loopback (`fakeapi.Account`)
that send the `anthropic-ratelimit-unified-*` headers, and the SDK or raw HTTP as clients.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import anthropic
import httpx
import pytest

from addon.cli.commands import endpoint_row
from addon.fakes.anthropic import Account, Behavior, Window

from .conftest import BACKUP_KEY, endpoints_config, wait_until
from .test_failover import MESSAGE, sdk

OAUTH_TOKEN = "sk-ant-oat01-TESTOAUTHTOKEN" + "0" * 40
CLIENT_BETAS = "claude-code-20250219,context-1m-2025-08-07,interleaved-thinking-2025-05-14"
HOURS = 3600.0


def account(*windows: Window, overage: bool = False) -> Account:
    return Account(*windows, overage=overage)


def full(name: str = "5h", resets_in: float = 7 * HOURS) -> Window:
    return Window(name, utilization=1.0, per_request=0.0, resets_at=time.time() + resets_in)


def session_request(proxy, session: str, stream: bool = True) -> tuple[str, str]:
    """One Claude Code-style request of `session`: (the fake that answered, the text received)."""
    user_id = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session})
    body = dict(MESSAGE, stream=stream, metadata={"user_id": user_id})
    headers = {
        "x-api-key": "sk-ant-client-key-0000",
        "anthropic-beta": CLIENT_BETAS,
        "x-claude-code-session-id": session,
    }
    with httpx.stream("POST", proxy.url + "/v1/messages", json=body, headers=headers, timeout=30) as response:
        text = response.read().decode()
        assert response.status_code == 200, text
        return response.headers["x-fake-name"], text


# -- usage windows -------------------------------------------------------------------------


def test_a_streamed_answer_from_a_rejected_window_fails_over_and_the_account_stays_out(
    proxy_factory, primary, backup
):
    primary.account = account(full(), overage=True)  # answers 200, billed as extra usage
    primary.behavior = Behavior(kind="ok", event_delay=0.3)  # a stream the proxy must close itself
    proxy = proxy_factory(endpoints_config(primary, backup))
    with sdk(proxy).messages.with_streaming_response.create(**MESSAGE, stream=True) as response:
        assert response.headers["x-fake-name"] == "backup"
        assert response.read().decode().endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')
    primary.wait_for_disconnects(1, timeout=1.0)  # the overage stream was closed at once
    state = proxy.endpoint("primary")
    assert state["status"] == "cooling" and state["reason"] == "window_rejected"
    # until the window reopens, hours away: neither cooldownSeconds (30) nor maxDelay caps it
    assert state["cooldownSecondsLeft"] > 7 * HOURS - 120
    assert state["overage"] is True
    assert state["limits"]["5h"]["status"] == "rejected"
    for _ in range(3):
        assert sdk(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."
    assert primary.request_count == 1 and backup.request_count == 4
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="window_rejected") == 1
    assert proxy.metric("ccf_endpoint_cooldowns_total", endpoint="primary", reason="window_rejected") == 1
    assert '"event": "endpoint_limits"' in proxy.logs() and '"state": "overage"' in proxy.logs()


def test_an_api_keys_last_allowed_stream_is_relayed_not_paid_twice(proxy_factory, primary, backup):
    # The other side of the line drawn above: `remaining: 0` on an API key's 200 means this
    # request was accepted (and is billed); only the next one would get a 429.
    reset = datetime.now(UTC) + timedelta(seconds=30)
    primary.behavior = Behavior(
        kind="ok",
        text="The primary's answer.",
        headers=(
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", reset.isoformat().replace("+00:00", "Z")),
        ),
    )
    proxy = proxy_factory(endpoints_config(primary, backup))
    with sdk(proxy).messages.stream(**MESSAGE) as stream:
        assert stream.get_final_text() == "The primary's answer."
    assert backup.request_count == 0 and primary.disconnects == []
    state = proxy.endpoint("primary")
    assert state["status"] == "cooling" and state["reason"] == "ratelimit_requests_exhausted"
    assert 20 < state["cooldownSecondsLeft"] <= 30
    assert state["limits"]["requests"]["status"] == "exhausted"
    assert sdk(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."
    assert primary.request_count == 1 and backup.request_count == 1
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="ok") == 1
    assert "window_rejected" not in proxy.logs()


def test_a_rejected_account_comes_back_when_its_window_reopens(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup))
    primary.account = account(full(resets_in=3), overage=True)
    assert session_request(proxy, "s1")[0] == "backup"
    assert session_request(proxy, "s1")[0] == "backup"
    assert primary.request_count == 1
    # the fake's window reopens with its reset; so does the proxy's cooldown, not 30 s later
    wait_until(lambda: proxy.endpoint("primary")["status"] == "healthy", 6, "the window to reopen")
    assert session_request(proxy, "s1")[0] == "primary"
    wait_until(lambda: '"state": "reset"' in proxy.logs(), 5, "the reset to be logged")


def test_a_non_streamed_rejected_answer_is_relayed_and_the_next_request_skips_the_account(
    proxy_factory, primary, backup
):
    primary.account = account(full(), overage=True)
    proxy = proxy_factory(endpoints_config(primary, backup))
    raw = sdk(proxy).messages.with_raw_response.create(**MESSAGE)
    assert raw.headers["x-fake-name"] == "primary"  # already generated and billed: relayed
    assert raw.headers["anthropic-ratelimit-unified-status"] == "rejected"
    assert raw.parse().content[0].text == "Hello from the fake."
    assert proxy.endpoint("primary")["status"] == "cooling"
    assert session_request(proxy, "s1", stream=False)[0] == "backup"
    assert session_request(proxy, "s1")[0] == "backup"
    assert primary.request_count == 1


def test_an_account_in_overage_still_answers_when_nothing_else_can(proxy_factory, primary, backup):
    primary.account = account(full(), overage=True)
    backup.behavior = Behavior(kind="status", status=503)
    proxy = proxy_factory(endpoints_config(primary, backup, retry={"maxRetries": 1}))
    # streamed: the backup is tried first, fails, and the overage answer beats an error
    assert session_request(proxy, "s1")[0] == "primary"
    assert session_request(proxy, "s1")[0] == "primary"
    assert proxy.endpoint("primary")["overage"] is True


def test_a_429_with_a_long_retry_after_cools_for_all_of_it(proxy_factory, primary, backup):
    primary.account = account(full(resets_in=7999))  # no overage: 429, retry-after 7999
    proxy = proxy_factory(endpoints_config(primary, backup))
    assert sdk(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."
    seen = primary.wait_for_requests(1)
    assert len(seen) == 1 and backup.request_count == 1
    state = proxy.endpoint("primary")
    assert state["status"] == "cooling"
    assert 7999 - 60 < state["cooldownSecondsLeft"] <= 7999
    assert state["limits"]["5h"]["utilization"] == 1.0


def test_step_aside_leaves_a_97_percent_account_for_the_backup_and_returns_after_the_reset(
    proxy_factory, primary, backup
):
    proxy = proxy_factory(endpoints_config(primary, backup, routing={"stepAsideAt": 0.95}))
    primary.account = account(Window("5h", utilization=0.97, per_request=0.0, resets_at=time.time() + 3))
    backup.account = account(Window("5h", utilization=0.10, per_request=0.0, resets_at=time.time() + HOURS))
    assert session_request(proxy, "s1")[0] == "primary"  # no reading yet
    assert proxy.endpoint("primary")["saturated"] is True
    assert proxy.endpoint("primary")["status"] == "healthy"  # usable, only stepped aside
    assert [session_request(proxy, "s1")[0] for _ in range(3)] == ["backup"] * 3
    wait_until(lambda: not proxy.endpoint("primary")["limits"], 6, "the primary's window to reset")
    assert session_request(proxy, "s1")[0] == "primary"
    logs = proxy.logs()
    assert '"state": "saturated"' in logs and '"state": "reset"' in logs


def test_a_saturated_account_is_still_used_when_it_is_the_only_one_left(proxy_factory, primary, backup):
    primary.account = account(Window("5h", utilization=0.97, per_request=0.0))
    backup.behavior = Behavior(kind="status", status=529)
    proxy = proxy_factory(endpoints_config(primary, backup, routing={"stepAsideAt": 0.95}))
    assert [session_request(proxy, "s1")[0] for _ in range(3)] == ["primary"] * 3


# -- spreading sessions --------------------------------------------------------------------


def test_least_utilized_spreads_new_sessions_and_keeps_running_ones(proxy_factory, primary, backup):
    primary.account = account(Window("5h", utilization=0.6, per_request=0.0), overage=True)
    backup.account = account(Window("5h", utilization=0.1, per_request=0.0), overage=True)
    proxy = proxy_factory(endpoints_config(primary, backup, routing={"strategy": "least-utilized"}))
    one, two, three = (str(uuid.uuid4()) for _ in range(3))
    # nothing read yet: both count as unused and the tie goes to the configured order
    assert session_request(proxy, one)[0] == "primary"
    assert session_request(proxy, two)[0] == "backup"  # the primary is now known to be at 60 %
    backup.account.set("5h", utilization=0.8)
    assert session_request(proxy, two)[0] == "backup"  # a running session stays put...
    assert session_request(proxy, three)[0] == "primary"  # ...while a new one takes the emptier
    assert session_request(proxy, one)[0] == "primary"
    backup.account.set("5h", utilization=1.0)  # the backup's window is refused now
    seen_by_backup = backup.request_count
    assert session_request(proxy, two)[0] == "primary"  # the session moves, before a byte...
    assert backup.request_count == seen_by_backup + 1  # ...of the backup's overage answer
    assert session_request(proxy, two)[0] == "primary"  # and stays
    health = proxy.health()
    assert health["routing"] == {
        "strategy": "least-utilized",
        "sessionAffinity": True,
        "stepAsideAt": None,
        "sessions": 3,
        "cacheAware": True,
        "cacheTtlScale": 1.0,
    }


def test_a_session_is_read_from_the_older_user_id_format(proxy_factory, primary, backup):
    primary.account = account(Window("5h", utilization=0.1, per_request=0.0))
    backup.account = account(Window("5h", utilization=0.5, per_request=0.0))
    proxy = proxy_factory(endpoints_config(primary, backup, routing={"strategy": "least-utilized"}))
    session = str(uuid.uuid4())
    user_id = f"user_{'a' * 64}_account_{uuid.uuid4()}_session_{session}"
    client = sdk(proxy)

    def answered_by(**extra: object) -> str:
        return client.messages.with_raw_response.create(**MESSAGE, **extra).headers["x-fake-name"]

    assert answered_by(metadata={"user_id": user_id}) == "primary"  # a tie: the configured order
    assert answered_by() == "backup"  # nothing known of the backup: counts as unused
    primary.account.set("5h", utilization=0.9)
    assert answered_by() == "primary"  # 10 % against 50 %; the answer says 90 % now
    assert answered_by(metadata={"user_id": user_id}) == "primary"  # the session stays put
    assert answered_by() == "backup"


# -- OAuth keys ------------------------------------------------------------------------------


def test_an_oauth_token_goes_as_bearer_with_the_oauth_beta_and_every_client_beta(
    proxy_factory, primary, backup
):
    config = endpoints_config(primary, backup)
    config["endpoints"][0]["apiKey"] = OAUTH_TOKEN
    proxy = proxy_factory(config)
    client = anthropic.Anthropic(
        base_url=proxy.url,
        api_key="sk-ant-client-key-0000",
        max_retries=0,
        default_headers={"anthropic-beta": CLIENT_BETAS + ",claude-code-20250219"},
    )
    client.messages.create(**MESSAGE)
    seen = primary.wait_for_requests(1)[0]
    assert seen.header("authorization") == f"Bearer {OAUTH_TOKEN}"
    assert seen.header("x-api-key") is None
    betas = [v for n, v in seen.headers if n == "anthropic-beta"]
    assert betas == [CLIENT_BETAS + ",oauth-2025-04-20"]  # merged, no duplicates, one header
    assert OAUTH_TOKEN not in proxy.logs()


def test_an_api_key_endpoint_gets_the_client_betas_without_the_oauth_beta(proxy_factory, primary, backup):
    primary.behavior = Behavior(kind="status", status=429)
    proxy = proxy_factory(endpoints_config(primary, backup))
    headers = {"anthropic-beta": "oauth-2025-04-20," + CLIENT_BETAS, "authorization": f"Bearer {OAUTH_TOKEN}"}
    response = httpx.post(proxy.url + "/v1/messages", json=MESSAGE, headers=headers, timeout=30)
    assert response.status_code == 200 and response.headers["x-fake-name"] == "backup"
    seen = backup.wait_for_requests(1)[0]
    assert seen.header("x-api-key") == BACKUP_KEY
    assert seen.header("authorization") is None  # the client's own token does not travel on
    assert [v for n, v in seen.headers if n == "anthropic-beta"] == [CLIENT_BETAS]


def test_without_a_key_the_clients_credentials_and_betas_pass_through(proxy_factory, primary):
    config = endpoints_config(primary)
    del config["endpoints"][0]["apiKey"]
    proxy = proxy_factory(config)
    headers = {"anthropic-beta": "oauth-2025-04-20," + CLIENT_BETAS, "authorization": f"Bearer {OAUTH_TOKEN}"}
    assert (
        httpx.post(proxy.url + "/v1/messages", json=MESSAGE, headers=headers, timeout=30).status_code == 200
    )
    seen = primary.wait_for_requests(1)[0]
    assert seen.header("authorization") == f"Bearer {OAUTH_TOKEN}"
    assert seen.header("anthropic-beta") == "oauth-2025-04-20," + CLIENT_BETAS


# -- what it shows, and bad input -------------------------------------------------------------


def test_windows_show_in_health_metrics_and_status(proxy_factory, primary, backup):
    resets_at = int(time.time() + 2 * HOURS)
    primary.account = account(
        Window("5h", utilization=0.42, per_request=0.0, resets_at=resets_at),
        Window("7d", utilization=0.15, per_request=0.0, resets_at=time.time() + 100 * HOURS),
        Window("7d-sonnet", utilization=0.05, per_request=0.0),
    )
    proxy = proxy_factory(endpoints_config(primary, backup))
    sdk(proxy).messages.create(**MESSAGE)
    state = proxy.endpoint("primary")
    assert set(state["limits"]) == {"5h", "7d", "7d-sonnet"}
    assert state["limits"]["5h"]["utilization"] == 0.42
    assert state["limits"]["5h"]["status"] == "allowed"
    assert state["limits"]["5h"]["resetsAt"].startswith(
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(resets_at))
    )
    assert (state["saturated"], state["overage"]) == (False, False)
    metric = proxy.metric
    assert metric("ccf_endpoint_ratelimit_utilization", endpoint="primary", window="5h") == 0.42
    assert metric("ccf_endpoint_ratelimit_utilization", endpoint="primary", window="7d-sonnet") == 0.05
    assert (
        metric("ccf_endpoint_ratelimit_reset_timestamp_seconds", endpoint="primary", window="5h") == resets_at
    )
    row = endpoint_row(state, now=resets_at - 2 * HOURS)
    assert row[:6] == ["primary", "anthropic", "healthy", "42%", "15%", "2h 00m 00s"]


@pytest.mark.parametrize(
    "headers",
    [
        [("anthropic-ratelimit-unified-5h-utilization", "7")],
        [
            ("anthropic-ratelimit-unified-5h-reset", "-20"),
            ("anthropic-ratelimit-unified-5h-status", "rejected"),
        ],
        [("anthropic-ratelimit-unified-status", "rejected"), ("anthropic-ratelimit-unified-reset", "12")],
        [
            ("anthropic-ratelimit-unified-5h-status", "on-fire"),
            ("anthropic-ratelimit-unified-status", "doomed"),
        ],
        [
            ("anthropic-ratelimit-unified-7d-utilization", ""),
            ("anthropic-ratelimit-unified-7d-reset", "soon"),
        ],
    ],
    ids=["utilization-7", "negative-reset", "past-reset", "unknown-status", "empty-and-words"],
)
def test_bad_window_headers_are_ignored_and_never_cool(proxy_factory, primary, backup, headers):
    primary.behavior = Behavior(kind="ok", headers=headers)
    proxy = proxy_factory(endpoints_config(primary, backup))
    for stream in (True, False):
        assert session_request(proxy, "s1", stream=stream)[0] == "primary"
    state = proxy.endpoint("primary")
    assert state["status"] == "healthy" and backup.request_count == 0
    for window in state["limits"].values():  # what is left of a window holds only good values
        assert window["utilization"] is None and window["resetsAt"] is None


def test_step_aside_applies_to_api_keys_from_their_remaining_and_limit(proxy_factory, primary, backup):
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + HOURS))
    primary.behavior = Behavior(
        kind="ok",
        headers=(
            ("anthropic-ratelimit-tokens-limit", "100000"),
            ("anthropic-ratelimit-tokens-remaining", "2000"),  # 98 % used
            ("anthropic-ratelimit-tokens-reset", reset),
        ),
    )
    proxy = proxy_factory(endpoints_config(primary, backup, routing={"stepAsideAt": 0.95}))
    assert session_request(proxy, "s1")[0] == "primary"
    assert proxy.endpoint("primary")["limits"]["tokens"]["utilization"] == pytest.approx(0.98)
    assert proxy.endpoint("primary")["saturated"] is True
    assert [session_request(proxy, "s1")[0] for _ in range(2)] == ["backup"] * 2
