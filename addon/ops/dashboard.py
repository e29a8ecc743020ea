"""The status page on the proxy port: one HTML file, the JSON summary it polls, and its reload button.

`GET /` (or `/dashboard`) serves `dashboard.html`, which polls `GET /dashboard/summary`
once a second; `POST /dashboard/reload` reloads the config, from the page's own origin only.
Under `server.accessKey` (or `accessKeys`) a browser cannot send the key as a header, so it
brings it once as `?key=`: the answer is a redirect to the same path without it and a
session cookie holding an HMAC of the key's name under a secret that lives as long as the
process. The key is masked on the
flow at once, so neither mitmweb nor a log line shows it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import http

from ..config import mask_secret
from ..cost.store import UsageStore, grouped, hour_of
from ..metrics import Metrics
from ..state.access import ACCESS_HEADER
from ..state.endpoints import HEALTHY, reason_text
from .service import Host, RuntimeView
from .timeline import Timeline

PAGE_FILE = Path(__file__).with_name("dashboard.html")
PAGE_PATHS = ("/", "/dashboard")
SUMMARY_PATH = "/dashboard/summary"
RELOAD_PATH = "/dashboard/reload"
ROUTES = frozenset({*(("GET", p) for p in PAGE_PATHS), ("GET", SUMMARY_PATH), ("POST", RELOAD_PATH)})
COOKIE = "ccf_session"
PROMPT_KINDS = frozenset({"input", "cache_read", "cache_creation"})  # of ccf_tokens_total
SERVING = "serving"
DISABLED = "disabled"


@cache
def page() -> tuple[bytes, str]:
    """The page's bytes, and a Content-Security-Policy that lets only its own inline script run."""
    html = PAGE_FILE.read_bytes()
    script = html.split(b"<script>", 1)[1].split(b"</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    policy = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html, policy


class Dashboard:
    """Answers the page's routes; everything else is left to the proxy."""

    def __init__(self, host: Host, timeline: Timeline, reload: Callable[[], bool]) -> None:
        self.host = host
        self.timeline = timeline
        self.reload = reload
        self.secret = secrets.token_bytes(32)

    def serve(self, flow: http.HTTPFlow) -> bool:
        request = flow.request
        path = request.path.split("?", 1)[0]
        if (request.method, path) not in ROUTES:
            if "cookie" in request.headers and COOKIE in request.cookies:
                del request.cookies[COOKIE]  # a browser's other requests: the session is not the endpoint's
            return False
        offered = request.query.get("key")
        allowed = self.allowed(request)
        self.mask(flow)
        if offered is not None and path in PAGE_PATHS:
            flow.response = self.exchange(offered, path)
        elif not allowed:
            flow.response = refused(path in PAGE_PATHS)
        elif path in PAGE_PATHS:
            html, policy = page()
            flow.response = http.Response.make(
                200,
                html,
                {
                    "content-type": "text/html; charset=utf-8",
                    "content-security-policy": policy,
                    "referrer-policy": "no-referrer",
                    "x-content-type-options": "nosniff",
                    "cache-control": "no-store",
                },
            )
        elif path == SUMMARY_PATH:
            flow.response = as_json(200, self.summary())
        elif not same_origin(flow):
            refusal = {"ok": False, "error": "The reload button works from the page only."}
            flow.response = as_json(403, refusal)
        else:
            ok = self.reload()
            flow.response = as_json(200 if ok else 422, {"ok": ok, "error": None if ok else reload_error()})
        return True

    # -- access -----------------------------------------------------------------------

    def current(self) -> RuntimeView:
        assert self.host.runtime is not None
        return self.host.runtime

    def session(self, client: str) -> str:
        return hmac.new(self.secret, client.encode(), hashlib.sha256).hexdigest()

    def allowed(self, request: http.Request) -> bool:
        access = self.current().access
        if not access.required:
            return True
        cookie = request.cookies.get(COOKIE, "")
        if any(matches(cookie, self.session(client)) for client in access.names()):
            return True
        return access.client(request.headers.items()) is not None

    def exchange(self, offered: str, path: str) -> http.Response:
        """The key, once, from the address bar: a cookie instead, and the key out of the address."""
        access = self.current().access
        client = access.client([(ACCESS_HEADER, offered)])
        if client is None:
            return refused(page=True)
        response = http.Response.make(303, b"", {"location": path, "cache-control": "no-store"})
        if access.required:
            response.headers["set-cookie"] = (
                f"{COOKIE}={self.session(client)}; Path=/; HttpOnly; SameSite=Strict"
            )
        return response

    def mask(self, flow: http.HTTPFlow) -> None:
        """What mitmweb and saved flows show: neither the key nor the session cookie."""
        request = flow.request
        if "key" in request.query:
            request.query["key"] = mask_secret(request.query["key"])
        if COOKIE in request.cookies:
            request.cookies[COOKIE] = mask_secret(request.cookies[COOKIE])

    # -- the summary ----------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What the page shows: /health's document, plus who is serving, history and incidents."""
        config = self.current().config
        self.timeline.sample(self.host.lasting.metrics)
        _, health = self.host.health()
        endpoints: list[dict[str, Any]] = health["endpoints"]
        serving = serving_endpoint(endpoints)
        shares = cache_read_shares(self.host.lasting.metrics)
        warm = Counter(name for _, name in self.current().router.caches.warm_sessions())
        for endpoint in endpoints:
            endpoint["state"] = SERVING if endpoint["name"] == serving else endpoint["status"]
            endpoint["reasonText"] = reason_text(endpoint["reason"], endpoint["lastStatus"])
            p50 = self.timeline.headers_p50(endpoint["name"])
            endpoint["timeToHeadersP50Ms"] = None if p50 is None else round(p50 * 1000, 1)
            endpoint["cacheReadShare"] = shares.get(endpoint["name"])
            endpoint["warmSessions"] = warm[endpoint["name"]]
            if endpoint["lastError"]:
                endpoint["lastErrorDetail"] = self.timeline.causes.get(endpoint["name"])
        endpoints += [
            {
                "name": e.name,
                "provider": e.provider,
                "baseUrl": e.base_url,
                "enabled": False,
                "state": DISABLED,
            }
            for e in config.endpoints
            if not e.enabled
        ]
        return {
            **health,
            "now": time.time(),
            "configSource": config.source or "built-in defaults",
            "serving": serving,
            "endpoints": endpoints,
            "history": self.timeline.history(e["name"] for e in endpoints if e["state"] != DISABLED),
            "incidents": self.timeline.recent_incidents(),
            "spend": spend_today(self.host.lasting.usage),
        }


def spend_today(usage: UsageStore) -> dict[str, Any] | None:
    """What each client and each endpoint spent since midnight (the proxy's time zone, from the
    hour it falls in), as the usage store last read it; None until it has been read once."""
    midnight = datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    since = hour_of(midnight.timestamp())
    rows = usage.totals(since)
    if rows is None:
        return None

    def by(what: str) -> list[dict[str, Any]]:
        return [
            {
                "name": client if what == "client" else endpoint,
                "requests": totals.requests,
                "costUsd": totals.cost,
                "billedUsd": totals.billed_usd,
            }
            for client, endpoint, _, totals in grouped(rows, what)
        ]

    return {"since": since, "clients": by("client"), "endpoints": by("endpoint")}


def cache_read_shares(metrics: Metrics) -> dict[str, float]:
    """Per endpoint, the share of prompt tokens read from its cache since the proxy started:
    `ccf_tokens_total` of kind cache_read over input, cache_read and cache_creation."""
    prompt: dict[str, float] = {}
    read: dict[str, float] = {}
    (tokens,) = metrics.collect(metrics.tokens)
    for family in tokens:
        for sample in family.samples:
            kind, name = sample.labels["kind"], sample.labels["endpoint"]
            if sample.name.endswith("_total") and kind in PROMPT_KINDS:
                prompt[name] = prompt.get(name, 0.0) + sample.value
                read[name] = read.get(name, 0.0) + (sample.value if kind == "cache_read" else 0.0)
    return {name: read[name] / total for name, total in prompt.items() if total}


def serving_endpoint(endpoints: list[dict[str, Any]]) -> str | None:
    """The usable endpoint that answered last; before any answer, the first usable one in order."""
    usable = [e for e in endpoints if e["status"] == HEALTHY]
    answered = [e for e in usable if e.get("lastSuccessAt")]
    if answered:  # ISO times of one format sort as strings
        return str(max(answered, key=lambda e: e["lastSuccessAt"])["name"])
    return str(usable[0]["name"]) if usable else None


def matches(offered: str, expected: str) -> bool:
    return hmac.compare_digest(offered.encode(), expected.encode())


def same_origin(flow: http.HTTPFlow) -> bool:
    """A browser says where a request comes from; the page's own fetch says same-origin.

    mitmproxy's reverse mode rewrites the Host header, so a browser without
    `Sec-Fetch-Site` is judged by its `Origin` against the address it connected to.
    """
    headers = flow.request.headers
    if site := headers.get("sec-fetch-site"):
        return site == "same-origin"
    origin = urlsplit(headers.get("origin", ""))
    sockname = flow.client_conn.sockname
    return bool(origin.hostname) and (origin.hostname, origin.port) == (sockname[0], sockname[1])


def refused(page: bool) -> http.Response:
    message = "This page needs the proxy's access key (server.accessKey)."
    if page:
        body = (
            "<!doctype html><meta charset=utf-8><title>Access key needed</title>"
            f"<p>{message} Open it once as <code>/?key=…</code>, or run <code>ccf open</code>.</p>"
        )
        return http.Response.make(401, body, {"content-type": "text/html; charset=utf-8"})
    return as_json(401, {"type": "error", "error": {"type": "authentication_error", "message": message}})


def reload_error() -> str:
    return "The config file is invalid; the running config is kept. See the proxy's log."


def as_json(status: int, document: object) -> http.Response:
    return http.Response.make(
        status, json.dumps(document), {"content-type": "application/json", "cache-control": "no-store"}
    )
