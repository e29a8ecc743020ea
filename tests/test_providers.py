"""The platforms' pure parts: their config defaults, model ids, request shaping and error mapping,
and the Bedrock event-stream translation, frame by frame."""

from __future__ import annotations

import base64
import binascii
import json
import struct
from pathlib import Path

import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.config import ConfigError, load_config
from addon.providers import Headers, Untranslatable, cloud, for_endpoint
from addon.providers.bedrock import EventStreamToSse, aws_error
from addon.providers.eventstream import FrameError, Frames
from addon.providers.vertex import Vertex
from addon.request import ClientRequest


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, env or {})


# -- config --------------------------------------------------------------------------------


def test_platform_defaults_come_from_the_environment_as_the_sdks_read_them(tmp_path: Path) -> None:
    text = (
        "endpoints:\n"
        "  - {name: bedrock, provider: bedrock}\n"
        "  - {name: mantle, provider: bedrock-mantle, region: us-west-2}\n"
        "  - {name: vertex, provider: vertex}\n"
    )
    env = {
        "AWS_DEFAULT_REGION": "eu-west-1",
        "CLOUD_ML_REGION": "us-east5",
        "ANTHROPIC_VERTEX_PROJECT_ID": "p1",
    }
    bedrock, mantle, vertex = load(tmp_path, text, env).endpoints
    assert (bedrock.region, bedrock.base_url) == (
        "eu-west-1",
        "https://bedrock-runtime.eu-west-1.amazonaws.com",
    )
    assert mantle.base_url == "https://bedrock-mantle.us-west-2.api.aws/anthropic"
    assert (vertex.region, vertex.project) == ("us-east5", "p1")
    assert vertex.base_url == "https://us-east5-aiplatform.googleapis.com/v1"
    assert bedrock.api_key is None


@pytest.mark.parametrize(
    "region,url",
    [
        ("global", "https://aiplatform.googleapis.com/v1"),
        ("us", "https://aiplatform.us.rep.googleapis.com/v1"),
        ("eu", "https://aiplatform.eu.rep.googleapis.com/v1"),
        ("europe-west1", "https://europe-west1-aiplatform.googleapis.com/v1"),
    ],
)
def test_vertex_base_url_per_region(tmp_path: Path, region: str, url: str) -> None:
    text = f"endpoints: [{{provider: vertex, region: {region}, project: p}}]\n"
    assert load(tmp_path, text).endpoints[0].base_url == url


def test_base_url_variables_and_the_bedrock_api_key_are_honoured(tmp_path: Path) -> None:
    env = {
        "AWS_REGION": "us-east-1",
        "ANTHROPIC_BEDROCK_BASE_URL": "http://127.0.0.1:9/",
        "AWS_BEARER_TOKEN_BEDROCK": "bedrock-api-key-0001",
        "ANTHROPIC_API_KEY": "sk-ant-not-for-clouds",
    }
    (endpoint,) = load(tmp_path, "endpoints: [{provider: bedrock}]\n", env).endpoints
    assert endpoint.base_url == "http://127.0.0.1:9"
    assert endpoint.api_key == "bedrock-api-key-0001"  # never ANTHROPIC_API_KEY


def test_a_platform_without_a_region_names_the_field_and_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, "endpoints:\n  - {name: b, provider: bedrock}\n  - {name: v, provider: vertex}\n")
    text = str(error.value)
    assert "config.yaml: endpoints[0].region: required for provider bedrock; or set AWS_REGION" in text
    assert "endpoints[1].region: required for provider vertex; or set CLOUD_ML_REGION" in text


def test_keys_a_provider_does_not_use_are_refused(tmp_path: Path) -> None:
    text = "endpoints:\n  - {name: a, region: us-east-1}\n"
    text += "  - {name: v, provider: vertex, region: global, apiKey: k}\n"
    with pytest.raises(ConfigError) as error:
        load(tmp_path, text)
    assert "endpoints[0].region: not used by provider anthropic" in str(error.value)
    assert "endpoints[1].apiKey: not used by provider vertex" in str(error.value)


def test_a_missing_extra_is_named_with_its_pip_command(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "botocore" else real(name))
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.provider: bedrock needs the bedrock extra; "):
        load(tmp_path, "endpoints: [{provider: bedrock, region: us-east-1}]\n")
    with pytest.raises(ConfigError, match=r"pip install 'claude-code-fallback\[bedrock\]'"):
        load(tmp_path, "endpoints: [{provider: bedrock-mantle, region: us-east-1}]\n")


# -- model ids -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,region,expected",
    [
        ("claude-sonnet-4-5-20250929", "us-east-1", "us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
        ("claude-haiku-4-5-20251001", "eu-central-1", "eu.anthropic.claude-haiku-4-5-20251001-v1:0"),
        ("claude-sonnet-4-20250514", "ap-northeast-1", "apac.anthropic.claude-sonnet-4-20250514-v1:0"),
        ("claude-sonnet-4-5-20250929", "ap-northeast-1", "jp.anthropic.claude-sonnet-4-5-20250929-v1:0"),
        ("claude-sonnet-4-6", "ap-southeast-2", "au.anthropic.claude-sonnet-4-6"),
        ("claude-opus-4-6", "us-west-2", "us.anthropic.claude-opus-4-6-v1"),
        ("claude-sonnet-4-6", "us-gov-west-1", "us-gov.anthropic.claude-sonnet-4-6"),
        ("claude-3-7-sonnet-20250219", "ca-central-1", "global.anthropic.claude-3-7-sonnet-20250219-v1:0"),
        (
            "us.anthropic.claude-opus-4-1-20250805-v1:0",
            "eu-west-1",
            "us.anthropic.claude-opus-4-1-20250805-v1:0",
        ),
    ],
)
def test_bedrock_model_ids(model: str, region: str, expected: str) -> None:
    assert cloud.bedrock_model(model, region) == expected


def test_vertex_and_mantle_model_ids() -> None:
    assert cloud.vertex_model("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5@20250929"
    assert cloud.vertex_model("claude-opus-4-6") == "claude-opus-4-6"
    assert cloud.vertex_model("claude-haiku-4-5@20251001") == "claude-haiku-4-5@20251001"
    assert cloud.mantle_model("claude-haiku-4-5-20251001") == "anthropic.claude-haiku-4-5"
    assert cloud.mantle_model("anthropic.claude-opus-4-7") == "anthropic.claude-opus-4-7"


# -- what the platforms take ---------------------------------------------------------------


def test_only_the_betas_the_platforms_document_go_with_the_endpoints_own(tmp_path: Path) -> None:
    (endpoint,) = load(
        tmp_path,
        "endpoints: [{provider: bedrock, region: us-east-1, headers: {anthropic-beta: my-beta-1}}]\n",
    ).endpoints
    client = (("anthropic-beta", "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14"),)
    client += (("anthropic-beta", "prompt-caching-scope-2026-01-05"),)
    assert cloud.betas(client, endpoint) == [
        "claude-code-20250219",
        "interleaved-thinking-2025-05-14",
        "my-beta-1",
    ]


def test_first_party_fields_and_cache_scopes_are_dropped() -> None:
    scoped = {"type": "ephemeral", "scope": "global"}
    document = {
        "model": "m",
        "system": [{"type": "text", "text": "s", "cache_control": scoped}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": scoped}]}],
        "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
        "service_tier": "auto",
        "thinking": {"type": "adaptive"},
    }
    shaped = cloud.payload(document, json.dumps(document).encode())
    assert set(shaped) == {"model", "system", "messages", "thinking"}
    assert shaped["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert shaped["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert document["system"][0]["cache_control"] == scoped  # the client's request is left as it was


@pytest.mark.parametrize(
    "name,status,kind,recoverable,credentials",
    [
        ("ThrottlingException", 429, "rate_limit_error", None, False),
        ("ModelTimeoutException", 408, "timeout_error", True, False),
        ("ValidationException", 400, "invalid_request_error", None, False),
        ("AccessDeniedException", 403, "permission_error", None, False),
        ("ExpiredTokenException", 403, "permission_error", None, True),
    ],
)
def test_bedrock_errors_become_anthropics(name, status, kind, recoverable, credentials) -> None:
    headers: Headers = ((b"x-amzn-ErrorType", f"{name}:http://internal.amazon.com/coral/".encode()),)
    headers += ((b"x-amzn-RequestId", b"r-1"), (b"content-length", b"30"))
    error = aws_error(status, headers, b'{"message":"What Bedrock said."}')
    assert json.loads(error.body) == {
        "type": "error",
        "error": {"type": kind, "message": "What Bedrock said."},
    }
    assert (error.status, error.recoverable, error.credentials) == (status, recoverable, credentials)
    assert (b"request-id", b"r-1") in error.headers and (b"content-length", b"30") not in error.headers


def test_vertex_errors_become_anthropics_and_theirs_pass(tmp_path: Path) -> None:
    (endpoint,) = load(tmp_path, "endpoints: [{provider: vertex, region: global, project: p}]\n").endpoints
    vertex = Vertex(endpoint)
    wrapped = b'[{"error": {"code": 429, "message": "Quota exceeded.", "status": "RESOURCE_EXHAUSTED"}}]'
    error = vertex.error(429, (), wrapped)
    assert json.loads(error.body)["error"] == {"type": "rate_limit_error", "message": "Quota exceeded."}
    overloaded = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    assert vertex.error(529, (), overloaded).body == overloaded


# -- Bedrock's event stream ----------------------------------------------------------------


def frame(payload: bytes, headers: dict[str, str]) -> bytes:
    """One event-stream message, as AWS writes it (string headers only)."""
    return typed_frame({name: (7, value.encode()) for name, value in headers.items()}, payload)


def chunk(event: dict) -> bytes:
    data = base64.b64encode(json.dumps(event, separators=(",", ":")).encode()).decode()
    payload = json.dumps({"bytes": data, "p": "abcdefgh"}).encode()
    return frame(
        payload, {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    )


def test_frames_become_events_whatever_the_split() -> None:
    events = [
        {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 3, "output_tokens": 1}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "héllo"}},
        {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 3}},
    ]
    stream = b"".join(chunk(e) for e in events)
    expected = b"".join(
        b"event: %b\ndata: %b\n\n" % (e["type"].encode(), json.dumps(e, separators=(",", ":")).encode())
        for e in events
    )
    for split in range(1, len(stream)):
        translator = EventStreamToSse()
        assert (
            translator.feed(stream[:split]) + translator.feed(stream[split:]) + translator.end() == expected
        )


def test_an_exception_frame_becomes_an_error_event() -> None:
    exception = frame(
        b'{"message":"Too many requests."}',
        {
            ":exception-type": "throttlingException",
            ":content-type": "application/json",
            ":message-type": "exception",
        },
    )
    out = EventStreamToSse().feed(exception)
    assert out.startswith(b"event: error\ndata: ")
    assert json.loads(out.split(b"data: ", 1)[1]) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Too many requests."},
    }


def test_a_corrupt_or_cut_frame_is_refused() -> None:
    frame = chunk({"type": "ping"})
    for at in (2, len(frame) - 6):  # in the prelude, in the payload
        broken = bytearray(frame)
        broken[at] ^= 0xFF
        with pytest.raises(FrameError, match="CRC"):
            EventStreamToSse().feed(bytes(broken))
    translator = EventStreamToSse()
    translator.feed(frame[:-3])
    with pytest.raises(FrameError, match="ended inside a frame"):
        translator.end()


HEADER_VALUES = st.one_of(
    st.tuples(st.sampled_from([0, 1]), st.just(b"")),
    st.tuples(st.just(2), st.binary(min_size=1, max_size=1)),
    st.tuples(st.just(3), st.binary(min_size=2, max_size=2)),
    st.tuples(st.just(4), st.binary(min_size=4, max_size=4)),
    st.tuples(st.sampled_from([5, 8]), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just(9), st.binary(min_size=16, max_size=16)),
    st.tuples(st.just(6), st.binary(max_size=40)),
    st.tuples(st.just(7), st.text(max_size=40).map(str.encode)),
)


def typed_frame(headers: dict[str, tuple[int, bytes]], payload: bytes) -> bytes:
    encoded = b""
    for name, (kind, value) in headers.items():
        encoded += bytes([len(name.encode())]) + name.encode() + bytes([kind])
        encoded += (len(value).to_bytes(2, "big") if kind in (6, 7) else b"") + value
    prelude = struct.pack("!II", 16 + len(encoded) + len(payload), len(encoded))
    prelude += struct.pack("!I", binascii.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack("!I", binascii.crc32(message))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(st.text(min_size=1, max_size=12), HEADER_VALUES, max_size=5),
            st.binary(max_size=64),
        ),
        min_size=1,
        max_size=4,
    ),
    st.data(),
)
def test_frames_are_read_as_botocore_reads_them(frames, data) -> None:
    stream = b"".join(typed_frame(h, p) for h, p in frames)
    expected = EventStreamBuffer()
    expected.add_data(stream)
    theirs = [(m.headers, m.payload) for m in expected]
    cut = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    reader, ours = Frames(), []
    for start, end in zip([0, *cut], [*cut, len(stream)], strict=True):
        ours += reader.feed(stream[start:end])
    assert [p for _, p in ours] == [p for _, p in theirs]
    for (mine, _), (botos, _) in zip(ours, theirs, strict=True):
        assert set(mine) == set(botos)
        for name, value in botos.items():  # strings alike; other types, their bytes
            if isinstance(value, str):
                assert mine[name] == value


def test_a_config_without_cloud_endpoints_loads_none_of_their_libraries(tmp_path: Path) -> None:
    # what keeps such a proxy's memory as it was: botocore and google-auth are not imported
    import subprocess
    import sys

    from .conftest import ROOT

    script = (
        "import sys\n"
        "from addon.proxy import Fallback\n"
        "from addon.config import load_config\n"
        "from addon.providers import for_endpoint\n"
        "from addon.ops.checks import check\n"
        f"config = load_config({str(tmp_path / 'c.yaml')!r}, {{}})\n"
        "[for_endpoint(e) for e in config.endpoints]\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'botocore', 'google', 'boto3'}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('addon.fakes')))\n"
    )
    (tmp_path / "c.yaml").write_text("endpoints: [{name: a, baseUrl: 'http://127.0.0.1:9'}]\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[]", "[]"]  # no platform library, no fake


def test_a_body_that_is_not_a_json_object_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    text = (
        "endpoints:\n"
        "  - {name: b, provider: bedrock, region: us-east-1, apiKey: k}\n"
        "  - {name: v, provider: vertex, region: global, project: p}\n"
        "  - {name: o, provider: openai, baseUrl: 'http://127.0.0.1:9/v1', apiKey: k, models: {'*': m}}\n"
    )
    request = ClientRequest.parse("POST", "/v1/messages", [("content-type", "application/json")], b"[1]")
    for endpoint in load(tmp_path, text).endpoints:
        with pytest.raises(Untranslatable, match="not a JSON object"):
            for_endpoint(endpoint).outgoing(request)


def test_mantle_forwards_the_client_headers_as_anthropic_endpoints_do(tmp_path: Path) -> None:
    text = (
        "endpoints:\n"
        "  - {name: m, provider: bedrock-mantle, region: us-east-1, apiKey: k, headers: {x-team: ours}}\n"
    )
    (endpoint,) = load(tmp_path, text).endpoints
    client = [("content-type", "application/json"), ("x-team", "theirs"), ("connection", "x-hop")]
    client += [("x-hop", "1"), ("x-api-key", "client-key"), ("anthropic-version", "2023-06-01")]
    request = ClientRequest.parse("POST", "/v1/messages", client, b'{"model":"claude-sonnet-4-5"}')
    sent = for_endpoint(endpoint).outgoing(request).headers
    overridden_or_hop = ("x-team", "x-hop", "x-api-key", "connection")
    assert [(n, v) for n, v in sent if n in overridden_or_hop] == [("x-team", "ours")]
    assert ("anthropic-version", "2023-06-01") in sent and ("authorization", "Bearer k") in sent


def test_mid_conversation_system_turns_become_reminders_in_user_turns() -> None:
    turns = [
        {"role": "system", "content": "first"},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "second"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": "third"},
    ]
    folded = cloud.without_system_turns(turns)
    assert [m["role"] for m in folded] == ["user", "assistant", "user"]
    texts = [[b["text"] for b in m["content"]] if m["role"] == "user" else m["content"] for m in folded]
    reminder = "<system-reminder>\n{}\n</system-reminder>".format
    assert texts == [[reminder("first"), "hi", reminder("second")], "hello", [reminder("third")]]
    assert turns[1] == {"role": "user", "content": "hi"}  # the client's request is left as it was
