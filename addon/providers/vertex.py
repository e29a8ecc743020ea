"""Claude on Google Vertex AI: `rawPredict` and `streamRawPredict` of Anthropic's models.

`POST {base}/projects/{project}/locations/{region}/publishers/anthropic/models/{model}:streamRawPredict`
(`:rawPredict` when not streamed, `count-tokens:rawPredict` for token counts); the body
keeps `stream`, loses `model` and gains `anthropic_version`, and the answer is Anthropic's
own SSE or JSON. Authentication is a bearer token from Google's Application Default
Credentials (a service account key, gcloud's login, the metadata server, workload
identity), fetched once and refreshed before it expires, never per request. Google-side
errors (`{"error": {"code", "message", "status"}}`) become Anthropic's. The anthropic
SDK's `AnthropicVertex` is the reference.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import google.auth
import urllib3
from google.auth.exceptions import GoogleAuthError
from google.auth.transport.urllib3 import Request

from ..config import Endpoint
from ..sse import error_body, error_type
from . import (
    CredentialsError,
    Headers,
    InThread,
    Outgoing,
    PlatformError,
    Provider,
    cloud,
    compact_json,
    is_anthropic_error,
    json_headers,
    posted_to,
    retry_after,
)

if TYPE_CHECKING:
    from ..request import ClientRequest

VERSION = "vertex-2023-10-16"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
PROJECT = "{project}"  # in a request's URL until the credentials have named the project
LOOKED_FOR = (
    "no Google credentials found: looked for GOOGLE_APPLICATION_CREDENTIALS (a service account "
    "or external account key file), gcloud's application default login "
    "(gcloud auth application-default login), and the metadata server (Compute Engine, GKE "
    "workload identity, Cloud Run)"
)
# Google's error statuses: the Anthropic error type, and whether another endpoint may do better.
ERRORS: dict[str, tuple[str, bool | None]] = {
    "RESOURCE_EXHAUSTED": ("rate_limit_error", None),
    "UNAVAILABLE": ("overloaded_error", None),
    "INTERNAL": ("api_error", None),
    "DEADLINE_EXCEEDED": ("timeout_error", True),
    "INVALID_ARGUMENT": ("invalid_request_error", None),
    "FAILED_PRECONDITION": ("invalid_request_error", None),
    "PERMISSION_DENIED": ("permission_error", None),
    "UNAUTHENTICATED": ("authentication_error", None),
    "NOT_FOUND": ("not_found_error", None),
}
COUNT_TOKENS = "/v1/messages/count_tokens"
PATHS = frozenset({"/v1/messages", COUNT_TOKENS})
NO_PROJECT = "no Google Cloud project: set the endpoint's project, or ANTHROPIC_VERTEX_PROJECT_ID"


class GoogleToken:
    """An access token from Application Default Credentials.

    Finding the credentials and refreshing the token do I/O (a token endpoint, the metadata
    server), so both run in a thread, and one refresh serves every request waiting for it.
    google-auth counts a token as invalid a few minutes before it expires, so it is renewed
    ahead of time.
    """

    def __init__(self) -> None:
        self.credentials: Any = None
        self.project: str | None = None
        self.finding = InThread(self._find)
        self.refreshing = InThread(self._refresh)
        self.transport = Request(urllib3.PoolManager())

    async def find(self) -> str:
        self.credentials, self.project = await self.finding()
        kind = type(self.credentials).__module__.removeprefix("google.").replace(".credentials", "")
        return f"Google credentials ({kind}), project {self.project or 'not named by them'}"

    def _find(self) -> tuple[Any, str | None]:
        try:
            return google.auth.default(scopes=[SCOPE])
        except GoogleAuthError as e:
            raise CredentialsError(f"{LOOKED_FOR} ({e})") from None

    async def token(self) -> str:
        if self.credentials is None:
            await self.find()
        if not self.credentials.valid:
            await self.refreshing()
        return str(self.credentials.token)

    def _refresh(self) -> None:
        try:
            self.credentials.refresh(self.transport)
        except GoogleAuthError as e:
            raise CredentialsError(f"Google credentials could not be refreshed: {e}") from None

    def forget(self) -> None:
        """The platform refused the token: the next request fetches a new one."""
        if self.credentials is not None:
            self.credentials.token = None


class Vertex(Provider):
    """Claude on Vertex AI: its URLs and body, a Google bearer token, Google's errors made Anthropic's."""

    name = "vertex"
    reads_errors = True

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        assert endpoint.region is not None  # config.py fills it in or refuses the endpoint
        self.region = endpoint.region
        self.google = GoogleToken()

    @property
    def project(self) -> str | None:
        return self.endpoint.project or self.google.project

    @property
    def own_credentials(self) -> bool:
        return True  # a token of Google's credentials, never the client's

    def declines(self, request: ClientRequest) -> str | None:
        return None if posted_to(request, PATHS) else "Vertex AI serves Messages and token counts only"

    def outgoing(self, request: ClientRequest) -> Outgoing:
        body = cloud.shaped(request)
        model = str(body.pop("model", ""))
        model = self.endpoint.mapped_model(model) or cloud.vertex_model(model)
        if request.path.split("?", 1)[0] == COUNT_TOKENS:
            body["model"], target = model, "count-tokens:rawPredict"
        else:
            target = f"{model}:{'streamRawPredict' if body.get('stream') else 'rawPredict'}"
        body.setdefault("anthropic_version", VERSION)
        where = f"projects/{self.project or PROJECT}/locations/{self.region}"
        url = f"{self.endpoint.base_url}/{where}/publishers/anthropic/models/{target}"
        headers = [("content-type", "application/json")]
        if betas := cloud.betas(request.headers, self.endpoint):
            headers.append(("anthropic-beta", ",".join(betas)))
        headers += cloud.extra_headers(self.endpoint)
        return Outgoing("POST", url, headers, compact_json(body))

    async def authenticate(self, outgoing: Outgoing) -> Outgoing:
        token = await self.google.token()
        url = outgoing.url
        if f"/projects/{PROJECT}/" in url:
            if self.project is None:
                raise CredentialsError(NO_PROJECT)
            url = url.replace(f"/projects/{PROJECT}/", f"/projects/{self.project}/", 1)
        return replace(outgoing, url=url, headers=[*outgoing.headers, ("authorization", f"Bearer {token}")])

    async def prepare(self) -> str:
        found = await self.google.find()
        if self.project is None:
            raise CredentialsError(f"{found}: {NO_PROJECT}")
        return found

    def error(self, status: int, headers: Headers, body: bytes) -> PlatformError:
        if is_anthropic_error(body):  # the model's own error, as Vertex relays it
            return PlatformError(status, headers, body, retry_after=retry_after(headers))
        error = _google_error(body)
        name = str(error.get("status") or "")
        refused = name == "UNAUTHENTICATED"  # the proxy's token: the client's key never comes here
        if refused:
            self.google.forget()
        kind, recoverable = ERRORS.get(name, (error_type(status), None))
        text = str(error.get("message") or name or f"HTTP {status} from Vertex AI")
        body = error_body(kind, text)
        return PlatformError(status, json_headers(headers), body, recoverable, retry_after(headers), refused)


def _google_error(body: bytes) -> dict[str, Any]:
    """`{"error": {...}}`, which Google sometimes sends wrapped in a list."""
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    if isinstance(document, list) and document:
        document = document[0]
    error = document.get("error") if isinstance(document, dict) else None
    return error if isinstance(error, dict) else {}


def provider(endpoint: Endpoint) -> Provider:
    return Vertex(endpoint)
