"""`ccf check`: for each endpoint, its credentials, and whether it answers.

An Anthropic-format endpoint gets `GET /v1/models` with its key: cheap, and nothing is
billed. A cloud endpoint's credentials are looked for exactly as the proxy looks for them
(its provider's `prepare`), and what was found is said, never the secret itself. With
`--call`, every endpoint gets a real one-token request through the proxy's own upstream
client, the path a client's request takes, signing and translation included.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from .. import __version__
from ..config import Config, Endpoint
from ..platforms import OAUTH_BETA
from ..providers import CredentialsError, for_endpoint
from ..request import AttemptFailed, ClientRequest
from ..upstream.client import UpstreamClient

CALL_MODEL = "claude-haiku-4-5-20251001"  # dated: every platform's rule can map it


@dataclass(frozen=True)
class Verdict:
    """What `ccf check` says of one endpoint: whether it passed, what it authenticates with (masked),
    and what happened."""

    ok: bool
    credentials: str  # what the endpoint authenticates with, secrets masked
    result: str


async def check(config: Config, call: bool = False, model: str = CALL_MODEL) -> dict[Endpoint, Verdict]:
    """Every enabled endpoint of `config`, checked at once."""
    client = UpstreamClient(config, 0) if call else None
    if client is not None:
        await client.start()
    try:
        endpoints = config.active_endpoints
        verdicts = await asyncio.gather(*(check_endpoint(e, client, model) for e in endpoints))
    finally:
        if client is not None:
            await client.stop()
    return dict(zip(endpoints, verdicts, strict=True))


async def check_endpoint(endpoint: Endpoint, client: UpstreamClient | None, model: str) -> Verdict:
    provider = client.provider(endpoint) if client else for_endpoint(endpoint)
    try:
        found = await provider.prepare()
    except CredentialsError as e:
        return Verdict(False, "none", f"no usable credentials: {e}")
    if client is None:
        if provider.name != "anthropic":
            return Verdict(True, found, "credentials found (--call sends a 1-token request)")
        ok, result = await asyncio.to_thread(probe_endpoint, endpoint)
    elif provider.name == "anthropic" and not endpoint.api_key:
        ok, result = False, "no key of its own to call with"
    else:
        ok, result = await one_token(client, endpoint, model)
    return Verdict(ok, found, result)


async def one_token(client: UpstreamClient, endpoint: Endpoint, model: str) -> tuple[bool, str]:
    """A real request for one token, as a client would send it: (answered, what happened)."""
    body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
    headers = [("content-type", "application/json"), ("anthropic-version", "2023-06-01")]
    request = ClientRequest.parse("POST", "/v1/messages", headers, json.dumps(body).encode())
    started = time.monotonic()
    try:
        response = await client.send(endpoint, request, started + client.config.timeouts.response)
    except AttemptFailed as failure:
        reason = f" ({_error_message(failure.response.body)})" if failure.response else ""
        return False, f"failed: {failure.detail}{reason}"
    try:
        text = await response.read_whole(1 << 20) or b""
    finally:
        response.close()
    if response.status != 200:
        return False, f"HTTP {response.status}: {_error_message(text)}"
    return True, f"answered in {(time.monotonic() - started) * 1000:.0f} ms"


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


def probe_endpoint(endpoint: Endpoint, timeout: float = 10.0) -> tuple[bool, str]:
    """GET {baseUrl}/v1/models once with the endpoint's credentials: (ok, what happened)."""
    headers = {
        "anthropic-version": "2023-06-01",
        "user-agent": f"claude-code-fallback/{__version__} (ccf check)",
    }
    if endpoint.api_key and endpoint.auth != "x-api-key":
        headers["authorization"] = f"Bearer {endpoint.api_key}"
        if endpoint.auth == "oauth":
            headers["anthropic-beta"] = OAUTH_BETA
    elif endpoint.api_key:
        headers["x-api-key"] = endpoint.api_key
    headers.update(endpoint.headers)
    request = urllib.request.Request(f"{endpoint.base_url}/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except urllib.error.URLError as e:
        return False, f"unreachable: {describe_error(e.reason)}"
    except (OSError, http.client.HTTPException) as e:
        return False, f"unreachable: {describe_error(e)}"
    if 200 <= status < 300:
        return True, "ok"
    if status in (401, 403):
        return False, f"auth rejected ({status})"
    return False, f"reachable (HTTP {status})"


def describe_error(error: object) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
