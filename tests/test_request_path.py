"""What reaches each endpoint: URL, headers, auth, model; and what the proxy itself serves."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import httpx
import pytest

from addon.fakes.anthropic import Behavior
from addon.proxy import WHOLE_BODY_LIMIT

from .conftest import BACKUP_KEY, PRIMARY_KEY, Proxy, endpoints_config, wait_until
from .test_failover import MESSAGE, post, sdk, stream_text


def test_any_method_path_and_query_passes(proxy, primary):
    models = httpx.get(proxy.url + "/v1/models?limit=5", headers={"x-api-key": "k"}, timeout=10)
    assert models.status_code == 200 and models.json()["data"]
    count = post(proxy, path="/v1/messages/count_tokens?beta=true")
    assert count.json() == {"input_tokens": 42}
    head = httpx.head(proxy.url + "/", timeout=10)
    assert head.status_code == 200
    assert head.reason_phrase == "OK"  # the status line as the endpoint sent it
    seen = [(r.method, r.path) for r in primary.wait_for_requests(3)]
    assert seen == [
        ("GET", "/v1/models?limit=5"),
        ("POST", "/v1/messages/count_tokens?beta=true"),
        ("HEAD", "/"),
    ]


def test_path_prefix_bearer_auth_extra_headers_and_model_map(proxy_factory, primary, backup):
    config = endpoints_config(primary, backup)
    config["endpoints"][1].update(
        baseUrl=backup.url + "/api/anthropic",
        authHeader="bearer",
        headers={"x-provider": "yes"},
        models={"claude-sonnet-4-6": "glm-4.6", "*": "glm-4.5-air"},
    )
    proxy = proxy_factory(config)
    primary.behavior = Behavior(kind="status", status=529)
    stream_text(proxy)
    seen = backup.wait_for_requests(1)[0]
    assert seen.path == "/api/anthropic/v1/messages"
    assert seen.header("authorization") == f"Bearer {BACKUP_KEY}"
    assert seen.header("x-api-key") is None
    assert seen.header("x-provider") == "yes"
    assert seen.json()["model"] == "glm-4.6"
    assert seen.json()["messages"] == MESSAGE["messages"]
    post(proxy, body=dict(MESSAGE, model="claude-haiku-4-5"))
    assert backup.wait_for_requests(2)[1].json()["model"] == "glm-4.5-air"
    assert primary.requests[0].json()["model"] == "claude-sonnet-4-6"  # primary has no map


def test_endpoint_without_key_passes_the_clients_key(proxy_factory, primary):
    config = endpoints_config(primary)
    del config["endpoints"][0]["apiKey"]
    proxy = proxy_factory(config)
    post(proxy, headers={"authorization": "Bearer client-oauth-token"})
    seen = primary.wait_for_requests(1)[0]
    assert seen.header("x-api-key") == "sk-ant-client-key-0000"
    assert seen.header("authorization") == "Bearer client-oauth-token"


ENV_KEY = "sk-ant-env-ENVIRONMENTSECRETKEY0000004"


def test_environment_key_is_not_sent_beyond_anthropic(proxy_factory, primary, backup):
    config = endpoints_config(primary, backup)
    del config["endpoints"][0]["apiKey"]
    proxy = proxy_factory(config, {"ANTHROPIC_API_KEY": ENV_KEY})
    post(proxy)
    seen = primary.wait_for_requests(1)[0]
    assert seen.header("x-api-key") == "sk-ant-client-key-0000"
    assert ENV_KEY not in str(seen.headers)
    wait_until(lambda: '"event": "started"' in proxy.logs(), 10, "the started event")
    warnings = [
        json.loads(line[line.index("{") :])
        for line in proxy.logs().splitlines()
        if "env_key_withheld" in line
    ]
    assert [(w["level"], w["endpoint"]) for w in warnings] == [("warning", "primary")]  # backup has a key
    assert "ANTHROPIC_API_KEY (sk-ant-…0004) is not sent to 127.0.0.1" in warnings[0]["warning"]
    assert "the client's own credentials pass through" in warnings[0]["warning"]
    assert ENV_KEY not in proxy.logs() and ENV_KEY[8:-4] not in proxy.logs()


def test_endpoint_key_replaces_the_clients_credentials(proxy, primary):
    post(proxy, headers={"authorization": "Bearer client-oauth-token"})
    seen = primary.wait_for_requests(1)[0]
    assert seen.header("x-api-key") == PRIMARY_KEY
    assert seen.header("authorization") is None


def test_hop_by_hop_headers_are_stripped_and_others_kept(proxy, primary):
    post(
        proxy,
        headers={
            "connection": "keep-alive, x-private-hop",
            "x-private-hop": "drop me",
            "keep-alive": "timeout=5",
            "anthropic-beta": "claude-code-20250219",
            "x-stainless-timeout": "600",
        },
    )
    seen = primary.wait_for_requests(1)[0]
    names = {name for name, _ in seen.headers}
    assert "x-private-hop" not in names and "keep-alive" not in names
    assert seen.header("anthropic-beta") == "claude-code-20250219"
    assert seen.header("x-stainless-timeout") == "600"
    assert seen.header("x-ccf-bridge-token") is None


def test_no_config_uses_the_reverse_target_and_the_clients_key(proxy_factory, primary):
    proxy = proxy_factory(None, target=primary.url)
    assert [e["baseUrl"] for e in proxy.health()["endpoints"]] == [primary.url]
    assert sdk(proxy).messages.create(**MESSAGE).content[0].text == "Hello from the fake."
    seen = primary.wait_for_requests(1)[0]
    # the SDK sends its key as x-api-key (0.x) or as a bearer token (2.x): either passes as is
    assert "sk-ant-client-key-0000" in (
        seen.header("x-api-key"),
        (seen.header("authorization") or "").removeprefix("Bearer "),
    )


def test_anthropic_api_key_named_in_the_config_goes_to_any_host(proxy_factory, primary):
    config = endpoints_config(primary)
    config["endpoints"][0]["apiKey"] = "${ANTHROPIC_API_KEY}"
    proxy = proxy_factory(config, {"ANTHROPIC_API_KEY": ENV_KEY})
    post(proxy)
    assert primary.wait_for_requests(1)[0].header("x-api-key") == ENV_KEY
    wait_until(lambda: '"event": "started"' in proxy.logs(), 10, "the started event")
    assert "env_key_withheld" not in proxy.logs()
    assert ENV_KEY not in proxy.logs()


def test_environment_endpoints_replace_the_files(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary), {"CLAUDE_FALLBACK_ENDPOINTS": f"{backup.url}"})
    post(proxy)
    assert backup.wait_for_requests(1) and primary.requests == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("endpoints: [\n  - name: a\n", "line"),
        (
            "endpoints:\n  - name: a\n    baseUrl: http://x\n    colour: red\n",
            "endpoints[0].colour",
        ),
        ("endpoints:\n  - name: a\n    baseUrl: ftp://x\n", "endpoints[0].baseUrl"),
        (
            "endpoints:\n  - {name: a, baseUrl: 'http://x'}\n  - {name: a, baseUrl: 'http://y'}\n",
            "endpoints[1].name",
        ),
        ("endpoints: []\n", "endpoints"),
        ("server:\n  port: lots\n", "server.port"),
    ],
)
def test_invalid_config_at_start_exits_nonzero_and_listens_nowhere(tmp_path, text, expected):
    proxy = Proxy(tmp_path, text)
    result = subprocess.run(proxy.command(), env=proxy.env, capture_output=True, timeout=30, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert str(proxy.config_path) in output
    assert expected in output
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5):
        pass


def test_health_and_metrics(proxy, primary, backup):
    primary.behavior = Behavior(kind="status", status=503)
    post(proxy)
    status, body = proxy.get("/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "degraded"
    assert [e["status"] for e in health["endpoints"]] == ["cooling", "healthy"]
    assert health["endpoints"][0]["lastError"] == "status"
    assert health["version"] and health["uptimeSeconds"] >= 0
    assert proxy.metric("ccf_endpoint_up", endpoint="primary") == 0
    assert proxy.metric("ccf_endpoint_up", endpoint="backup") == 1
    assert proxy.metric("ccf_endpoint_cooldown_remaining_seconds", endpoint="primary") > 25
    assert proxy.metric("ccf_upstream_time_to_headers_seconds_count", endpoint="backup") == 1


def test_health_is_503_when_no_endpoint_is_usable(proxy, primary, backup):
    primary.behavior = backup.behavior = Behavior(kind="status", status=503)
    post(proxy)
    status, body = proxy.get("/health")
    assert status == 503 and json.loads(body)["status"] == "unavailable"


def test_requests_keep_working_across_many_keep_alive_calls(proxy, primary):
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(30):
            response = client.post("/v1/messages", json=MESSAGE, headers={"x-api-key": "k"})
            assert response.status_code == 200
        # a short answer that is not a stream goes to mitmproxy whole: no bridge connection
        assert proxy.logs().count("server connect 127.0.0.1:") == 0
        for _ in range(30):
            streamed = dict(MESSAGE, stream=True)
            with client.stream("POST", "/v1/messages", json=streamed, headers={"x-api-key": "k"}) as response:
                body = response.read()
            assert response.status_code == 200
            assert body.rstrip().endswith(b'{"type":"message_stop"}')
    connections = {r.connection for r in primary.requests}
    assert len(primary.requests) == 60 and len(connections) <= 2  # pooled upstream connections
    # mitmproxy kept one connection to the bridge for the client's keep-alive connection
    assert proxy.logs().count("server connect 127.0.0.1:") == 1
    wait_until(lambda: proxy.metric("ccf_active_streams") == 0)
    assert time.monotonic()


def test_an_answer_too_long_to_hold_is_relayed_through_the_bridge(proxy, primary):
    text = "x" * (WHOLE_BODY_LIMIT + 1000)
    primary.behavior = Behavior(kind="ok", text=text)
    response = post(proxy)
    assert response.status_code == 200
    assert response.json()["content"][0]["text"] == text
    assert int(response.headers["content-length"]) == len(response.content)
    assert proxy.logs().count("server connect 127.0.0.1:") == 1
    assert proxy.metric("ccf_requests_total", outcome="success") == 1
    wait_until(lambda: proxy.metric("ccf_active_streams") == 0, what="no active stream")
