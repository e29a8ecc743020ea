"""What Claude Code expects of any gateway, through the real proxy, for each kind of endpoint.

One proxy per provider serves the module (each test resets its fake): Anthropic's API,
Bedrock's runtime, Bedrock Mantle, Vertex AI and an OpenAI-format endpoint, each the
proxy's only endpoint, behind the fakes of addon/fakes/anthropic.py, fakecloud.py and
fakeopenai.py. The clients are the anthropic SDK and raw httpx, as Claude Code's requests
go: `?beta=true`, its headers, its betas. docs/gateway.md names each test.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import pytest

from addon.fakes import anthropic as fakeapi
from addon.fakes import openai as fakeopenai
from addon.fakes.anthropic import Behavior, FakeAnthropic
from addon.fakes.cloud import BEDROCK_VERSION, FakeBedrock, FakeBedrockMantle, FakeVertex
from addon.fakes.openai import FakeOpenAI

from .conftest import ACCESS_KEY, PRIMARY_KEY, Proxy, endpoints_config, free_port
from .test_clouds import ACCESS_KEY as AWS_KEY
from .test_clouds import SECRET_KEY, platform, vertex_endpoint, with_keys
from .test_failover import MESSAGE, sdk
from .test_openai import OPENAI_KEY, openai_endpoint

PROVIDERS = ["anthropic", "bedrock", "bedrock-mantle", "vertex", "openai"]
STREAMS_WITH_PINGS = [p for p in PROVIDERS if p != "openai"]  # Chat Completions has no pings
PLATFORM_BETAS = "claude-code-20250219,interleaved-thinking-2025-05-14"
CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": PLATFORM_BETAS + ",a-beta-of-tomorrow-2027-01-01",
    "x-app": "cli",
    "x-claude-code-session-id": str(uuid.UUID(int=7)),
    "x-stainless-lang": "js",
    "x-stainless-retry-count": "0",
    "x-stainless-timeout": "600",
    "x-a-header-of-tomorrow": "kept",
    "content-type": "application/json",
    "x-api-key": "sk-ant-client-key-0000",
}
SYSTEM = [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.0"},
    {"type": "text", "text": "You are Claude Code."},
    {"type": "text", "text": "Today is Monday.", "cache_control": {"type": "ephemeral"}},
]
# Each endpoint names one client model of its own, which a locally built model list shows
MAPPED = {
    "anthropic": {"claude-haiku-4-5": "claude-haiku-4-5-20251001"},
    "bedrock": {"claude-opus-4-8": "global.anthropic.claude-opus-4-8-v1"},
    "bedrock-mantle": {"claude-opus-4-8": "anthropic.claude-opus-4-8"},
    "vertex": {"claude-opus-4-8": "claude-opus-4-8@20261101"},
    "openai": {"claude-sonnet-4-6": "gpt-fake", "*": "gpt-fake-mini"},
}


@dataclass
class Gateway:
    provider: str
    proxy: Proxy
    fake: Any  # the endpoint's fake: FakeAnthropic, a platform's, or FakeOpenAI


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Gateway]]:
    """A proxy in front of each provider, started when a test first asks for it."""
    started: dict[str, Gateway] = {}
    with contextlib.ExitStack() as stack:

        def start(provider: str) -> Gateway:
            if provider in started:
                return started[provider]
            workdir = tmp_path_factory.mktemp(provider)
            env = with_keys(workdir)
            models = MAPPED[provider]
            fake: Any
            if provider == "anthropic":
                fake = stack.enter_context(FakeAnthropic("anthropic"))
                endpoint = {"name": "anthropic", "baseUrl": fake.url, "apiKey": PRIMARY_KEY}
            elif provider == "bedrock":
                fake = stack.enter_context(FakeBedrock(aws_access_key=AWS_KEY, aws_secret_key=SECRET_KEY))
                endpoint = platform("bedrock", "bedrock", fake.url)
            elif provider == "bedrock-mantle":
                mantle = FakeBedrockMantle(aws_access_key=AWS_KEY, aws_secret_key=SECRET_KEY)
                fake = stack.enter_context(mantle)
                endpoint = platform("mantle", "bedrock-mantle", fake.base_url)
            elif provider == "vertex":
                fake = stack.enter_context(FakeVertex(region="us-east5"))
                env["GOOGLE_APPLICATION_CREDENTIALS"] = str(fake.write_key_file(workdir / "key.json"))
                endpoint = vertex_endpoint(fake)
            else:
                fake = stack.enter_context(FakeOpenAI("openai"))
                endpoint = openai_endpoint(fake)
            config = endpoints_config(streaming={"holdMaxMs": 150})
            config["endpoints"] = [{**endpoint, "models": models}]
            proxy = Proxy(workdir, config, env)
            stack.callback(proxy.stop)
            started[provider] = Gateway(provider, proxy.start(), fake)
            return started[provider]

        yield start
    for gateway in started.values():
        logs = gateway.proxy.logs()
        assert not [k for k in (PRIMARY_KEY, SECRET_KEY, OPENAI_KEY) if k in logs], gateway.provider


@pytest.fixture
def via(request: pytest.FixtureRequest, gateways: Callable[[str], Gateway]) -> Gateway:
    gateway = gateways(request.param)
    gateway.fake.reset()
    return gateway


def each(providers: list[str]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("via", providers, indirect=True)


def claude_code_post(proxy: Proxy, body: bytes, path: str = "/v1/messages?beta=true") -> httpx.Response:
    return httpx.post(proxy.url + path, content=body, headers=CLAUDE_CODE_HEADERS, timeout=10)


def compact(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


# -- headers and fields -----------------------------------------------------------------------


@each(PROVIDERS)
def test_claude_codes_headers_and_unknown_fields_reach_the_endpoint(via: Gateway) -> None:
    body = compact({**MESSAGE, "system": SYSTEM, "a_field_of_tomorrow": {"kept": True}})
    answer = claude_code_post(via.proxy, body)
    assert answer.status_code == 200, answer.text
    if via.provider == "openai":  # translated: Chat Completions has no place for them
        assert answer.json()["content"][0]["text"] == fakeopenai.TEXT.text
        return
    (seen,) = via.fake.requests
    if via.provider == "anthropic":  # as they came, byte for byte
        assert seen.path == "/v1/messages?beta=true" and seen.body == body
        for name, value in CLAUDE_CODE_HEADERS.items():
            assert seen.header(name) == (PRIMARY_KEY if name == "x-api-key" else value), name
        return
    # the platforms take the betas they document, and refuse others with a 400
    assert seen.json()["a_field_of_tomorrow"] == {"kept": True}
    if via.provider == "bedrock":
        assert seen.anthropic_beta == PLATFORM_BETAS.split(",")
        assert seen.json()["anthropic_version"] == BEDROCK_VERSION
        return
    assert seen.header("anthropic-beta") == PLATFORM_BETAS
    if via.provider == "bedrock-mantle":  # Anthropic's API: the other headers go as they came
        for name in ("anthropic-version", "x-app", "x-claude-code-session-id", "x-a-header-of-tomorrow"):
            assert seen.header(name) == CLAUDE_CODE_HEADERS[name], name
        assert seen.header("x-stainless-timeout") == "600" and seen.header("x-api-key") is None


@each(PROVIDERS)
def test_messages_is_matched_on_its_path_whatever_the_query(via: Gateway) -> None:
    # Claude Code posts to /v1/messages?beta=true (the SDK's beta resource did too, before 1.x)
    with httpx.stream(
        "POST", via.proxy.url + "/v1/messages?beta=true", json=dict(MESSAGE, stream=True), timeout=10
    ) as response:
        body = response.read().decode()
    assert response.status_code == 200 and "event: message_stop" in body
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    expected = fakeopenai.TEXT.text if via.provider == "openai" else "Hello from the fake."
    assert text == expected
    (seen,) = via.fake.requests
    # Anthropic's API takes the query; a platform's URL is built afresh (Vertex refuses it)
    assert ("beta=true" in seen.path) == (via.provider in ("anthropic", "bedrock-mantle"))


@each(PROVIDERS)
def test_the_system_array_keeps_its_order(via: Gateway) -> None:
    # Anthropic's endpoint maps this model: its body is rewritten, not only passed on
    model = "claude-haiku-4-5" if via.provider == "anthropic" else MESSAGE["model"]
    message = sdk(via.proxy).beta.messages.create(**dict(MESSAGE, model=model, system=SYSTEM))
    assert message.content
    sent = via.fake.requests[0].json()
    if via.provider == "openai":
        assert sent["messages"][0] == {"role": "system", "content": "\n\n".join(b["text"] for b in SYSTEM)}
    else:
        assert sent["system"] == SYSTEM
    if via.provider == "anthropic":
        assert sent["model"] == "claude-haiku-4-5-20251001"


# -- what the proxy answers itself -------------------------------------------------------------


@each(PROVIDERS)
def test_model_discovery_answers_within_three_seconds(via: Gateway) -> None:
    started = time.monotonic()
    models = sdk(via.proxy).models.list()
    assert time.monotonic() - started < 3  # Claude Code waits 3 s
    ids = [m.id for m in models.data]
    if via.provider == "anthropic":  # the endpoint's own list
        assert ids == ["claude-sonnet-4-6", "claude-haiku-4-5-20251001"]
        assert [r.path for r in via.fake.requests] == ["/v1/models"]
        return
    # a platform's ids are not names a client may send: the proxy lists its `models` maps
    assert ids == [name for name in MAPPED[via.provider] if name != "*"]
    assert models.data[0].type == "model" and models.data[0].display_name == ids[0]
    assert models.first_id == ids[0] and models.last_id == ids[-1] and not models.has_more
    assert via.fake.request_count == 0


def test_model_discovery_asks_the_first_endpoint_that_lists_models(tmp_path, proxy_factory, primary):
    with FakeBedrock(aws_access_key=AWS_KEY, aws_secret_key=SECRET_KEY) as bedrock:
        config = endpoints_config(primary)
        config["endpoints"].insert(0, platform("bedrock", "bedrock", bedrock.url))
        proxy = proxy_factory(config, with_keys(tmp_path))
        listed = sdk(proxy).models.list()
        assert [m.id for m in listed.data] == ["claude-sonnet-4-6", "claude-haiku-4-5-20251001"]
        assert bedrock.request_count == 0 and len(primary.requests) == 1


@each(PROVIDERS)
def test_the_hello_probe_is_answered_at_once_whatever_the_endpoint_does(via: Gateway) -> None:
    via.fake.behavior = fakeopenai.Behavior("hang") if via.provider == "openai" else Behavior("hang")
    started = time.monotonic()
    probe = httpx.head(via.proxy.url + "/api/hello", timeout=10)
    assert probe.status_code == 200 and time.monotonic() - started < 1
    assert via.fake.request_count == 0


@each(PROVIDERS)
def test_token_counts_are_served_or_refused_with_501_not_supported(via: Gateway) -> None:
    # the SDK's own retries on: a 501 must say that trying again will not help
    client = anthropic.Anthropic(base_url=via.proxy.url, api_key="sk-ant-client-key-0000", max_retries=2)
    refused_before = via.proxy.metric("ccf_requests_total", outcome="unavailable")
    if via.provider in ("bedrock", "openai"):  # their APIs count no tokens
        with pytest.raises(anthropic.APIStatusError) as refused:
            client.beta.messages.count_tokens(model=MESSAGE["model"], messages=MESSAGE["messages"])
        assert refused.value.status_code == 501
        assert refused.value.response.headers["x-should-retry"] == "false"
        error = refused.value.body["error"]
        assert error["type"] == "not_supported" and "No endpoint counts tokens" in error["message"]
        assert via.fake.request_count == 0
        assert via.proxy.metric("ccf_requests_total", outcome="unavailable") == refused_before + 1
        return
    counted = client.beta.messages.count_tokens(model=MESSAGE["model"], messages=MESSAGE["messages"])
    assert counted.input_tokens == 42
    assert via.fake.request_count == 1


# -- streams ----------------------------------------------------------------------------------


@each(PROVIDERS)
def test_streams_are_relayed_as_they_come_with_their_pings(via: Gateway) -> None:
    if via.provider == "openai":
        via.fake.behavior = fakeopenai.Behavior(
            answer=fakeopenai.Answer(text="one two three"), event_delay=0.2, split=False
        )
    else:  # message_start, content_block_start, ping, then a delta each 0.2 s
        via.fake.behavior = Behavior(text="one two three", event_delay=0.2)
    arrivals: dict[str, list[float]] = {}
    url, body = via.proxy.url + "/v1/messages?beta=true", compact({**MESSAGE, "stream": True})
    with httpx.stream("POST", url, content=body, headers=CLAUDE_CODE_HEADERS, timeout=10) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("event: "):
                arrivals.setdefault(line[7:], []).append(time.monotonic())
    deltas = arrivals["content_block_delta"]
    assert deltas[-1] - deltas[0] > 0.2  # each as it came, not gathered at the end
    assert "message_stop" in arrivals
    if via.provider in STREAMS_WITH_PINGS:
        (ping,) = arrivals["ping"]
        assert deltas[0] - ping > 0.1  # the ping went out before any content, on its own


# -- errors -----------------------------------------------------------------------------------


@each(PROVIDERS)
def test_an_endpoints_error_reaches_the_client_as_it_came(via: Gateway) -> None:
    status = 400
    if via.provider == "openai":
        via.fake.behavior = fakeopenai.Behavior("status", status=status)
    else:
        via.fake.behavior = Behavior("status", status=status)
    answer = claude_code_post(via.proxy, compact(MESSAGE))
    assert answer.status_code == status and answer.headers["content-type"] == "application/json"
    if via.provider in ("anthropic", "bedrock-mantle"):  # Anthropic's own error: byte for byte
        assert answer.content == fakeapi.error_body(status)
        assert answer.headers["request-id"].startswith("req_fake_")
        return
    # a platform's error in its own shape becomes Anthropic's, with the platform's words
    error = answer.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"]


def test_the_proxys_own_errors_use_anthropics_envelope_and_type(proxy_factory):
    config = endpoints_config(server={"accessKey": ACCESS_KEY, "maxBodyBytes": 4096})
    nowhere = f"http://127.0.0.1:{free_port()}/v1"  # an OpenAI-format endpoint nobody listens on
    config["endpoints"] = [{"name": "gone", "provider": "openai", "baseUrl": nowhere, "models": {"*": "m"}}]
    proxy = proxy_factory(config)
    keyed = {"x-api-key": ACCESS_KEY, "content-type": "application/json"}
    message = compact(MESSAGE)
    cases = [
        ("POST", "/v1/messages", {"content-type": "application/json"}, message, 401, "authentication_error"),
        ("POST", "/v1/messages", keyed, message + b" " * 5000, 413, "request_too_large"),
        ("POST", "/v1/messages", keyed, b'{"model": "claude-', 400, "invalid_request_error"),
        ("GET", "/v1/files", keyed, None, 404, "not_found_error"),
        ("POST", "/v1/messages/count_tokens", keyed, message, 501, "not_supported"),
        ("POST", "/v1/messages", keyed, message, 502, "api_error"),  # last: it cools the endpoint
    ]
    for method, path, headers, content, status, error_type in cases:
        answer = httpx.request(method, proxy.url + path, content=content, headers=headers, timeout=10)
        assert answer.status_code == status, (path, answer.text)
        assert answer.headers["content-type"] == "application/json"
        document = answer.json()
        assert document["type"] == "error" and document["error"]["type"] == error_type, document
        assert isinstance(document["error"]["message"], str) and document["error"]["message"]
