"""Claude on the clouds through the proxy: Bedrock, Bedrock Mantle and Vertex AI as endpoints.

Real mitmdump with the addon, the platform fakes of addon/fakes/cloud.py (which verify SigV4
with botocore, speak AWS event-stream frames, and issue Google tokens only for a validly
signed service-account JWT), and the anthropic SDK or raw HTTP as the client.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anthropic
import httpx
import pytest

from addon.fakes.anthropic import Behavior, FakeAnthropic
from addon.fakes.cloud import FakeBedrock, FakeBedrockMantle, FakeVertex

from .conftest import endpoints_config, wait_until
from .test_failover import MESSAGE, sdk

ACCESS_KEY = "AKIATESTPROXYCLOUD01"
SECRET_KEY = "test/PROXYCLOUD/secret/0000000000000001"
API_KEY = "ABSKtest-PROXYCLOUD-API-KEY-00000000001"
REGION = "us-east-1"
CLIENT_KEY = "sk-ant-client-key-0000"
CLIENT_BETAS = "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14"
WORDS = "one two three four five"
SECRETS = (SECRET_KEY, API_KEY, "ya29.")


def aws_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """AWS's credential chain kept to what a test gives it: no files, no instance metadata."""
    return {
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        **extra,
    }


def with_keys(tmp_path: Path, **extra: str) -> dict[str, str]:
    return aws_env(tmp_path, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, **extra)


def platform(name: str, provider: str, base_url: str, **more: str) -> dict[str, str]:
    return {"name": name, "provider": provider, "region": REGION, "baseUrl": base_url, **more}


@pytest.fixture
def bedrock():
    with FakeBedrock(
        region=REGION, aws_access_key=ACCESS_KEY, aws_secret_key=SECRET_KEY, api_key=API_KEY
    ) as fake:
        yield fake


@pytest.fixture
def vertex(tmp_path: Path):
    with FakeVertex(region="us-east5") as fake:
        fake.write_key_file(tmp_path / "vertex-key.json")
        yield fake


def vertex_endpoint(fake: FakeVertex) -> dict[str, str]:
    return {
        "name": "vertex",
        "provider": "vertex",
        "region": fake.region,
        "project": fake.project,
        "baseUrl": fake.base_url,
    }


def config_with(*fakes: FakeAnthropic, then: list[dict[str, str]], first: list[dict[str, str]] = ()):
    config = endpoints_config(*fakes)
    config["endpoints"] = [*first, *config["endpoints"], *then]
    return config


def client(proxy) -> anthropic.Anthropic:
    """Claude Code's way: its own key and betas, a subscription's among them."""
    return sdk(proxy, default_headers={"anthropic-beta": CLIENT_BETAS})


def no_secrets(proxy) -> None:
    logs = proxy.logs()
    assert not [s for s in SECRETS if s in logs]


# -- failing over to a cloud ---------------------------------------------------------------


def test_anthropic_429_fails_over_to_bedrock_streamed_and_signed(tmp_path, proxy_factory, primary, bedrock):
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "30"),))
    bedrock.behavior = Behavior(kind="ok", text=WORDS, event_delay=0.15)
    proxy = proxy_factory(
        config_with(primary, then=[platform("bedrock", "bedrock", bedrock.url)]), with_keys(tmp_path)
    )
    arrivals = []
    with client(proxy).messages.stream(**dict(MESSAGE, model="claude-sonnet-4-5-20250929")) as stream:
        for _ in stream.text_stream:
            arrivals.append(time.monotonic())
        final = stream.get_final_message()
    assert "".join(b.text for b in final.content if b.type == "text") == WORDS
    assert final.usage.output_tokens > 0 and final.stop_reason == "end_turn"
    assert arrivals[-1] - arrivals[0] > 0.3  # each event as its frame came, not all at the end
    (seen,) = bedrock.requests
    assert seen.auth == "sigv4" and seen.refusal is None
    assert seen.path == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke-with-response-stream"
    body = seen.json()
    assert "model" not in body and "stream" not in body and body["anthropic_version"] == "bedrock-2023-05-31"
    assert body["anthropic_beta"] == ["claude-code-20250219", "interleaved-thinking-2025-05-14"]
    assert seen.header("x-api-key") is None and CLIENT_KEY not in json.dumps(seen.headers)
    assert proxy.metric("ccf_failovers_total", from_endpoint="primary", to_endpoint="bedrock") == 1
    assert proxy.metric("ccf_tokens_total", endpoint="bedrock", kind="input") == 10
    assert proxy.endpoint("bedrock")["provider"] == "bedrock"
    assert proxy.metric("ccf_endpoint_info", endpoint="bedrock", provider="bedrock") == 1
    no_secrets(proxy)


def test_anthropic_529_fails_over_to_vertex_with_one_token(tmp_path, proxy_factory, primary, vertex):
    primary.behavior = Behavior(kind="status", status=529)
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "vertex-key.json")}
    proxy = proxy_factory(config_with(primary, then=[vertex_endpoint(vertex)]), env)
    for stream in (True, False, True):
        request = dict(MESSAGE, model="claude-sonnet-4-5-20250929")
        if stream:
            with client(proxy).messages.stream(**request) as answer:
                assert answer.get_final_text() == "Hello from the fake."
        else:
            assert client(proxy).messages.create(**request).content[0].text == "Hello from the fake."
    assert [r.model for r in vertex.requests] == ["claude-sonnet-4-5@20250929"] * 3
    assert [r.path.rsplit(":", 1)[1] for r in vertex.requests] == [
        "streamRawPredict",
        "rawPredict",
        "streamRawPredict",
    ]
    assert vertex.token_requests == 1 and vertex.auth_failures == 0
    assert (
        vertex.requests[0].header("anthropic-beta") == "claude-code-20250219,interleaved-thinking-2025-05-14"
    )
    no_secrets(proxy)


def test_a_vertex_token_is_refreshed_before_it_expires_and_a_refused_one_fails_over(
    tmp_path, proxy_factory, primary, vertex
):
    vertex.token_lifetime = 227  # google-auth renews 3 min 45 s early: stale for the proxy after 2 s
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "vertex-key.json")}
    proxy = proxy_factory(config_with(primary, first=[vertex_endpoint(vertex)], then=[]), env)

    def answered_by_vertex() -> bool:
        response = httpx.post(proxy.url + "/v1/messages", json=MESSAGE, headers={"x-api-key": CLIENT_KEY})
        assert response.status_code == 200 and response.headers["x-fake-name"] == "vertex"
        return vertex.token_requests == 2

    wait_until(answered_by_vertex, 10, "a second token, fetched before the first expired")
    assert vertex.auth_failures == 0 and primary.request_count == 0
    vertex.expire_tokens()  # the platform ends the token early: the proxy's credentials, not the client's
    response = httpx.post(proxy.url + "/v1/messages", json=MESSAGE, headers={"x-api-key": CLIENT_KEY})
    assert response.status_code == 200 and response.headers["x-fake-name"] == "primary"
    assert proxy.endpoint("vertex")["reason"] == "credentials"


# -- failing over from a cloud -------------------------------------------------------------


@pytest.mark.parametrize("fault", ["throttled", "exception_frame", "exception_after_preamble"])
def test_bedrock_faults_before_content_fail_over_invisibly(tmp_path, proxy_factory, bedrock, backup, fault):
    if fault == "throttled":
        bedrock.behavior = Behavior(kind="status", status=429)
    else:
        bedrock.stream_exception = "modelStreamErrorException"
        bedrock.behavior = Behavior(
            kind="sse_error_first" if fault == "exception_frame" else "sse_error_after_preamble"
        )
    config = config_with(backup, first=[platform("bedrock", "bedrock", bedrock.url)], then=[])
    proxy = proxy_factory(config, with_keys(tmp_path))
    with client(proxy).messages.with_streaming_response.create(**MESSAGE, stream=True) as response:
        assert response.headers["x-fake-name"] == "backup"
        events = [line for line in response.read().decode().splitlines() if line.startswith("event: ")]
    assert events.count("event: message_start") == 1 and "event: error" not in events
    assert bedrock.request_count == 1 and backup.request_count == 1
    outcome = "status" if fault == "throttled" else "sse_error"
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="bedrock", outcome=outcome) == 1
    assert proxy.endpoint("bedrock")["status"] == "cooling"


def test_a_bedrock_400_is_relayed_anthropic_shaped_and_nothing_else_is_tried(
    tmp_path, proxy_factory, bedrock, backup
):
    bedrock.behavior = Behavior(kind="status", status=400)
    proxy = proxy_factory(
        config_with(backup, first=[platform("bedrock", "bedrock", bedrock.url)], then=[]), with_keys(tmp_path)
    )
    with pytest.raises(anthropic.BadRequestError) as error:
        client(proxy).messages.create(**MESSAGE)
    assert error.value.status_code == 400
    assert error.value.body["type"] == "error"
    assert error.value.body["error"]["type"] == "invalid_request_error"
    assert error.value.body["error"]["message"]  # Bedrock's own words
    assert error.value.response.headers["request-id"]
    assert backup.request_count == 0 and proxy.endpoint("bedrock")["status"] == "healthy"


def test_bedrock_in_the_middle_of_a_stream_error_reaches_the_client_as_an_event(
    tmp_path, proxy_factory, bedrock, backup
):
    bedrock.behavior = Behavior(kind="sse_error_after", after_events=5, text=WORDS)
    proxy = proxy_factory(
        config_with(backup, first=[platform("bedrock", "bedrock", bedrock.url)], then=[]), with_keys(tmp_path)
    )
    with httpx.stream(
        "POST", proxy.url + "/v1/messages", json=dict(MESSAGE, stream=True), timeout=10
    ) as response:
        text = response.read().decode()
    assert "event: content_block_delta" in text
    assert (
        text.rstrip()
        .splitlines()[-1]
        .startswith('data: {"type": "error", "error": {"type": "rate_limit_error"')
    )
    assert backup.request_count == 0  # content had reached the client: nothing to hide


# -- credentials ---------------------------------------------------------------------------


def test_a_bedrock_api_key_works_without_aws_credentials(tmp_path, proxy_factory, primary, bedrock):
    primary.behavior = Behavior(kind="status", status=503)
    endpoint = platform("bedrock", "bedrock", bedrock.url, apiKey=API_KEY)
    proxy = proxy_factory(config_with(primary, then=[endpoint]), aws_env(tmp_path))
    assert client(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."
    (seen,) = bedrock.requests
    assert seen.auth == "bearer" and seen.path.endswith("/invoke")
    no_secrets(proxy)


def test_missing_credentials_give_a_prompt_clear_answer(tmp_path, proxy_factory, bedrock):
    config = endpoints_config()
    config["endpoints"] = [platform("bedrock", "bedrock", bedrock.url)]
    proxy = proxy_factory(config, aws_env(tmp_path))  # it starts, and says what it looked for
    wait_until(lambda: "endpoint_credentials_missing" in proxy.logs(), 10, "the credentials line")
    line = next(line for line in proxy.logs().splitlines() if "endpoint_credentials_missing" in line)
    assert '"endpoint": "bedrock"' in line and "AWS_ACCESS_KEY_ID" in line and "~/.aws/credentials" in line
    state = proxy.endpoint("bedrock")
    assert state["status"] == "cooling" and state["reason"] == "credentials"
    started = time.monotonic()
    response = httpx.post(
        proxy.url + "/v1/messages", json=MESSAGE, headers={"x-api-key": CLIENT_KEY}, timeout=30
    )
    assert time.monotonic() - started < 5
    assert response.status_code == 502 and "no AWS credentials found" in response.json()["error"]["message"]
    assert bedrock.request_count == 0


def test_without_credentials_a_cloud_endpoint_is_skipped(tmp_path, proxy_factory, bedrock, backup):
    config = config_with(backup, first=[platform("bedrock", "bedrock", bedrock.url)], then=[])
    proxy = proxy_factory(config, aws_env(tmp_path))
    for _ in range(2):
        assert client(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."
    assert backup.request_count == 2 and bedrock.request_count == 0


# -- Mantle and Foundry: Anthropic's API on AWS and on Azure -------------------------------


def test_anthropic_429_fails_over_to_bedrock_mantle(tmp_path, proxy_factory, primary):
    primary.behavior = Behavior(kind="status", status=429)
    with FakeBedrockMantle(region=REGION, aws_access_key=ACCESS_KEY, aws_secret_key=SECRET_KEY) as mantle:
        endpoint = platform("mantle", "bedrock-mantle", mantle.base_url)
        proxy = proxy_factory(config_with(primary, then=[endpoint]), with_keys(tmp_path))
        with client(proxy).messages.stream(**MESSAGE) as stream:
            assert stream.get_final_text() == "Hello from the fake."
        (seen,) = mantle.requests
    assert seen.auth == "sigv4" and seen.path == "/anthropic/v1/messages"
    assert seen.json()["model"] == "anthropic.claude-sonnet-4-6"
    assert seen.header("anthropic-beta") == "claude-code-20250219,interleaved-thinking-2025-05-14"
    assert seen.header("x-api-key") is None


def test_foundry_is_anthropics_api_under_a_path(proxy_factory, primary, fakes):
    foundry = fakes("foundry")  # https://{resource}.services.ai.azure.com/anthropic, x-api-key
    primary.behavior = Behavior(kind="status", status=529)
    config = config_with(
        primary,
        then=[
            {"name": "foundry", "baseUrl": foundry.url + "/anthropic", "apiKey": "foundry-key-000000000001"}
        ],
    )
    proxy = proxy_factory(config)
    assert client(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."
    (seen,) = foundry.requests
    assert seen.path == "/anthropic/v1/messages" and seen.header("x-api-key") == "foundry-key-000000000001"


def test_ccf_check_says_what_each_cloud_endpoint_has(tmp_path, primary, bedrock):
    import subprocess
    import sys

    import yaml

    from .conftest import ROOT, clean_env

    config = endpoints_config(primary)
    config["endpoints"] += [
        platform("bedrock", "bedrock", bedrock.url),
        platform("keyed", "bedrock", bedrock.url, apiKey=API_KEY),
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**clean_env(tmp_path / "home"), **with_keys(tmp_path)}

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "addon.cli", "-c", str(path), "check", *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)

    quiet = check()
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    rows = {line.split()[0]: line for line in quiet.stdout.splitlines()[1:]}
    assert "AWS credentials (env)" in rows["bedrock"] and "credentials found" in rows["bedrock"]
    assert "Bedrock API key" in rows["keyed"]
    assert bedrock.request_count == 0  # looking for credentials calls nothing
    called = check("--call")
    assert called.returncode == 0, called.stdout + called.stderr
    assert "answered in" in {line.split()[0]: line for line in called.stdout.splitlines()[1:]}["bedrock"]
    assert sorted(r.auth for r in bedrock.requests) == ["bearer", "sigv4"]
    assert bedrock.requests[0].json()["max_tokens"] == 1
    env.pop("AWS_ACCESS_KEY_ID")
    missing = check()
    assert missing.returncode == 1 and "no usable credentials: no AWS credentials found" in missing.stdout
    for secret in (SECRET_KEY, API_KEY):
        assert secret not in quiet.stdout + called.stdout + missing.stdout


def test_a_request_no_endpoint_serves_gets_a_clear_404(tmp_path, proxy_factory, bedrock):
    config = endpoints_config()
    config["endpoints"] = [platform("bedrock", "bedrock", bedrock.url)]
    proxy = proxy_factory(config, with_keys(tmp_path))
    response = httpx.post(proxy.url + "/v1/messages/batches", json=MESSAGE, timeout=10)
    assert response.status_code == 404
    assert "bedrock: Bedrock's runtime serves Messages only" in response.json()["error"]["message"]


def test_mitmweb_shows_where_a_cloud_request_went_and_no_secret(tmp_path, primary, bedrock):
    from .conftest import Proxy, free_port
    from .test_operations import WEB_AUTH, mitmweb_command

    primary.behavior = Behavior(kind="status", status=429)
    config = config_with(primary, then=[platform("bedrock", "bedrock", bedrock.url)])
    proxy = Proxy(tmp_path, config, with_keys(tmp_path))
    web_port = free_port()
    proxy.command = lambda *extra, _c=proxy.command: mitmweb_command(_c(*extra), web_port)  # type: ignore[method-assign]
    proxy.start()
    try:
        with client(proxy).messages.stream(**MESSAGE) as stream:
            assert stream.get_final_text() == "Hello from the fake."
        with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers=WEB_AUTH, timeout=5) as web:

            def answered():
                flows = web.get("/flows").json()
                return next(
                    (f for f in flows if f.get("response") and "/model/" in f["request"]["path"]), None
                )

            flow = wait_until(answered, 10, "the flow in mitmweb")
            assert (
                flow["request"]["path"] == "/model/us.anthropic.claude-sonnet-4-6/invoke-with-response-stream"
            )
            assert "primary: status" in flow["comment"] and "bedrock: ok" in flow["comment"]
            shown = json.dumps(flow) + web.get(f"/flows/{flow['id']}/request/content.data").text
            for secret in (SECRET_KEY, CLIENT_KEY, "Signature=", "AWS4-HMAC-SHA256"):
                assert secret not in shown
    finally:
        proxy.stop()
    no_secrets(proxy)


def test_credentials_the_platform_refuses_fail_over_and_cool_the_endpoint(tmp_path, proxy_factory, backup):
    # an AWS session token that expired or was revoked: the proxy's own, never the client's
    with FakeBedrock(
        region=REGION,
        aws_access_key=ACCESS_KEY,
        aws_secret_key=SECRET_KEY,
        aws_session_token="the-current-session-token",
    ) as bedrock:
        env = with_keys(tmp_path, AWS_SESSION_TOKEN="an-expired-session-token")
        proxy = proxy_factory(
            config_with(backup, first=[platform("bedrock", "bedrock", bedrock.url)], then=[]), env
        )
        assert client(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."
        assert bedrock.request_count == 1 and bedrock.auth_failures == 1
    state = proxy.endpoint("bedrock")
    assert state["status"] == "cooling" and state["reason"] == "credentials"
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="bedrock", outcome="credentials") == 1
