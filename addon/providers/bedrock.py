"""Claude on AWS Bedrock: the runtime's InvokeModel API, and Bedrock Mantle.

The runtime: `POST /model/{id}/invoke-with-response-stream` (or `/invoke`); the body
loses `model` and `stream` and gains `anthropic_version` and the client's betas as
`anthropic_beta`. A stream comes back as AWS event-stream frames, each `chunk` carrying
one Anthropic event, and each frame becomes that event as server-sent text as soon as it
arrives (eventstream.py reads the frames); an exception frame becomes an `error` event,
so that before content it fails over like any other. Mantle is Anthropic's Messages API
itself, under `/anthropic`. Both sign with SigV4 (botocore, with the AWS credential
chain) or send a Bedrock API key as a bearer token. The anthropic SDK's
`AnthropicBedrock` and `AnthropicBedrockMantle` are the reference for all of it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import BotoCoreError
from botocore.session import Session

from ..config import Endpoint
from ..sse import error_body, error_type
from . import (
    MESSAGES,
    CredentialsError,
    Headers,
    InThread,
    Outgoing,
    PlatformError,
    Provider,
    Reply,
    cloud,
    compact_json,
    content_type,
    header_value,
    is_anthropic_error,
    json_headers,
    posted_to,
    retry_after,
)
from .anthropic import client_headers
from .eventstream import FrameError, Frames

if TYPE_CHECKING:
    from ..request import ClientRequest

VERSION = "bedrock-2023-05-31"
EVENT_STREAM = "application/vnd.amazon.eventstream"
LOOKED_FOR = (
    "looked for AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the profile {profile} in "
    "~/.aws/credentials and ~/.aws/config (keys, SSO, assume-role, credential_process), web "
    "identity, and container and instance roles; or give the endpoint an apiKey (a Bedrock API key)"
)
# Bedrock's errors (their `x-amzn-ErrorType`, or an exception frame's type, lower-camel in
# streams): the Anthropic error type they become, and whether another endpoint may do better.
ERRORS: dict[str, tuple[str, bool | None]] = {
    "ThrottlingException": ("rate_limit_error", None),
    "ModelNotReadyException": ("overloaded_error", True),
    "ServiceUnavailableException": ("overloaded_error", None),
    "InternalServerException": ("api_error", None),
    "ModelStreamErrorException": ("api_error", True),
    "ModelErrorException": ("api_error", True),
    "ModelTimeoutException": ("timeout_error", True),
    "ServiceQuotaExceededException": ("rate_limit_error", True),
    "ValidationException": ("invalid_request_error", None),
    "AccessDeniedException": ("permission_error", None),
    "ResourceNotFoundException": ("not_found_error", None),
}
# The proxy's own credentials refused: no answer will come from this endpoint until they change.
CREDENTIALS_REFUSED = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignatureException",
        "MissingAuthenticationTokenException",
        "ExpiredTokenException",
        "InvalidClientTokenId",
    }
)


class AwsSigner:
    """SigV4 with the AWS default credential chain, found once and refreshed before expiry.

    Finding and refreshing credentials may do I/O (SSO, STS, instance metadata), so both
    run in a thread; signing itself is a few HMACs, done on the loop.
    """

    def __init__(self, service: str, region: str, profile: str | None) -> None:
        self.service, self.region, self.profile = service, region, profile
        self.credentials: Any = None
        self.finding = InThread(self._find)

    async def find(self) -> str:
        self.credentials = await self.finding()
        return f"AWS credentials ({self.credentials.method}), SigV4 for {self.service} in {self.region}"

    def _find(self) -> Any:
        try:
            credentials = Session(profile=self.profile).get_credentials()
        except BotoCoreError as e:
            raise CredentialsError(f"AWS credentials: {e}") from None
        if credentials is None:
            profile = self.profile or "named by AWS_PROFILE (else default)"
            raise CredentialsError("no AWS credentials found: " + LOOKED_FOR.format(profile=profile))
        return credentials

    async def sign(self, outgoing: Outgoing) -> Outgoing:
        if self.credentials is None:
            await self.find()
        credentials = self.credentials
        try:
            if isinstance(credentials, RefreshableCredentials) and credentials.refresh_needed():
                frozen = await asyncio.to_thread(credentials.get_frozen_credentials)
            else:
                frozen = credentials.get_frozen_credentials()
        except BotoCoreError as e:
            raise CredentialsError(f"AWS credentials could not be refreshed: {e}") from None
        request = AWSRequest(outgoing.method, outgoing.url, dict(outgoing.headers), outgoing.body)
        SigV4Auth(frozen, self.service, self.region).add_auth(request)
        return replace(outgoing, headers=list(request.headers.items()))


class Bedrock(Provider):
    """Bedrock's runtime: InvokeModel and InvokeModelWithResponseStream."""

    name = "bedrock"
    service = "bedrock"
    reads_errors = True

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        assert endpoint.region is not None  # config.py fills it in or refuses the endpoint
        self.region = endpoint.region
        self.signer = None if endpoint.api_key else AwsSigner(self.service, self.region, endpoint.aws_profile)

    @property
    def own_credentials(self) -> bool:
        return True  # an API key or a role's, never the client's

    def declines(self, request: ClientRequest) -> str | None:
        return None if posted_to(request, MESSAGES) else "Bedrock's runtime serves Messages only"

    def model(self, model: str) -> str:
        return self.endpoint.mapped_model(model) or cloud.bedrock_model(model, self.region)

    def outgoing(self, request: ClientRequest) -> Outgoing:
        body = cloud.shaped(request)
        model = self.model(str(body.pop("model", "")))
        action = "invoke-with-response-stream" if body.pop("stream", False) else "invoke"
        body.setdefault("anthropic_version", VERSION)
        if betas := cloud.betas(request.headers, self.endpoint):
            body.setdefault("anthropic_beta", betas)
        headers = [("content-type", "application/json")]
        headers.append(("accept", EVENT_STREAM if action != "invoke" else "application/json"))
        url = f"{self.endpoint.base_url}/model/{quote(model, safe=':')}/{action}"
        return Outgoing("POST", url, self.auth_headers(headers), compact_json(body))

    def auth_headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The endpoint's extra headers, and its API key as a bearer token when it has one."""
        headers += cloud.extra_headers(self.endpoint)
        if self.endpoint.api_key:
            headers.append(("authorization", f"Bearer {self.endpoint.api_key}"))
        return headers

    async def authenticate(self, outgoing: Outgoing) -> Outgoing:
        return outgoing if self.signer is None else await self.signer.sign(outgoing)

    async def prepare(self) -> str:
        if self.signer is None:
            return "a Bedrock API key, sent as a bearer token"
        return await self.signer.find()

    def reply(self, headers: Headers, request: ClientRequest) -> Reply:
        if content_type(headers) != EVENT_STREAM:
            return Reply(headers)
        sse = (*json_headers(headers, b"text/event-stream"), (b"cache-control", b"no-cache"))
        return Reply((*sse, *_request_id(headers)), EventStreamToSse())

    def error(self, status: int, headers: Headers, body: bytes) -> PlatformError:
        return aws_error(status, headers, body)


class BedrockMantle(Bedrock):
    """Bedrock Mantle: Anthropic's Messages API on AWS, signed for `bedrock-mantle`."""

    name = "bedrock-mantle"
    service = "bedrock-mantle"

    def declines(self, request: ClientRequest) -> str | None:
        # Mantle's ids (`anthropic.claude-…`) are not names a client may send to the others
        listing = request.method == "GET" and request.path.split("?", 1)[0] == "/v1/models"
        return "Bedrock Mantle's model ids are its own" if listing else None

    def model(self, model: str) -> str:
        return self.endpoint.mapped_model(model) or cloud.mantle_model(model)

    def outgoing(self, request: ClientRequest) -> Outgoing:
        headers = client_headers(request, self.endpoint, own_auth=True)  # the client's key stays here
        if betas := cloud.betas(request.headers, self.endpoint):
            headers.append(("anthropic-beta", ",".join(betas)))
        body = request.body
        if request.payload is not None:
            shaped = cloud.shaped(request)
            if isinstance(shaped.get("model"), str):
                shaped["model"] = self.model(shaped["model"])
            body = compact_json(shaped)
        url = self.endpoint.base_url + request.path
        return Outgoing(request.method, url, self.auth_headers(headers), body)

    def reply(self, headers: Headers, request: ClientRequest) -> Reply:
        return Reply(headers)


def provider(endpoint: Endpoint) -> Provider:
    return BedrockMantle(endpoint) if endpoint.provider == "bedrock-mantle" else Bedrock(endpoint)


class EventStreamToSse:
    """AWS event-stream frames in, Anthropic server-sent events out, frame by frame.

    A chunk's payload is `{"bytes": base64(one Anthropic event as JSON)}`, passed on as it is.
    """

    def __init__(self) -> None:
        self.frames = Frames()

    def feed(self, data: bytes) -> bytes:
        out = []
        for headers, payload in self.frames.feed(data):
            kind = headers.get(":message-type")
            if kind == "event":
                if headers.get(":event-type") == "chunk":
                    out.append(_chunk_event(payload))
            elif kind in ("exception", "error"):
                name = str(headers.get(":exception-type") or headers.get(":error-code") or "")
                out.append(_error_event(name, payload, headers.get(":error-message")))
        return b"".join(out)

    def end(self) -> bytes:
        if self.frames.buffer:
            raise FrameError("the event stream ended inside a frame")
        return b""


def _chunk_event(payload: bytes) -> bytes:
    # base64 holds no quote or escape: the value ends at the next quote
    start = payload.find(b'"bytes":"') + 9
    encoded = payload[start : payload.index(b'"', start)] if start > 8 else json.loads(payload)["bytes"]
    event = base64.b64decode(encoded)
    if event.startswith(b'{"type":"'):  # as Anthropic writes them: no need to parse the event
        name = event[9 : event.index(b'"', 9)]
    else:
        name = str(json.loads(event).get("type", "completion")).encode()
    return b"event: %b\ndata: %b\n\n" % (name, event)


def _error_event(name: str, payload: bytes, message: object = None) -> bytes:
    try:
        text = json.loads(payload).get("message") or message
    except (ValueError, AttributeError):
        text = message
    kind = ERRORS.get(name[:1].upper() + name[1:], ("api_error", None))[0]
    body = error_body(kind, str(text or name or "Bedrock stream error"))
    return b"event: error\ndata: %b\n\n" % body


def aws_error(status: int, headers: Headers, body: bytes) -> PlatformError:
    """An AWS error (`x-amzn-ErrorType`, `{"message": ...}`) as Anthropic's, its status kept."""
    if is_anthropic_error(body):
        return PlatformError(status, headers, body, retry_after=retry_after(headers))
    name = (header_value(headers, b"x-amzn-errortype") or "").split(":", 1)[0]
    try:
        document = json.loads(body)
        message = document.get("message") or document.get("Message")
        name = name or str(document.get("__type", "")).rsplit("#", 1)[-1]
    except (ValueError, AttributeError):
        message = None
    kind, recoverable = ERRORS.get(name, (error_type(status), None))
    text = str(message or name or f"HTTP {status} from Bedrock")
    return PlatformError(
        status,
        json_headers(headers) + _request_id(headers),
        error_body(kind, text),
        recoverable,
        retry_after(headers),
        credentials=name in CREDENTIALS_REFUSED,
    )


def _request_id(headers: Headers) -> Headers:
    """Bedrock's request id under Anthropic's name, which clients show with their errors."""
    if header_value(headers, b"request-id") is not None:
        return ()
    found = header_value(headers, b"x-amzn-requestid")
    return ((b"request-id", found.encode("latin-1")),) if found else ()
