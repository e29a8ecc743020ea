"""Self-tests for the cloud platform fakes (addon/fakes/cloud.py), held to the anthropic SDK's own
Bedrock, Bedrock Mantle and Vertex clients, botocore's signer and event-stream parser, and
google-auth's service-account credentials."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("botocore", reason="the Bedrock fakes need botocore (anthropic[bedrock])")
pytest.importorskip("google.auth", reason="the Vertex fake's tests need google-auth (anthropic[vertex])")
pytest.importorskip("cryptography", reason="the Vertex fake needs cryptography")

import anthropic
import httpx
from anthropic.lib.bedrock import AnthropicBedrock, AnthropicBedrockMantle
from anthropic.lib.vertex import AnthropicVertex
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth.exceptions import RefreshError
from google.oauth2 import service_account

from addon.fakes.anthropic import Behavior, SeenRequest
from addon.fakes.cloud import (
    API_VERSIONS,
    BEDROCK_VERSION,
    CLOUD_PLATFORM_SCOPE,
    VERTEX_VERSION,
    CloudRequest,
    FakeBedrock,
    FakeBedrockMantle,
    FakeVertex,
    chunk_frame,
    event_frame,
    exception_frame,
    verify_sigv4,
)

from .conftest import CUT_STREAM_ERRORS, ROOT, clean_env, wait_until

ACCESS_KEY = "AKIATESTFAKECLOUD001"
SECRET_KEY = "test/FAKECLOUD/secret/00000000000000001"
API_KEY = "ABSKtest-FAKECLOUD-API-KEY-000000000001"
REGION = "eu-west-3"
BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_MODEL = "claude-sonnet-4-5@20250929"
TEXT = "Hello from the fake."
STREAM_NAMES = ["message_start", "content_block_start", "ping"]
STREAM_NAMES += ["content_block_delta"] * 4
STREAM_NAMES += ["content_block_stop", "message_delta", "message_stop"]


def message(model: str) -> dict[str, Any]:
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def no_platform_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK clients read credentials, regions and base URLs from the environment.
    for name in os.environ:
        if name.startswith(("AWS_", "ANTHROPIC_", "GOOGLE_", "CLOUD_ML_")):
            monkeypatch.delenv(name)


# -- the event-stream encoder ------------------------------------------------------------


def parse_frames(data: bytes) -> list[Any]:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return list(buffer)


def test_event_frame_parses_with_botocore_and_its_crcs_are_checked() -> None:
    frame = event_frame([(":event-type", "chunk"), ("x-é", "välue")], b'{"a":1}')
    (parsed,) = parse_frames(frame)
    assert parsed.headers == {":event-type": "chunk", "x-é": "välue"}
    assert parsed.payload == b'{"a":1}'
    assert [m.payload for m in parse_frames(frame * 3)] == [b'{"a":1}'] * 3
    for spot in (9, len(frame) - 6):  # in the prelude, in the payload
        broken = bytearray(frame)
        broken[spot] ^= 1
        with pytest.raises(ChecksumMismatch):
            parse_frames(bytes(broken))


def test_chunk_and_exception_frames_as_bedrock_sends_them() -> None:
    event = b'{"type":"message_stop"}'
    (chunk,) = parse_frames(chunk_frame(event))
    assert chunk.to_response_dict()["status_code"] == 200
    assert chunk.headers == {
        ":event-type": "chunk",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    payload = json.loads(chunk.payload)
    assert base64.b64decode(payload["bytes"]) == event
    assert payload["p"]
    (error,) = parse_frames(exception_frame("modelStreamErrorException"))
    assert error.to_response_dict()["status_code"] == 400
    assert error.headers[":exception-type"] == "modelStreamErrorException"
    assert error.headers[":message-type"] == "exception"
    assert json.loads(error.payload)["message"]
    with pytest.raises(ValueError, match="unknown Bedrock stream exception"):
        exception_frame("overloadedException")


# -- SigV4, recomputed --------------------------------------------------------------------


def signed(
    service: str = "bedrock",
    region: str = REGION,
    key: str = ACCESS_KEY,
    secret: str = SECRET_KEY,
    token: str | None = None,
) -> SeenRequest:
    """A request signed by botocore, as the fake would receive it."""
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31"}).encode()
    headers = {"host": "127.0.0.1:9", "content-type": "application/json"}
    request = AWSRequest("POST", f"http://127.0.0.1:9/model/{BEDROCK_MODEL}/invoke", headers, body)
    SigV4Auth(Credentials(key, secret, token), service, region).add_auth(request)
    received = [(name.lower(), value) for name, value in request.headers.items()]
    return SeenRequest("POST", f"/model/{BEDROCK_MODEL}/invoke", received, body, 0.0)


def refusal(seen: SeenRequest, token: str | None = None, now: float | None = None) -> str | None:
    result = verify_sigv4(seen, "bedrock", REGION, {ACCESS_KEY: (SECRET_KEY, token)}, now)
    return None if result is None else f"{result[0]}: {result[1]}"


def tampered(seen: SeenRequest, name: str, value: str) -> SeenRequest:
    headers = [(n, value if n == name else v) for n, v in seen.headers]
    return SeenRequest(seen.method, seen.path, headers, seen.body, seen.time)


@pytest.mark.parametrize(
    ("request_", "token", "expected"),
    [
        (lambda: signed(), None, None),
        (lambda: signed(token="tok"), "tok", None),
        (lambda: signed(secret="wrong"), None, "InvalidSignatureException: The request signature we calc"),
        (lambda: signed(key="AKIAOTHER"), None, "UnrecognizedClientException: The security token"),
        (lambda: signed(), "tok", "UnrecognizedClientException"),
        (lambda: signed(token="other"), "tok", "UnrecognizedClientException"),
        (lambda: signed(service="bedrock-mantle"), None, "InvalidSignatureException: Credential should be"),
        (lambda: signed(region="us-east-1"), None, "InvalidSignatureException: Credential should be"),
        (lambda: tampered(signed(), "content-type", "text/plain"), None, "InvalidSignatureException"),
        (
            lambda: tampered(signed(), "x-amz-date", "20200101T000000Z"),
            None,
            "InvalidSignatureException: Sig",
        ),
        (lambda: tampered(signed(), "authorization", "AWS4-HMAC-SHA256 x"), None, "IncompleteSignature"),
        (lambda: SeenRequest("POST", "/", [], b"", 0.0), None, "MissingAuthenticationTokenException"),
    ],
)
def test_sigv4_is_recomputed_from_the_request_as_received(
    request_: Callable[[], SeenRequest], token: str | None, expected: str | None
) -> None:
    result = refusal(request_(), token)
    if expected is None:
        assert result is None
    else:
        assert result is not None and result.startswith(expected), result


def test_sigv4_body_and_clock_are_checked() -> None:
    seen = signed()
    changed = SeenRequest(seen.method, seen.path, seen.headers, seen.body + b" ", seen.time)
    assert (refusal(changed) or "").startswith("InvalidSignatureException: The request signature")
    assert (refusal(seen, now=time.time() + 301) or "").startswith(
        "InvalidSignatureException: Signature expired"
    )
    assert "not yet current" in (refusal(seen, now=time.time() - 301) or "")
    assert refusal(seen, now=time.time() + 250) is None


# -- Bedrock ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bedrock_server() -> Iterator[FakeBedrock]:
    fake = FakeBedrock(region=REGION, aws_access_key=ACCESS_KEY, aws_secret_key=SECRET_KEY, api_key=API_KEY)
    with fake:
        yield fake


@pytest.fixture
def bedrock(bedrock_server: FakeBedrock) -> FakeBedrock:
    bedrock_server.reset()
    return bedrock_server


def bedrock_client(fake: FakeBedrock, **credentials: Any) -> AnthropicBedrock:
    credentials = credentials or {"aws_access_key": ACCESS_KEY, "aws_secret_key": SECRET_KEY}
    return AnthropicBedrock(aws_region=REGION, base_url=fake.url, max_retries=0, **credentials)


def last(fake: FakeBedrock | FakeBedrockMantle | FakeVertex, n: int = 1) -> CloudRequest:
    seen = fake.wait_for_requests(n)[-1]
    assert isinstance(seen, CloudRequest)
    return seen


def test_bedrock_invoke_with_sigv4(bedrock: FakeBedrock) -> None:
    client = bedrock_client(bedrock)
    raw = client.messages.with_raw_response.create(
        **message(BEDROCK_MODEL), extra_headers={"anthropic-beta": "beta-one,beta-two"}
    )
    assert raw.parse().content[0].text == TEXT
    assert raw.headers["x-amzn-requestid"]
    seen = last(bedrock)
    assert (seen.path, seen.model, seen.auth) == (f"/model/{BEDROCK_MODEL}/invoke", BEDROCK_MODEL, "sigv4")
    assert seen.json()["anthropic_version"] in (BEDROCK_VERSION, *API_VERSIONS)  # anthropic 2.x: its own
    assert seen.anthropic_beta == ["beta-one", "beta-two"]
    assert "model" not in seen.json() and "stream" not in seen.json()


def test_bedrock_streams_both_ways(bedrock: FakeBedrock) -> None:
    client = bedrock_client(bedrock)
    beta = client.beta.messages
    with beta.stream(**message(BEDROCK_MODEL), betas=["beta-three"]) as stream:  # type: ignore[misc]
        assert "".join(stream.text_stream) == TEXT
        assert stream.get_final_message().usage.output_tokens == 4
    seen = last(bedrock)
    assert seen.path == f"/model/{BEDROCK_MODEL}/invoke-with-response-stream"
    assert seen.anthropic_beta == ["beta-three"]
    events = list(client.messages.create(**message(BEDROCK_MODEL), stream=True))
    assert [e.type for e in events] == [n for n in STREAM_NAMES if n != "ping"]  # the SDK drops pings
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == TEXT  # type: ignore[union-attr]
    assert bedrock.request_count == 2


def read_chunked(port: int, path: str, body: bytes) -> tuple[bytes, list[bytes]]:
    """POST with the API key; the response head and its body's HTTP chunks, one by one."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {API_KEY}\r\n"
        sock.sendall(f"{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    chunks: list[bytes] = []
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            return head_bytes, chunks
        chunks.append(rest[: int(size, 16)])
        rest = rest[int(size, 16) + 2 :]


def test_bedrock_writes_one_frame_per_chunk_and_metrics_last(bedrock: FakeBedrock) -> None:
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 16, "messages": []}
    path = f"/model/{BEDROCK_MODEL}/invoke-with-response-stream"
    head, chunks = read_chunked(bedrock.port, path, json.dumps(body).encode())
    assert b"content-type: application/vnd.amazon.eventstream" in head
    events = []
    for chunk in chunks:
        (frame,) = parse_frames(chunk)
        events.append(json.loads(base64.b64decode(json.loads(frame.payload)["bytes"])))
    assert [e["type"] for e in events] == STREAM_NAMES
    metrics = events[-1]["amazon-bedrock-invocationMetrics"]
    assert metrics["outputTokenCount"] == 4 and metrics["inputTokenCount"] == 10
    assert last(bedrock).auth == "bearer"


@pytest.mark.parametrize(
    ("credentials", "error_type"),
    [
        ({"aws_access_key": ACCESS_KEY, "aws_secret_key": "wrong"}, "InvalidSignatureException"),
        ({"aws_access_key": "AKIAUNKNOWN", "aws_secret_key": SECRET_KEY}, "UnrecognizedClientException"),
        ({"api_key": "ABSKwrong"}, "UnrecognizedClientException"),
    ],
)
def test_bedrock_refuses_bad_credentials(
    bedrock: FakeBedrock, credentials: dict[str, str], error_type: str
) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        bedrock_client(bedrock, **credentials).messages.create(**message(BEDROCK_MODEL))
    assert caught.value.response.headers["x-amzn-errortype"].startswith(
        f"{error_type}:http://internal.amazon"
    )
    assert last(bedrock).refusal == (error_type, caught.value.body["message"])  # type: ignore[index]
    assert bedrock.auth_failures == 1


def test_bedrock_refuses_a_request_without_auth_and_a_signature_for_another_region(
    bedrock: FakeBedrock,
) -> None:
    response = httpx.post(f"{bedrock.url}/model/m/invoke", json={})
    assert (response.status_code, response.json()) == (403, {"message": "Missing Authentication Token"})
    client = AnthropicBedrock(
        aws_access_key=ACCESS_KEY, aws_secret_key=SECRET_KEY, aws_region="us-east-1", base_url=bedrock.url
    )
    with pytest.raises(anthropic.PermissionDeniedError, match="scoped to a valid region"):
        client.with_options(max_retries=0).messages.create(**message(BEDROCK_MODEL))
    assert bedrock.auth_failures == 2


def test_bedrock_api_key_needs_no_aws_credentials(bedrock: FakeBedrock) -> None:
    client = bedrock_client(bedrock, api_key=API_KEY)
    assert client.messages.create(**message(BEDROCK_MODEL)).content[0].text == TEXT
    assert last(bedrock).header("authorization") == f"Bearer {API_KEY}"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            {"model": "m", "anthropic_version": "bedrock-2023-05-31"},
            "extraneous key [model] is not permitted",
        ),
        (
            {"stream": True, "anthropic_version": "bedrock-2023-05-31"},
            "extraneous key [stream] is not permitted",
        ),
        ({}, "required key [anthropic_version] not found"),
        ({"anthropic_version": "bedrock-2023-01-01"}, "is not a valid enum value"),
    ],
)
def test_bedrock_validates_the_body(bedrock: FakeBedrock, body: dict[str, Any], problem: str) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{bedrock.url}/model/{BEDROCK_MODEL}/invoke", json=body, headers=headers)
    assert response.status_code == 400
    assert response.headers["x-amzn-errortype"].startswith("ValidationException:")
    assert problem in response.json()["message"]


def test_bedrock_status_errors_are_bedrock_exceptions(bedrock: FakeBedrock) -> None:
    client = bedrock_client(bedrock)
    bedrock.behavior = Behavior("status", 429)
    with pytest.raises(anthropic.RateLimitError, match="Too many requests") as throttled:
        client.messages.create(**message(BEDROCK_MODEL))
    assert throttled.value.response.headers["x-amzn-errortype"].startswith("ThrottlingException:")
    bedrock.status_errors[429] = "ModelNotReadyException"
    with pytest.raises(anthropic.RateLimitError, match="not ready") as not_ready:
        client.messages.create(**message(BEDROCK_MODEL))
    assert not_ready.value.response.headers["x-amzn-errortype"].startswith("ModelNotReadyException:")
    bedrock.behavior = Behavior("status", 503, headers=(("retry-after", "3"),))
    with pytest.raises(anthropic.ServiceUnavailableError, match="Bedrock is unable") as unavailable:
        client.messages.create(**message(BEDROCK_MODEL))
    assert unavailable.value.response.headers["retry-after"] == "3"


@pytest.mark.parametrize("kind", ["sse_error_first", "sse_error_after_preamble", "sse_error_after"])
def test_bedrock_stream_errors_are_exception_frames(bedrock: FakeBedrock, kind: str) -> None:
    bedrock.behavior = Behavior(kind, after_events=5)
    bedrock.stream_exception = "modelStreamErrorException"
    seen: list[str] = []
    # anthropic 0.x raises a ValueError for an exception frame, 2.x an APIStatusError
    with pytest.raises((ValueError, anthropic.APIStatusError), match="modelStreamErrorException"):
        for event in bedrock_client(bedrock).messages.create(**message(BEDROCK_MODEL), stream=True):
            seen.append(event.type)
    expected = {"sse_error_first": 0, "sse_error_after_preamble": 2, "sse_error_after": 4}[kind]
    assert len(seen) == expected


@pytest.mark.parametrize("kind", ["cut", "close_mid_stream"])
def test_bedrock_broken_streams_break_between_frames(bedrock: FakeBedrock, kind: str) -> None:
    bedrock.behavior = Behavior(kind, after_events=4)
    with pytest.raises(CUT_STREAM_ERRORS):
        list(bedrock_client(bedrock).messages.create(**message(BEDROCK_MODEL), stream=True))
    assert bedrock.events_sent == 4


# -- Bedrock Mantle -----------------------------------------------------------------------


def test_mantle_with_sigv4_and_with_an_api_key() -> None:
    fake = FakeBedrockMantle(
        region=REGION, aws_access_key=ACCESS_KEY, aws_secret_key=SECRET_KEY, api_key=API_KEY
    )
    with fake:
        signing = AnthropicBedrockMantle(
            aws_access_key=ACCESS_KEY, aws_secret_key=SECRET_KEY, aws_region=REGION, base_url=fake.base_url
        )
        assert signing.messages.create(**message("anthropic.claude-haiku-4-5")).content[0].text == TEXT
        seen = last(fake)
        assert (seen.path, seen.auth, seen.json()["model"]) == (
            "/anthropic/v1/messages",
            "sigv4",
            "anthropic.claude-haiku-4-5",
        )
        keyed = AnthropicBedrockMantle(api_key=API_KEY, aws_region=REGION, base_url=fake.base_url)
        with keyed.messages.stream(**message("anthropic.claude-haiku-4-5")) as stream:
            assert "".join(stream.text_stream) == TEXT
        assert last(fake, 2).auth == "bearer"
        wrong = AnthropicBedrockMantle(
            aws_access_key=ACCESS_KEY,
            aws_secret_key="wrong",
            aws_region=REGION,
            base_url=fake.base_url,
            max_retries=0,
        )
        with pytest.raises(anthropic.PermissionDeniedError):
            wrong.messages.create(**message("anthropic.claude-haiku-4-5"))
        fake.behavior = Behavior("status", 529)
        with pytest.raises(anthropic.OverloadedError):
            keyed.with_options(max_retries=0).messages.create(**message("anthropic.claude-haiku-4-5"))
        assert (fake.auth_failures, fake.request_count) == (1, 4)


# -- Vertex -------------------------------------------------------------------------------


def google_request() -> Any:
    """The transport google-auth refreshes through: requests, or urllib3 where it is missing."""
    try:
        from google.auth.transport.requests import Request

        return Request()
    except ImportError:
        import urllib3
        from google.auth.transport.urllib3 import Request as Urllib3Request

        return Urllib3Request(urllib3.PoolManager())


@pytest.fixture(autouse=True)
def sdk_refreshes_without_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK refreshes Google credentials through `requests` (anthropic[vertex] brings it);
    # where it is missing, the same refresh goes through urllib3.
    try:
        import google.auth.transport.requests  # noqa: F401
    except ImportError:
        monkeypatch.setattr(
            "anthropic.lib._extras._google_auth._request", lambda extra="vertex": google_request()
        )


@pytest.fixture(scope="module")
def vertex_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeVertex, Path]]:
    with FakeVertex(project="fake-project", region="us-east5") as fake:
        yield fake, fake.write_key_file(tmp_path_factory.mktemp("vertex") / "key.json")


@pytest.fixture
def vertex(vertex_server: tuple[FakeVertex, Path]) -> FakeVertex:
    fake = vertex_server[0]
    fake.reset()
    fake.token_lifetime = 3600
    fake.expire_tokens()
    return fake


@pytest.fixture
def credentials(vertex_server: tuple[FakeVertex, Path]) -> service_account.Credentials:
    return service_account.Credentials.from_service_account_file(
        str(vertex_server[1]), scopes=[CLOUD_PLATFORM_SCOPE]
    )


def vertex_client(fake: FakeVertex, credentials: service_account.Credentials) -> AnthropicVertex:
    return AnthropicVertex(
        region=fake.region,
        project_id=fake.project,
        credentials=credentials,
        base_url=fake.base_url,
        max_retries=0,
    )


def test_vertex_raw_predict_stream_and_count_tokens_on_one_token(
    vertex: FakeVertex, credentials: service_account.Credentials
) -> None:
    client = vertex_client(vertex, credentials)
    assert client.messages.create(**message(VERTEX_MODEL)).content[0].text == TEXT
    prefix = "/v1/projects/fake-project/locations/us-east5/publishers/anthropic/models"
    seen = last(vertex)
    assert (seen.path, seen.model, seen.auth) == (
        f"{prefix}/{VERTEX_MODEL}:rawPredict",
        VERTEX_MODEL,
        "oauth",
    )
    assert seen.json()["anthropic_version"] in (VERTEX_VERSION, *API_VERSIONS) and "model" not in seen.json()
    with client.messages.stream(**message(VERTEX_MODEL)) as stream:
        assert "".join(stream.text_stream) == TEXT
    seen = last(vertex, 2)
    assert (seen.path, seen.json()["stream"]) == (f"{prefix}/{VERTEX_MODEL}:streamRawPredict", True)
    count = client.messages.count_tokens(model=VERTEX_MODEL, messages=message(VERTEX_MODEL)["messages"])
    assert count.input_tokens == 42
    seen = last(vertex, 3)
    assert (seen.path, seen.model) == (f"{prefix}/count-tokens:rawPredict", VERTEX_MODEL)
    assert (vertex.token_requests, vertex.request_count) == (1, 3)


def test_vertex_short_lived_token_is_refreshed(
    vertex: FakeVertex, credentials: service_account.Credentials
) -> None:
    # google-auth refreshes once fewer than 225 s are left: a 226 s token is stale after 1 s.
    vertex.token_lifetime = 226
    client = vertex_client(vertex, credentials)
    client.messages.create(**message(VERTEX_MODEL))
    first = last(vertex).header("authorization")
    wait_until(lambda: credentials.expired, 5, "the client to find its token stale")
    client.messages.create(**message(VERTEX_MODEL))
    assert vertex.token_requests == 2
    assert last(vertex, 2).header("authorization") != first


def test_vertex_token_expired_server_side_is_401(
    vertex: FakeVertex, credentials: service_account.Credentials
) -> None:
    client = vertex_client(vertex, credentials)
    client.messages.create(**message(VERTEX_MODEL))
    vertex.expire_tokens()
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(**message(VERTEX_MODEL))
    assert caught.value.body["error"]["status"] == "UNAUTHENTICATED"  # type: ignore[index]
    assert caught.value.response.headers["www-authenticate"].startswith("Bearer")
    assert (vertex.auth_failures, vertex.token_requests) == (1, 1)


def test_vertex_refuses_a_key_it_did_not_issue(
    vertex: FakeVertex, vertex_server: tuple[FakeVertex, Path]
) -> None:
    info = json.loads(vertex_server[1].read_text())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info["private_key"] = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    tampered_key = service_account.Credentials.from_service_account_info(info, scopes=[CLOUD_PLATFORM_SCOPE])
    with pytest.raises(RefreshError, match="invalid_grant: Invalid JWT Signature"):
        vertex_client(vertex, tampered_key).messages.create(**message(VERTEX_MODEL))
    unscoped = service_account.Credentials.from_service_account_file(str(vertex_server[1]))
    with pytest.raises(RefreshError, match="invalid_scope"):
        unscoped.refresh(google_request())
    assert (vertex.token_requests, vertex.request_count) == (2, 0)


@pytest.mark.parametrize(
    ("path", "body", "status", "problem"),
    [
        (f"{VERTEX_MODEL}:rawPredict?beta=true", {}, 400, 'Unknown name "beta"'),
        (f"{VERTEX_MODEL}:rawPredict", {"model": VERTEX_MODEL}, 400, "model"),
        (f"{VERTEX_MODEL}:streamRawPredict", {}, 400, '"stream": true'),
        (f"{VERTEX_MODEL}:rawPredict", {"anthropic_version": "bedrock-2023-05-31"}, 400, "anthropic_version"),
        (f"{VERTEX_MODEL}:predict", {}, 404, "not found"),
    ],
)
def test_vertex_refuses_what_vertex_refuses(
    vertex: FakeVertex,
    credentials: service_account.Credentials,
    path: str,
    body: dict[str, Any],
    status: int,
    problem: str,
) -> None:
    credentials.refresh(google_request())
    body = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 16, "messages": [], **body}
    url = f"{vertex.base_url}/projects/fake-project/locations/us-east5/publishers/anthropic/models/{path}"
    response = httpx.post(url, json=body, headers={"authorization": f"Bearer {credentials.token}"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["status"] in ("INVALID_ARGUMENT", "NOT_FOUND")
    assert problem in error["message"]


def test_vertex_other_project_or_region_is_not_found(
    vertex: FakeVertex, credentials: service_account.Credentials
) -> None:
    for project, region in (("other-project", vertex.region), (vertex.project, "europe-west1")):
        client = AnthropicVertex(
            region=region,
            project_id=project,
            credentials=credentials,
            base_url=vertex.base_url,
            max_retries=0,
        )
        with pytest.raises(anthropic.NotFoundError) as caught:
            client.messages.create(**message(VERTEX_MODEL))
        assert caught.value.body["error"]["status"] == "NOT_FOUND"  # type: ignore[index]


@pytest.mark.parametrize(
    ("status", "error", "shape"),
    [
        (429, anthropic.RateLimitError, "RESOURCE_EXHAUSTED"),
        (503, anthropic.ServiceUnavailableError, "UNAVAILABLE"),
        (403, anthropic.PermissionDeniedError, "PERMISSION_DENIED"),
        (529, anthropic.InternalServerError, "overloaded_error"),
    ],
)
def test_vertex_status_errors(
    vertex: FakeVertex,
    credentials: service_account.Credentials,
    status: int,
    error: type[Exception],
    shape: str,
) -> None:
    vertex.behavior = Behavior("status", status)
    with pytest.raises(error) as caught:
        vertex_client(vertex, credentials).messages.create(**message(VERTEX_MODEL))
    body = caught.value.body  # type: ignore[attr-defined]
    assert (body["error"]["type"] if status == 529 else body["error"]["status"]) == shape


def test_vertex_stream_kinds_keep_their_meaning(
    vertex: FakeVertex, credentials: service_account.Credentials
) -> None:
    vertex.script = [Behavior("sse_error_after_preamble")]
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        list(vertex_client(vertex, credentials).messages.create(**message(VERTEX_MODEL), stream=True))
    assert vertex.token_requests == 1  # the token request did not use up the script


# -- command line -------------------------------------------------------------------------


def start_cli(*args: str, last: str) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """Run the command line; what it printed, up to its `last` note, by name."""
    process = subprocess.Popen(
        [sys.executable, "-m", "addon.fakes.cloud", *args],
        stdout=subprocess.PIPE,
        env=clean_env(ROOT),
        cwd=ROOT,
    )
    assert process.stdout is not None
    text, deadline = b"", time.monotonic() + 10
    while f"\n{last}: ".encode() not in text or not text.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0 and select.select([process.stdout], [], [], remaining)[0], f"no notes: {text!r}"
        chunk = os.read(process.stdout.fileno(), 4096)
        assert chunk, f"exited with {process.wait()}: {text!r}"
        text += chunk
    lines = text.decode().splitlines()
    notes = dict(line.split(": ", 1) for line in lines[1:])
    notes["url"] = lines[0].removeprefix("listening on ")
    return process, notes


def stop_cli(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    assert process.wait(10) == 0


def test_cli_bedrock_and_vertex(tmp_path: Path) -> None:
    process, notes = start_cli("bedrock", "--region", REGION, last="api_key")
    try:
        bedrock = AnthropicBedrock(
            aws_access_key=notes["aws_access_key"],
            aws_secret_key=notes["aws_secret_key"],
            aws_region=notes["region"],
            base_url=notes["base_url"],
            max_retries=0,
        )
        assert bedrock.messages.create(**message(BEDROCK_MODEL)).content[0].text == TEXT
    finally:
        stop_cli(process)
    process, notes = start_cli(
        "vertex",
        "--key-file",
        str(tmp_path / "key.json"),
        "--kind",
        "status",
        "--status",
        "429",
        last="key_file",
    )
    try:
        credentials = service_account.Credentials.from_service_account_file(
            notes["key_file"], scopes=[CLOUD_PLATFORM_SCOPE]
        )
        vertex = AnthropicVertex(
            region=notes["region"],
            project_id=notes["project"],
            credentials=credentials,
            base_url=notes["base_url"],
            max_retries=0,
        )
        with pytest.raises(anthropic.RateLimitError):
            vertex.messages.create(**message(VERTEX_MODEL))
    finally:
        stop_cli(process)
