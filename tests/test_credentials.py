"""A 401 or 403 to credentials the proxy chose is the endpoint's failure, never the client's.

Claude Code reads a 401 as "your login is bad" and asks the user to log in again. When the
key was the proxy's (an endpoint's key or subscription token, a cloud role or token), the
request fails over instead, the endpoint cools for `retry.credentialsCooldownSeconds`, and
no such 401 or 403 reaches the client. A key the client sent itself is the client's: its
401 goes back untouched. Real mitmdump with the addon, the fakes of every platform.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import pytest

from addon.cli.commands import endpoint_row
from addon.fakes import openai as fakeopenai
from addon.fakes.anthropic import Behavior, FakeAnthropic
from addon.fakes.cloud import FakeBedrock, FakeVertex
from addon.fakes.openai import FakeOpenAI

from .conftest import BACKUP_KEY, PRIMARY_KEY, endpoints_config, free_port, wait_until
from .test_clouds import ACCESS_KEY, API_KEY, REGION, SECRET_KEY, platform, vertex_endpoint, with_keys
from .test_failover import MESSAGE, post, sdk
from .test_openai import openai_endpoint

OAUTH_TOKEN = "sk-ant-oat01-TESTREFUSEDTOKEN" + "0" * 38
HOUR = 3600


@dataclass
class Refusing:
    """An endpoint (first in the config) that refuses the credentials the proxy gives it."""

    endpoint: dict[str, Any]
    fake: Any
    status: int  # the refusal's
    env: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()


def anthropic_refusing(fakes: Callable[[str], FakeAnthropic], status: int, key: str) -> Refusing:
    fake = fakes("refusing")
    fake.behavior = Behavior(kind="status", status=status)
    return Refusing({"name": "refusing", "baseUrl": fake.url, "apiKey": key}, fake, status, secrets=(key,))


# provider and how it refuses -> the status the client would have seen
CASES = {
    "anthropic-key-401": 401,
    "anthropic-key-403": 403,
    "subscription-token-401": 401,
    "bedrock-api-key-unrecognized-403": 403,
    "bedrock-role-access-denied-403": 403,
    "vertex-unauthenticated-401": 401,
    "vertex-permission-denied-403": 403,
    "openai-invalid-key-401": 401,
    "openai-not-allowed-403": 403,
}


@pytest.fixture
def refusing(
    request: pytest.FixtureRequest, tmp_path: Path, fakes: Callable[[str], FakeAnthropic]
) -> Iterator[Refusing]:
    case: str = request.param
    status = CASES[case]
    with contextlib.ExitStack() as stack:
        if case.startswith("anthropic"):
            yield anthropic_refusing(fakes, status, PRIMARY_KEY)
        elif case.startswith("subscription"):
            yield anthropic_refusing(fakes, status, OAUTH_TOKEN)
        elif case.startswith("bedrock"):
            bedrock = stack.enter_context(
                FakeBedrock(
                    region=REGION, aws_access_key=ACCESS_KEY, aws_secret_key=SECRET_KEY, api_key=API_KEY
                )
            )
            endpoint = platform("refusing", "bedrock", bedrock.url)
            if "api-key" in case:  # a Bedrock API key that was revoked: UnrecognizedClientException
                endpoint["apiKey"] = "ABSKtest-REVOKED-API-KEY-000000000000001"
            else:  # a role without access to the model: AccessDeniedException
                bedrock.behavior = Behavior(kind="status", status=403)
            yield Refusing(
                endpoint, bedrock, status, with_keys(tmp_path), (SECRET_KEY, endpoint.get("apiKey", ""))
            )
        elif case.startswith("vertex"):
            vertex = stack.enter_context(FakeVertex(region="us-east5"))
            key_file = vertex.write_key_file(tmp_path / "vertex-key.json")
            vertex.behavior = Behavior(kind="status", status=status)  # UNAUTHENTICATED, PERMISSION_DENIED
            endpoint = {**vertex_endpoint(vertex), "name": "refusing"}
            yield Refusing(
                endpoint, vertex, status, {"GOOGLE_APPLICATION_CREDENTIALS": str(key_file)}, ("ya29.",)
            )
        else:
            openai = stack.enter_context(FakeOpenAI("openai"))
            openai.behavior = fakeopenai.Behavior("status", status=status)
            endpoint = {**openai_endpoint(openai), "name": "refusing"}
            yield Refusing(endpoint, openai, status, secrets=(str(endpoint["apiKey"]),))


def config_with(refusing: Refusing, backup: FakeAnthropic, **sections: Any) -> dict[str, Any]:
    config = endpoints_config(backup, **sections)
    config["endpoints"] = [refusing.endpoint, *config["endpoints"]]
    return config


def logged_events(proxy, name: str) -> list[dict[str, Any]]:
    lines = (line[line.index("{") :] for line in proxy.logs().splitlines() if f'"event": "{name}"' in line)
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("refusing", list(CASES), indirect=True)
def test_a_refused_key_of_the_proxys_own_fails_over_and_cools_the_endpoint_for_long(
    proxy_factory, refusing, backup
):
    proxy = proxy_factory(config_with(refusing, backup), refusing.env)
    answer = sdk(proxy).messages.create(**MESSAGE)
    assert answer.content[0].text == "Hello from the fake."
    assert refusing.fake.request_count == 1 and backup.request_count == 1
    state, status = proxy.endpoint("refusing"), refusing.status
    assert state["status"] == "cooling" and state["reason"] == "credentials"
    assert HOUR - 60 < state["cooldownSecondsLeft"] <= HOUR  # credentialsCooldownSeconds, not cooldownSeconds
    assert state["lastStatus"] == status
    assert [(e["endpoint"], e["status"]) for e in logged_events(proxy, "endpoint_credentials_refused")] == [
        ("refusing", status)
    ]
    assert proxy.metric("ccf_endpoint_credentials_refused_total", endpoint="refusing") == 1
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="refusing", outcome="credentials") == 1
    assert proxy.metric("ccf_endpoint_cooldowns_total", endpoint="refusing", reason="credentials") == 1
    # the next request does not ask the refusing endpoint again
    assert post(proxy).headers["x-fake-name"] == "backup"
    assert refusing.fake.request_count == 1
    # the status page and `ccf status` say what happened
    summary = json.loads(proxy.get("/dashboard/summary")[1])
    shown = next(e for e in summary["endpoints"] if e["name"] == "refusing")
    assert shown["reasonText"] == f"credentials refused (HTTP {status})"
    assert f"credentials refused (HTTP {status}) at " in endpoint_row(state)[-1]
    logs = proxy.logs()
    assert not [secret for secret in refusing.secrets if secret and secret in logs]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("backup_does", "status"),
    [("refuse", 502), ("not_answer", 502), ("rate_limit", 429)],
)
def test_a_refusal_of_the_proxys_credentials_is_never_the_clients_answer(
    proxy_factory, fakes, backup_does, status
):
    refusing = anthropic_refusing(fakes, 401, PRIMARY_KEY)
    backup = fakes("backup")
    config = config_with(refusing, backup)
    if backup_does == "refuse":
        backup.behavior = Behavior(kind="status", status=403)
    elif backup_does == "not_answer":
        config["endpoints"][1]["baseUrl"] = dead_url()
    else:
        backup.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "30"),))
    proxy = proxy_factory(config)
    response = post(proxy)
    assert response.status_code == status
    error = response.json()["error"]
    if status == 429:  # what the other endpoint said, as it came
        assert response.headers["x-fake-name"] == "backup" and response.headers["retry-after"] == "30"
        assert error["type"] == "rate_limit_error"
    else:
        assert error["type"] == "api_error" and "x-fake-name" not in response.headers
        assert "refusing: HTTP 401" in error["message"] and "`ccf status`" in error["message"]
    if backup_does == "refuse":
        assert error["message"].startswith("Every endpoint refused the proxy's credentials")
        assert "backup: HTTP 403" in error["message"]
    if backup_does == "not_answer":
        assert "backup: connection refused" in error["message"]
    with pytest.raises(anthropic.APIStatusError) as raised:  # never "log in again"
        sdk(proxy).messages.create(**MESSAGE)
    assert raised.value.status_code == status
    assert not isinstance(raised.value, anthropic.AuthenticationError | anthropic.PermissionDeniedError)
    # the second request asks it again only when no other endpoint is expected back sooner
    assert refusing.fake.request_count == (2 if backup_does == "refuse" else 1)


def test_with_credentials_failover_off_a_refused_key_goes_back_as_it_came(proxy_factory, fakes, backup):
    refusing = anthropic_refusing(fakes, 401, PRIMARY_KEY)
    proxy = proxy_factory(config_with(refusing, backup, retry={"credentialsFailover": False}))
    with pytest.raises(anthropic.AuthenticationError) as raised:
        sdk(proxy).messages.create(**MESSAGE)
    assert raised.value.response.headers["x-fake-name"] == "refusing"
    assert raised.value.body["error"]["message"] == "invalid x-api-key"  # the endpoint's own body
    assert backup.request_count == 0
    assert proxy.endpoint("refusing")["status"] == "healthy"
    assert proxy.metric("ccf_endpoint_credentials_refused_total", endpoint="refusing") == 0
    assert proxy.metric("ccf_requests_total", outcome="client_error") == 1


def test_a_reload_ends_a_credentials_cooldown_and_no_other(proxy_factory, fakes, backup):
    refusing = anthropic_refusing(fakes, 403, PRIMARY_KEY)
    limited = fakes("limited")
    limited.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "600"),))
    config = config_with(refusing, backup)
    config["endpoints"].insert(1, {"name": "limited", "baseUrl": limited.url, "apiKey": BACKUP_KEY})
    proxy = proxy_factory(config)
    assert post(proxy).headers["x-fake-name"] == "backup"
    assert proxy.endpoint("refusing")["reason"] == "credentials"
    refusing.fake.behavior = Behavior()  # someone fixed the key
    proxy.process.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.metric("ccf_config_reloads_total", result="success") == 1, 10, "the reload")
    assert proxy.endpoint("refusing")["status"] == "healthy"
    limits = proxy.endpoint("limited")
    assert limits["status"] == "cooling" and limits["cooldownSecondsLeft"] > 590  # a 429 is no one's key
    assert post(proxy).headers["x-fake-name"] == "refusing"
    assert refusing.fake.request_count == 2 and limited.request_count == 1
