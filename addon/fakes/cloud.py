"""Fakes of Claude on the cloud platforms: Amazon Bedrock, Bedrock Mantle and Google Vertex AI.

The proxy's platform endpoints are tested against these, as its Anthropic endpoints are
against `FakeAnthropic`, which each of them extends: every `Behavior` still works, on the
platform's own routes and in its own shapes. They check what the real services check, for
real: a SigV4 signature is recomputed with botocore from the request as received, a
service account's JWT assertion is verified with its public key, a Vertex token is one
this fake issued and has not expired. `FakeBedrock` answers a stream as an AWS event
stream of binary frames and errors as Bedrock names them; `FakeBedrockMantle` is the
Anthropic API under `/anthropic`, behind AWS authentication; `FakeVertex` serves the
OAuth2 token endpoint of the service account that `write_key_file` writes, and the
publisher-model routes with Google's errors. `python -m claude_code_fallback.fakes.cloud`
runs one in the foreground.
"""

from __future__ import annotations

import argparse
import base64
import calendar
import hashlib
import hmac
import itertools
import json
import re
import secrets
import string
import struct
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .anthropic import _COUNT_TOKENS, Behavior, FakeAnthropic, behavior_from, serve_options
from .server import Exchange, SeenRequest, serve_in_foreground

BEDROCK_VERSION = "bedrock-2023-05-31"
VERTEX_VERSION = "vertex-2023-10-16"
# Since 2.x the anthropic SDK sends the platforms its own API version instead.
API_VERSIONS = ("2023-06-01", "2026-10-21")
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"

BEDROCK_ERRORS: dict[str, tuple[int, str]] = {
    "ValidationException": (400, "Malformed input request, please reformat your input and try again."),
    "AccessDeniedException": (403, "You don't have access to the model with the specified model ID."),
    "ResourceNotFoundException": (404, "Could not resolve the foundation model from the model identifier."),
    "ModelTimeoutException": (408, "Model has timed out in processing the request. Try your request again."),
    "ModelErrorException": (424, "The model returned an error. Try your request again."),
    "ModelStreamErrorException": (424, "The model encountered an error while streaming its response."),
    "ThrottlingException": (429, "Too many requests, please wait before trying again."),
    "ModelNotReadyException": (
        429,
        "Model is not ready to serve inference requests. Try your request again.",
    ),
    "InternalServerException": (
        500,
        "The system encountered an unexpected error during processing. Try your request again.",
    ),
    "ServiceUnavailableException": (503, "Bedrock is unable to process your request."),
    "UnknownOperationException": (404, "Unknown operation"),
    "MissingAuthenticationTokenException": (403, "Missing Authentication Token"),
    "IncompleteSignatureException": (403, "The request signature does not conform to AWS standards."),
    "UnrecognizedClientException": (403, "The security token included in the request is invalid."),
    "InvalidSignatureException": (
        403,
        "The request signature we calculated does not match the signature you provided. "
        "Check your AWS Secret Access Key and signing method.",
    ),
}
"""Bedrock's error names, with the status and the message the service sends with each."""

BEDROCK_STATUS_ERRORS: dict[int, str] = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
"""The error `Behavior("status", N)` sends on Bedrock (each fake keeps a copy, `status_errors`)."""

STREAM_EXCEPTIONS = frozenset(
    {
        "throttlingException",
        "modelStreamErrorException",
        "internalServerException",
        "serviceUnavailableException",
        "validationException",
        "modelTimeoutException",
    }
)
"""The `:exception-type`s a Bedrock response stream can end with."""

GOOGLE_STATUSES: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: (
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
        "or other valid authentication credential. "
        "See https://developers.google.com/identity/sign-in/web/devconsole-project.",
    ),
    403: ("PERMISSION_DENIED", "Permission 'aiplatform.endpoints.predict' denied on resource."),
    404: ("NOT_FOUND", "Requested entity was not found."),
    409: ("ABORTED", "The operation was aborted."),
    429: (
        "RESOURCE_EXHAUSTED",
        "Resource exhausted. Please try again later. Please refer to "
        "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details.",
    ),
    500: ("INTERNAL", "Internal error encountered."),
    501: ("NOT_IMPLEMENTED", "Operation is not implemented, or supported, or enabled."),
    503: ("UNAVAILABLE", "The service is currently unavailable."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}
"""Google's status name and message per HTTP status. Any other status (529 overloaded, say) is
the model's own error, which Vertex relays in Anthropic's shape."""

# Test credentials for the command line; distinctive so that a leak is easy to grep for.
FAKE_ACCESS_KEY = "AKIAFAKECLOUD0000001"
FAKE_SECRET_KEY = "fakecloud/SECRET/key/0000000000000000001"
FAKE_API_KEY = "ABSKfakecloud-BEDROCK-API-KEY-0000000001"

_EVENT_STREAM = b"application/vnd.amazon.eventstream"
_CORAL = "http://internal.amazon.com/coral/com.amazon.bedrock/"
_CHUNK_HEADERS = ((":event-type", "chunk"), (":content-type", "application/json"), (":message-type", "event"))
_PADDING = string.ascii_letters + string.digits
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_SKEW = 300  # how far a SigV4 date may be from the server's clock, in seconds
_BEDROCK_PATH = re.compile(r"/model/([^/]+)/(invoke|invoke-with-response-stream)")
_VERTEX_PATH = re.compile(
    r"/v1/projects/([^/]+)/locations/([^/]+)/publishers/anthropic/models/([^/:]+):(\w+)"
)
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_JWT_MAX_LIFETIME = 3600
# Parameters every Google API takes; any other is refused, as the real ones do.
_GOOGLE_PARAMETERS = frozenset({"alt", "$alt", "fields", "prettyPrint", "quotaUser", "$.xgafv"})
_PLAIN = Behavior()  # the token endpoint answers plainly, whatever the fake was told to do


@dataclass(frozen=True)
class CloudRequest(SeenRequest):
    """A request to a platform fake, with what the platform made of it.

    `model` is the model from the path, URL-decoded (Vertex count-tokens: from the body);
    `auth` how the request authenticated (`sigv4`, `bearer` or `oauth`), or `refusal` the
    error name and message it was refused with.
    """

    model: str | None = None
    auth: str | None = None
    refusal: tuple[str, str] | None = None

    @property
    def anthropic_beta(self) -> list[str] | None:
        """The body's `anthropic_beta` list (Bedrock's form of the `anthropic-beta` header)."""
        body = self.json()
        return body.get("anthropic_beta") if isinstance(body, dict) else None


def _cloud(seen: SeenRequest, **extra: Any) -> CloudRequest:
    return CloudRequest(seen.method, seen.path, seen.headers, seen.body, seen.time, seen.connection, **extra)


def _fullmatch(pattern: re.Pattern[str], target: str) -> re.Match[str] | None:
    return pattern.fullmatch(target.partition("?")[0])


def _same(given: str | None, expected: str | None) -> bool:
    if given is None or expected is None:
        return given is expected
    return hmac.compare_digest(given.encode(), expected.encode())


# -- AWS ----------------------------------------------------------------------------------


def event_frame(headers: Sequence[tuple[str, str]], payload: bytes) -> bytes:
    """One AWS event-stream message: a prelude (total length, headers length, their CRC32),
    string-typed headers, the payload, and the CRC32 of all that."""
    head = b""
    for name, value in headers:
        raw_name, raw_value = name.encode(), value.encode()
        head += (
            struct.pack(">B", len(raw_name)) + raw_name + struct.pack(">BH", 7, len(raw_value)) + raw_value
        )
    prelude = struct.pack(">II", 16 + len(head) + len(payload), len(head))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + payload
    return message + struct.pack(">I", zlib.crc32(message))


def chunk_frame(event: bytes) -> bytes:
    """A Bedrock `chunk` event that carries one Anthropic stream event (its JSON)."""
    # Bedrock pads every chunk with a run of letters of varying length.
    pad = _PADDING[: len(event) % len(_PADDING) + 1]
    payload = {"bytes": base64.b64encode(event).decode(), "p": pad}
    return event_frame(_CHUNK_HEADERS, json.dumps(payload, separators=(",", ":")).encode())


def exception_frame(name: str, message: str | None = None) -> bytes:
    """A Bedrock stream's exception event, `name` one of `STREAM_EXCEPTIONS`."""
    if name not in STREAM_EXCEPTIONS:
        raise ValueError(f"unknown Bedrock stream exception {name!r}; use one of {sorted(STREAM_EXCEPTIONS)}")
    text = message or BEDROCK_ERRORS[name[0].upper() + name[1:]][1]
    headers = (
        (":exception-type", name),
        (":content-type", "application/json"),
        (":message-type", "exception"),
    )
    return event_frame(headers, json.dumps({"message": text}).encode())


def _amz_date(seconds: float) -> str:
    return time.strftime(_AMZ_DATE, time.gmtime(seconds))


def verify_sigv4(
    seen: SeenRequest,
    service: str,
    region: str,
    keys: Mapping[str, tuple[str, str | None]],
    now: float | None = None,
) -> tuple[str, str] | None:
    """Why AWS refuses `seen` (an error name and message), or None if its SigV4 signature holds.

    `keys` maps each access key id to its secret and session token. The signature is
    recomputed with botocore from the request as received: method, host and target, the
    headers its Authorization names as signed, its X-Amz-Date and its body.
    """
    authorization = seen.header("authorization")
    if authorization is None:
        return "MissingAuthenticationTokenException", BEDROCK_ERRORS["MissingAuthenticationTokenException"][1]
    algorithm, _, rest = authorization.partition(" ")
    fields = dict(part.strip().partition("=")[::2] for part in rest.split(","))
    credential, signed, signature = (fields.get(k, "") for k in ("Credential", "SignedHeaders", "Signature"))
    scope = credential.split("/")
    if algorithm != "AWS4-HMAC-SHA256" or len(scope) != 5 or scope[4] != "aws4_request" or not signature:
        return "IncompleteSignatureException", (
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters "
            f"of the AWS4-HMAC-SHA256 algorithm. Authorization={algorithm}"
        )
    key_id = scope[0]
    if key_id not in keys or not _same(seen.header("x-amz-security-token"), keys[key_id][1]):
        return "UnrecognizedClientException", BEDROCK_ERRORS["UnrecognizedClientException"][1]
    amz_date = seen.header("x-amz-date") or ""
    refusal = _scope_refusal(scope, amz_date, service, region, time.time() if now is None else now)
    if refusal is not None:
        return refusal
    names = set(signed.split(";"))
    if "host" not in names or seen.header("host") is None:
        return (
            "InvalidSignatureException",
            "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.",
        )
    if _signature_holds(
        seen, names, amz_date, signature, Credentials(key_id, *keys[key_id]), service, region
    ):
        return None
    return "InvalidSignatureException", BEDROCK_ERRORS["InvalidSignatureException"][1]


def _scope_refusal(
    scope: list[str], amz_date: str, service: str, region: str, now: float
) -> tuple[str, str] | None:
    """Why the signature's date and credential scope do not fit this request, as AWS says it."""
    _, day, scope_region, scope_service, _ = scope
    try:
        signed_at = calendar.timegm(time.strptime(amz_date, _AMZ_DATE))
    except ValueError:
        return (
            "IncompleteSignatureException",
            "Authorization header requires existence of a 'X-Amz-Date' header.",
        )
    if signed_at < now - _SKEW:
        return "InvalidSignatureException", (
            f"Signature expired: {amz_date} is now earlier than {_amz_date(now - _SKEW)} "
            f"({_amz_date(now)} - 5 min.)"
        )
    if signed_at > now + _SKEW:
        return "InvalidSignatureException", (
            f"Signature not yet current: {amz_date} is still later than {_amz_date(now + _SKEW)} "
            f"({_amz_date(now)} + 5 min.)"
        )
    if day != amz_date[:8]:
        return "InvalidSignatureException", (
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
            f"'{day}' != '{amz_date[:8]}', from '{amz_date}'."
        )
    if scope_service != service:
        return "InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'. "
    if scope_region != region:
        return "InvalidSignatureException", "Credential should be scoped to a valid region. "
    return None


def _signature_holds(
    seen: SeenRequest,
    names: set[str],
    amz_date: str,
    signature: str,
    credentials: Credentials,
    service: str,
    region: str,
) -> bool:
    """Whether botocore, signing the request as received, comes to the same signature and body hash."""
    headers: dict[str, str] = {}
    for name, value in seen.headers:
        if name in names:
            headers[name] = f"{headers[name]},{value}" if name in headers else value
    request = AWSRequest(seen.method, f"http://{headers['host']}{seen.path}", headers, seen.body)
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(credentials, service, region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    content_hash = seen.header("x-amz-content-sha256")
    return hmac.compare_digest(expected.encode(), signature.encode()) and content_hash in (
        None,
        hashlib.sha256(seen.body).hexdigest(),
    )


class _AwsFake(FakeAnthropic):
    """A fake behind AWS authentication: SigV4 for `service` in `region`, or a Bedrock API key.

    A request that fails authentication is refused (403) whatever the behaviour, and
    counted in `auth_failures`.
    """

    service = ""

    def __init__(
        self,
        name: str = "",
        port: int = 0,
        *,
        region: str = "us-east-1",
        aws_access_key: str | None = None,
        aws_secret_key: str | None = None,
        aws_session_token: str | None = None,
        api_key: str | None = None,
    ) -> None:
        name = name or self.service
        super().__init__(name, port)
        if (aws_access_key is None) != (aws_secret_key is None):
            raise ValueError(f"fake {name!r}: give both an AWS access key id and its secret, or neither")
        if aws_access_key is None and api_key is None:
            raise ValueError(f"fake {name!r}: give AWS credentials or an API key, or it refuses everything")
        self.region = region
        self.aws_access_key = aws_access_key
        self.aws_secret_key = aws_secret_key
        self.aws_session_token = aws_session_token
        self.api_key = api_key
        self.auth_failures = 0

    def reset(self) -> None:
        super().reset()
        self.auth_failures = 0

    def _authenticate(self, seen: SeenRequest) -> tuple[str, tuple[str, str] | None]:
        """How `seen` authenticates (`bearer` or `sigv4`), and why it is refused if it is."""
        authorization = seen.header("authorization") or ""
        if authorization.startswith("Bearer "):
            if self.api_key is not None and _same(authorization[7:], self.api_key):
                return "bearer", None
            return "bearer", ("UnrecognizedClientException", BEDROCK_ERRORS["UnrecognizedClientException"][1])
        keys = {}
        if self.aws_access_key is not None and self.aws_secret_key is not None:
            keys[self.aws_access_key] = (self.aws_secret_key, self.aws_session_token)
        return "sigv4", verify_sigv4(seen, self.service, self.region, keys)

    async def _handle(self, x: Exchange, pending: bytearray) -> bool:
        x.extra_headers = f"x-amzn-RequestId: {uuid.uuid4()}\r\n".encode()
        auth, refusal = self._authenticate(x.seen)
        if refusal is not None:
            self.auth_failures += 1
            x.seen = _cloud(x.seen, model=self._model(x.seen), refusal=refusal)
        else:
            x.seen = _cloud(x.seen, model=self._model(x.seen), auth=auth)
        return await super()._handle(x, pending)

    def _model(self, seen: SeenRequest) -> str | None:
        return None

    async def _answer(self, x: Exchange, b: Behavior) -> bool:
        refusal = x.seen.refusal if isinstance(x.seen, CloudRequest) else None
        if refusal is not None:
            return await self._send_aws_error(x, b, *refusal)
        return await super()._answer(x, b)

    async def _send_aws_error(
        self, x: Exchange, b: Behavior, name: str, message: str | None = None, status: int | None = None
    ) -> bool:
        """Send error `name` as AWS does, with its own status unless `status` is given."""
        own_status, default = BEDROCK_ERRORS[name]
        x.extra_headers += f"x-amzn-ErrorType: {name}:{_CORAL}\r\n".encode()
        body = json.dumps({"message": message or default}).encode()
        return await self._send_json(x, b, status or own_status, body)


class FakeBedrock(_AwsFake):
    """Amazon Bedrock's runtime serving Claude: InvokeModel and InvokeModelWithResponseStream.

    `POST /model/{modelId}/invoke` answers the message's JSON; `.../invoke-with-response-stream`
    an AWS event stream, one frame per chunk of HTTP, each a `chunk` event carrying one
    Anthropic stream event (the last with Bedrock's invocation metrics). The body must
    carry `anthropic_version` `bedrock-2023-05-31` and neither `model` nor `stream`.
    Errors are `{"message": ...}` with `x-amzn-ErrorType`; `status_errors` says which error
    `Behavior("status", N)` sends (set 429 to `ModelNotReadyException`, say), and a status
    it does not name sends `InternalServerException` (5xx) or `ValidationException`. The
    stream kinds that send an error end the stream with a `stream_exception` frame.
    """

    service = "bedrock"
    stream_type = _EVENT_STREAM
    stream_exception = "throttlingException"

    def __repr__(self) -> str:
        return f"FakeBedrock({self.name!r}, {self.url}, {self.region})"

    @cached_property
    def status_errors(self) -> dict[int, str]:
        """Which error `Behavior("status", N)` sends: this fake's own copy of `BEDROCK_STATUS_ERRORS`."""
        return dict(BEDROCK_STATUS_ERRORS)

    def reset(self) -> None:
        """`FakeAnthropic.reset`, and the default `status_errors` and `stream_exception`."""
        super().reset()
        self.status_errors = dict(BEDROCK_STATUS_ERRORS)
        self.stream_exception = FakeBedrock.stream_exception

    def _model(self, seen: SeenRequest) -> str | None:
        match = _fullmatch(_BEDROCK_PATH, seen.path)
        return unquote(match[1]) if match else None

    async def _send_error(self, x: Exchange, b: Behavior, status: int, message: str | None = None) -> bool:
        name = self.status_errors.get(status) or (
            "InternalServerException" if status >= 500 else "ValidationException"
        )
        return await self._send_aws_error(x, b, name, message, status)

    async def _route(self, x: Exchange, b: Behavior) -> bool:
        seen = x.seen
        match = _fullmatch(_BEDROCK_PATH, seen.path)
        if seen.method != "POST" or match is None or not isinstance(seen, CloudRequest):
            return await self._send_aws_error(x, b, "UnknownOperationException")
        try:
            payload = json.loads(seen.body)
        except ValueError:
            payload = None
        if problem := _bedrock_body_problem(payload):
            return await self._send_aws_error(x, b, "ValidationException", problem)
        return await self._reply(x, b, json.dumps(seen.model), match[2] == "invoke-with-response-stream")

    def _encode_events(self, x: Exchange, events: list[bytes]) -> list[bytes]:
        frames = []
        for event in events:
            name, _, data = event.partition(b"\ndata: ")
            if name == b"event: error":
                frames.append(exception_frame(self.stream_exception))
                continue
            if name == b"event: message_stop":
                data = self._with_metrics(x, events, data)
            frames.append(chunk_frame(data.rstrip(b"\n")))
        return frames

    def _with_metrics(self, x: Exchange, events: list[bytes], data: bytes) -> bytes:
        usage = next(
            (
                json.loads(e.partition(b"data: ")[2])["usage"]
                for e in events
                if e.startswith(b"event: message_delta")
            ),
            {"output_tokens": 0},
        )
        latency = round((time.monotonic() - x.seen.time) * 1000)
        stop = json.loads(data)
        stop["amazon-bedrock-invocationMetrics"] = {
            "inputTokenCount": 10,
            "outputTokenCount": usage["output_tokens"],
            "invocationLatency": latency,
            "firstByteLatency": latency,
        }
        return json.dumps(stop, separators=(",", ":")).encode()


def _bedrock_body_problem(payload: object) -> str | None:
    if not isinstance(payload, dict):
        return (
            "Malformed input request: #: expected type: JSONObject, please reformat your input and try again."
        )
    for key in ("model", "stream"):
        if key in payload:
            return (
                f"Malformed input request: #: extraneous key [{key}] is not permitted, "
                "please reformat your input and try again."
            )
    version = payload.get("anthropic_version")
    if version is None:
        return (
            "Malformed input request: #: required key [anthropic_version] not found, "
            "please reformat your input and try again."
        )
    if version != BEDROCK_VERSION and version not in API_VERSIONS:
        return (
            f"Malformed input request: #/anthropic_version: {version} is not a valid enum value, "
            "please reformat your input and try again."
        )
    return None


class FakeBedrockMantle(_AwsFake):
    """Bedrock Mantle: Anthropic's Messages API under `/anthropic` (base URL `<url>/anthropic`).

    It answers as `FakeAnthropic` does, in Anthropic's shapes, once the request has passed
    AWS authentication for the service `bedrock-mantle` (SigV4, or a Bedrock API key as
    `Authorization: Bearer`); refusals come from AWS, in Bedrock's error shape.
    """

    service = "bedrock-mantle"

    def __repr__(self) -> str:
        return f"FakeBedrockMantle({self.name!r}, {self.url}, {self.region})"

    @property
    def base_url(self) -> str:
        return self.url + "/anthropic"

    async def _route(self, x: Exchange, b: Behavior) -> bool:
        if not x.seen.path.startswith("/anthropic/"):
            return await self._send_error(x, b, 404, f"Not found: {x.seen.path}")
        return await super()._route(x, b)


# -- Google -------------------------------------------------------------------------------


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeVertex(FakeAnthropic):
    """Vertex AI serving Claude, with the OAuth2 token endpoint of its own service account.

    `POST /token` grants an access token for the JWT-bearer assertion that google-auth's
    service-account credentials send (key file: `write_key_file`); tokens last
    `token_lifetime` seconds, here as for the client, and `expire_tokens` ends them all
    now. `POST /v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model}`
    `:streamRawPredict` (SSE), `:rawPredict` (JSON) and `.../models/count-tokens:rawPredict`
    need such a token (else 401, counted in `auth_failures`), this fake's project and
    region, `anthropic_version` `vertex-2023-10-16` and no `model` in the body. Errors are
    Google's `{"error": {"code", "message", "status"}}`, except those Vertex relays from
    the model (a status not in `GOOGLE_STATUSES`, such as 529), which are Anthropic's.
    Token requests are answered aside: not recorded in `requests` and not given a
    behaviour, but counted in `token_requests`.
    """

    def __init__(
        self,
        name: str = "vertex",
        port: int = 0,
        *,
        project: str = "fake-project",
        region: str = "us-east5",
        token_lifetime: int = 3600,
    ) -> None:
        super().__init__(name, port)
        self.project = project
        self.region = region
        self.token_lifetime = token_lifetime
        self.client_email = f"fake-vertex@{project}.iam.gserviceaccount.com"
        self.private_key_id = secrets.token_hex(20)
        self.token_requests = 0
        self.auth_failures = 0
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._tokens: dict[str, float] = {}  # token -> when it expires (monotonic)
        self._token_numbers = itertools.count(1)
        self._token_lock = threading.Lock()  # tests expire tokens while the server adds some

    def __repr__(self) -> str:
        return f"FakeVertex({self.name!r}, {self.url}, {self.project}, {self.region})"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def token_uri(self) -> str:
        return self.url + "/token"

    def reset(self) -> None:
        """`FakeAnthropic.reset`, and the counts of token requests and auth failures."""
        super().reset()
        self.token_requests = 0
        self.auth_failures = 0

    def service_account_info(self) -> dict[str, str]:
        """The service account's JSON key, as Google issues one; `token_uri` is this fake's."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": self.private_key_id,
            "private_key": pem.decode(),
            "client_email": self.client_email,
            "client_id": str(int(self.private_key_id[:16], 16)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
            + quote(self.client_email),
            "universe_domain": "googleapis.com",
        }

    def write_key_file(self, path: str | Path) -> Path:
        """Write the service account's key file (once listening: it names the port) to `path`."""
        path = Path(path)
        path.write_text(json.dumps(self.service_account_info(), indent=2))
        path.chmod(0o600)
        return path

    def expire_tokens(self) -> None:
        """End every token issued so far, as if its lifetime were over."""
        with self._token_lock:
            self._tokens.clear()

    def _token_valid(self, token: str) -> bool:
        with self._token_lock:
            expires = self._tokens.get(token)
        return expires is not None and time.monotonic() < expires

    def _grant(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """The token endpoint's status and answer to a form `body`."""
        form = {k: v[0] for k, v in parse_qs(body.decode("latin-1")).items()}
        if form.get("grant_type") != _JWT_BEARER:
            description = f"Invalid grant_type: {form.get('grant_type', '')}"
            return 400, {"error": "unsupported_grant_type", "error_description": description}
        if problem := self._assertion_problem(form.get("assertion", "")):
            return 400, {"error": problem[0], "error_description": problem[1]}
        token = f"ya29.fake-{next(self._token_numbers)}"
        with self._token_lock:
            self._tokens[token] = time.monotonic() + self.token_lifetime
        return 200, {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}

    def _assertion_problem(self, assertion: str) -> tuple[str, str] | None:
        try:
            head, claims, signature = assertion.split(".")
            header, payload = json.loads(_b64url(head)), json.loads(_b64url(claims))
            if header.get("alg") != "RS256" or header.get("kid", self.private_key_id) != self.private_key_id:
                raise InvalidSignature
            public_key = self._key.public_key()
            public_key.verify(
                _b64url(signature), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except (ValueError, AttributeError, InvalidSignature):
            return "invalid_grant", "Invalid JWT Signature."
        if payload.get("iss") != self.client_email:
            return "invalid_grant", "Invalid grant: account not found"
        # google-auth names Google's own token endpoint as the audience, whatever its token_uri.
        if payload.get("aud") not in (GOOGLE_TOKEN_URI, self.token_uri):
            return (
                "invalid_grant",
                f"Invalid JWT: Failed audience check. The right audience is {GOOGLE_TOKEN_URI}",
            )
        iat, exp, now = payload.get("iat"), payload.get("exp"), time.time()
        if not (
            isinstance(iat, int)
            and isinstance(exp, int)
            and iat < exp <= iat + _JWT_MAX_LIFETIME
            and iat <= now + _SKEW
            and exp > now
        ):
            return "invalid_grant", (
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
                "Check your iat and exp values in the JWT claim."
            )
        if CLOUD_PLATFORM_SCOPE not in str(payload.get("scope", "")).split():
            return "invalid_scope", "Invalid OAuth scope or ID token audience provided."
        return None

    async def _answer_aside(self, x: Exchange) -> bool | None:
        if x.seen.method != "POST" or x.seen.path.partition("?")[0] != "/token":
            return None
        self.token_requests += 1
        status, answer = self._grant(x.seen.body)
        return await self._send_json(x, _PLAIN, status, json.dumps(answer).encode())

    async def _handle(self, x: Exchange, pending: bytearray) -> bool:
        if x.seen.path.partition("?")[0] != "/token":
            x.seen = self._authenticated(x.seen)
        return await super()._handle(x, pending)

    def _authenticated(self, seen: SeenRequest) -> CloudRequest:
        """`seen` with its model, and the token it presented checked."""
        match = _fullmatch(_VERTEX_PATH, seen.path)
        model = unquote(match[3]) if match else None
        if model == "count-tokens":
            try:
                model = json.loads(seen.body).get("model")
            except (ValueError, AttributeError):
                model = None
        scheme, _, token = (seen.header("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and self._token_valid(token):
            return _cloud(seen, model=model, auth="oauth")
        self.auth_failures += 1
        return _cloud(seen, model=model, refusal=("UNAUTHENTICATED", GOOGLE_STATUSES[401][1]))

    async def _answer(self, x: Exchange, b: Behavior) -> bool:
        if isinstance(x.seen, CloudRequest) and x.seen.refusal is not None:
            x.extra_headers += b'www-authenticate: Bearer realm="https://accounts.google.com/"\r\n'
            return await self._send_error(x, b, 401)
        return await super()._answer(x, b)

    async def _send_error(self, x: Exchange, b: Behavior, status: int, message: str | None = None) -> bool:
        if status not in GOOGLE_STATUSES:
            return await super()._send_error(x, b, status, message)
        name, default = GOOGLE_STATUSES[status]
        body = {"error": {"code": status, "message": message or default, "status": name}}
        return await self._send_json(x, b, status, json.dumps(body).encode())

    async def _route(self, x: Exchange, b: Behavior) -> bool:
        seen = x.seen
        path, _, query = seen.path.partition("?")
        for name in parse_qs(query, keep_blank_values=True):
            if name not in _GOOGLE_PARAMETERS:
                return await self._send_error(
                    x,
                    b,
                    400,
                    f'Invalid JSON payload received. Unknown name "{name}": Cannot bind query parameter. '
                    f"Field '{name}' could not be found in request message.",
                )
        match = _fullmatch(_VERTEX_PATH, path)
        if seen.method != "POST" or match is None or match[4] not in ("rawPredict", "streamRawPredict"):
            return await self._send_error(
                x, b, 404, f"The requested URL {path} was not found on this server."
            )
        project, region, model, method = match.groups()
        if (project, region) != (self.project, self.region):
            resource = f"projects/{project}/locations/{region}/publishers/anthropic/models/{model}"
            return await self._send_error(x, b, 404, f"Publisher Model `{resource}` not found.")
        try:
            payload = json.loads(seen.body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return await self._send_error(x, b, 400, "Invalid JSON payload received. Expected an object.")
        version = payload.get("anthropic_version")
        if version != VERTEX_VERSION and version not in API_VERSIONS:
            return await self._send_error(
                x, b, 400, f"anthropic_version: {version!r} is not supported; use {VERTEX_VERSION!r}."
            )
        if model == "count-tokens":
            if method != "rawPredict":
                return await self._send_error(x, b, 400, "count-tokens takes rawPredict.")
            return await self._send_json(x, b, 200, _COUNT_TOKENS)
        if "model" in payload:
            return await self._send_error(
                x, b, 400, "model: Extra inputs are not permitted; it is in the URL."
            )
        stream = payload.get("stream") is True
        if method == "streamRawPredict" and not stream:
            return await self._send_error(x, b, 400, 'streamRawPredict needs "stream": true in the body.')
        return await self._reply(x, b, json.dumps(unquote(model)), stream)


# -- command line -------------------------------------------------------------------------


def _arguments(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Behavior]:
    parser = argparse.ArgumentParser(
        prog="python -m claude_code_fallback.fakes.cloud",
        description="Run a fake of Claude on a cloud platform on 127.0.0.1 in the foreground.",
    )
    platforms = parser.add_subparsers(dest="platform", required=True)
    aws = argparse.ArgumentParser(add_help=False)
    aws.add_argument("--region", default="us-east-1", help="the AWS region it serves")
    aws.add_argument("--access-key", default=FAKE_ACCESS_KEY, help="the AWS access key id it accepts")
    aws.add_argument("--secret-key", default=FAKE_SECRET_KEY, help="that key's secret")
    aws.add_argument("--session-token", help="the session token that goes with that key")
    aws.add_argument("--api-key", default=FAKE_API_KEY, help="the Bedrock API key it accepts ('' for none)")
    bedrock = platforms.add_parser("bedrock", parents=[serve_options(), aws], help="Bedrock runtime")
    bedrock.add_argument(
        "--stream-exception",
        choices=sorted(STREAM_EXCEPTIONS),
        default="throttlingException",
        help="the exception a stream that errs ends with",
    )
    platforms.add_parser("mantle", parents=[serve_options(), aws], help="Bedrock Mantle")
    vertex = platforms.add_parser("vertex", parents=[serve_options()], help="Vertex AI")
    vertex.add_argument("--project", default="fake-project", help="the Google Cloud project it serves")
    vertex.add_argument("--region", default="us-east5", help="the region it serves")
    vertex.add_argument("--token-lifetime", type=int, default=3600, help="seconds an access token lasts")
    vertex.add_argument("--key-file", type=Path, help="where to write the service account's key file")
    args = parser.parse_args(argv)
    return args, behavior_from(parser, args)


def _fake(args: argparse.Namespace) -> FakeAnthropic:
    if args.platform == "vertex":
        return FakeVertex(
            args.name, args.port, project=args.project, region=args.region, token_lifetime=args.token_lifetime
        )
    kind = FakeBedrock if args.platform == "bedrock" else FakeBedrockMantle
    fake = kind(
        args.name,
        args.port,
        region=args.region,
        aws_access_key=args.access_key or None,
        aws_secret_key=args.secret_key or None,
        aws_session_token=args.session_token,
        api_key=args.api_key or None,
    )
    if isinstance(fake, FakeBedrock):
        fake.stream_exception = args.stream_exception
    return fake


def _notes(fake: FakeAnthropic, args: argparse.Namespace) -> list[str]:
    """What a client needs besides the URL; for Vertex, the key file is written now."""
    if isinstance(fake, FakeVertex):
        key_file = args.key_file or Path(tempfile.gettempdir()) / f"fakecloud-vertex-{fake.port}.json"
        fake.write_key_file(key_file)
        return [
            f"base_url: {fake.base_url}",
            f"project: {fake.project}",
            f"region: {fake.region}",
            f"key_file: {key_file}",
        ]
    assert isinstance(fake, _AwsFake)
    base_url = fake.base_url if isinstance(fake, FakeBedrockMantle) else fake.url
    notes = [f"base_url: {base_url}", f"region: {fake.region}"]
    if fake.aws_access_key:
        notes += [f"aws_access_key: {fake.aws_access_key}", f"aws_secret_key: {fake.aws_secret_key}"]
    if fake.api_key:
        notes.append(f"api_key: {fake.api_key}")
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    args, behavior = _arguments(argv)
    try:
        fake = _fake(args)
    except ValueError as e:
        print(f"fakecloud: {e}", file=sys.stderr)
        return 2
    fake.behavior = behavior
    return serve_in_foreground(fake, "fakecloud", lambda: _notes(fake, args))


if __name__ == "__main__":
    sys.exit(main())
