"""Load and validate the proxy's configuration.

The file format is the one the original Node tool reads (camelCase keys under ``endpoints``,
``server``, ``retry`` and ``logging``) plus our ``timeouts``, ``streaming`` and ``routing``
sections. Values are layered: built-in defaults, then the YAML file, then
``CLAUDE_FALLBACK_*`` environment variables, then command-line overrides. Each dataclass
field names its file key and the check that converts it, so that table is the whole schema.
Durations are milliseconds in the file and seconds in the dataclasses. Every problem found
is reported at once in one :class:`ConfigError` that says where the bad value came from
and what was expected.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import yaml

from .platforms import DEFAULT_BASE_URL, DEFAULT_PROVIDER, OAUTH_KEY_PREFIX, PLATFORMS

Check = Callable[[Any], Any]
_T = TypeVar("_T", bound="DataclassInstance")

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class ConfigError(Exception):
    """The configuration cannot be used; ``str(error)`` lists every problem, one per line."""


class _Text(str):
    """A string read from text (environment, command line, ``${VAR}``): may spell a number."""


class _Invalid(Exception):
    def __init__(self, expected: str, found: str | None = None, at: str = "") -> None:
        super().__init__(expected)
        self.expected, self.found = expected, found
        self.at = at  # where inside the value, when it is a list of mappings: `[1].budget.daily`


def _kind(value: object) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", _Text: "string"}
    names = kinds | {list: "list", dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _describe(value: object) -> str:
    # Long strings are never echoed: a misplaced API key must not end up in a log.
    if isinstance(value, str) and len(value) > 24:
        return f"a string of {len(value)} characters"
    return f"{_kind(value)} {value!r}" if isinstance(value, (str, int, float)) else _kind(value)


def _parsed(value: Any, parse: Callable[[str], Any]) -> Any:
    if isinstance(value, _Text):
        with contextlib.suppress(ValueError):
            return parse(value.strip())
    return value


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _boolean(value: Any) -> bool:
    value = _parsed(value, lambda text: _BOOL_WORDS.get(text.lower(), text))
    if not isinstance(value, bool):
        raise _Invalid("a boolean (true or false)", _describe(value))
    return value


@dataclass(frozen=True)
class _Number:
    """A number within bounds; with ``per_second`` 1000, milliseconds in the file become seconds."""

    low: float
    high: float = math.inf
    integer: bool = False
    per_second: float = 1

    @property
    def expected(self) -> str:
        noun = (
            "an integer" if self.integer else "a number" + (" of milliseconds" if self.per_second > 1 else "")
        )
        bounds = f"from {self.low:g} to {self.high:g}" if self.high < math.inf else f">= {self.low:g}"
        return f"{noun} {bounds}"

    def __call__(self, value: Any) -> float:
        value = _parsed(value, int if self.integer else float)
        kinds = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            raise _Invalid(self.expected, _describe(value))
        if not self.low <= value <= self.high:
            raise _Invalid(self.expected, _describe(value))
        return value if self.integer else value / self.per_second


def _number(low: float, high: float = math.inf, *, integer: bool = False, per_second: float = 1) -> Check:
    return _Number(low, high, integer, per_second)


def _ms(low: float = 1) -> Check:
    return _number(low, per_second=1000)


def _integer(low: int, high: float = math.inf) -> Check:
    return _number(low, high, integer=True)


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("a non-empty string", _describe(value))
    return str(value).strip()


def _secret(value: Any) -> str | None:
    if not isinstance(value, str):
        raise _Invalid("a string", _kind(value))
    return str(value) or None


def _choice(*names: str, **aliases: str) -> Check:
    table = {name: name for name in names} | aliases

    def check(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in table:
            raise _Invalid("one of " + ", ".join(table), _describe(value))
        return table[value.strip().lower()]

    return check


def _url(value: Any) -> str:
    expected = f"an http:// or https:// URL with a host, like {DEFAULT_BASE_URL}"
    if not isinstance(value, str):
        raise _Invalid(expected, _kind(value))
    # Describe what is wrong rather than echo the value: it may hold a key by mistake.
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise _Invalid(expected, "a URL with an invalid host or port") from None
    if parts.scheme not in ("http", "https"):
        raise _Invalid(expected, f"scheme {parts.scheme!r}" if parts.scheme else "no scheme")
    if not parts.hostname:
        raise _Invalid(expected, "no host")
    if parts.query or parts.fragment:
        raise _Invalid(expected, "a URL with a query string or fragment")
    return value.strip().rstrip("/")


def _pairs(what: str) -> Check:
    expected = f"a mapping of {what} to non-empty strings"

    def check(value: Any) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise _Invalid(expected, _kind(value))
        for key, item in value.items():
            if not isinstance(key, str) or not key or not isinstance(item, str) or not item:
                found = "empty string" if item == "" else _kind(item)  # values may be secrets
                raise _Invalid(expected, f"{found} at key {key!r}")
        return tuple((str(key), str(item)) for key, item in value.items())

    return check


def _statuses(value: Any) -> frozenset[int]:
    if isinstance(value, _Text):  # "429,503" from the command line
        value = [_Text(part) for part in value.split(",")]
    if not isinstance(value, list):
        raise _Invalid("a list of HTTP status codes", _kind(value))
    return frozenset(_STATUS(code) for code in value)


_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def _named_keys(value: Any) -> tuple[ClientKey, ...]:
    """`server.accessKeys`: a list of `{name, key}` (and a `budget`, if any), names unique and
    fit for a metric label."""
    expected = "a list of {name, key} with unique names of letters, digits, '_', '.', '-' (up to 32)"
    if not isinstance(value, list):
        raise _Invalid(expected, _kind(value))
    entries: dict[str, ClientKey] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not {"name", "key"} <= set(item) <= {"name", "key", "budget"}:
            raise _Invalid(expected, f"{_kind(item)} at [{i}]")
        name, key = item["name"], item["key"]
        if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name) or name in entries:
            raise _Invalid(expected, f"name {_describe(name)} at [{i}]")
        if not isinstance(key, str) or not key:
            raise _Invalid(expected, f"an empty or non-string key at [{i}]")  # never echo a key
        budget = _nested(Budget, item.get("budget"), f"[{i}].budget")
        entries[name] = ClientKey(name, key, budget)
    return tuple(entries.values())


def _nested(cls: type[_T], raw: object, at: str) -> _T:
    """A section inside one entry of a list, checked key by key as `_Reader.apply` checks a
    section; a problem names its place in the list (`at`)."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise _Invalid("a mapping", _kind(raw), at)
    schema, changes = _schema(cls), {}
    for key, value in raw.items():
        spec = schema.get(key)
        if spec is None:
            raise _Invalid(f"one of the keys {', '.join(schema)}", "an unknown key", f"{at}.{key}")
        if value is not None:
            try:
                changes[spec.name] = spec.metadata["check"](value)
            except _Invalid as e:
                raise _Invalid(e.expected, e.found or _kind(value), f"{at}.{key}") from None
    return replace(cls(), **changes)


def _timezone(value: Any) -> str:
    expected = "an IANA time zone name, like UTC, Europe/Paris or America/New_York"
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(expected, _describe(value))
    try:
        zoneinfo.ZoneInfo(value.strip())
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _Invalid(expected, f"{_describe(value)}, a zone this system does not know") from None
    return value.strip()


def _redis_url(value: Any) -> str:
    expected = "a redis://, rediss:// or unix:// URL"
    if not isinstance(value, str):
        raise _Invalid(expected, _kind(value))
    scheme = urlsplit(value.strip()).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise _Invalid(expected, f"scheme {scheme!r}" if scheme else "no scheme")
    return value.strip()


TELEMETRY_MODULE = "opentelemetry.exporter.otlp.proto.http"  # what the otel extra brings
TELEMETRY_INSTALL = "pip install 'claude-code-fallback[otel]'"
_REQUIRED: Any = object()
_DEFAULT_STATUSES = frozenset({429, 500, 502, 503, 504, 529})


def _key(
    name: str,
    check: Check,
    default: Any = _REQUIRED,
    secret: bool = False,
    *,
    doc: str,
    shown: str = "",
    entries: type | None = None,
) -> Any:
    """A dataclass field read from the file key ``name`` and converted by ``check``.

    ``doc`` is the key's meaning in one line and ``shown`` its default in words where the
    value alone would mislead (a default worked out from other keys or the environment):
    the configuration reference is rendered from them (`reference`). For an endpoint key,
    each platform's own words for it come first (`_on_platforms`). A list whose entries are
    mappings names their dataclass (`entries`), whose keys the reference lists under it.
    """
    metadata = {"key": name, "check": check, "doc": doc, "shown": shown, "entries": entries}
    options: dict[str, Any] = {"metadata": metadata, "repr": not secret}
    return field(**options) if default is _REQUIRED else field(default=default, **options)


_PORT, _STATUS = _integer(1, 65535), _integer(400, 599)
_LEVEL = _choice("trace", "debug", "info", "warn", "error", warning="warn")


def _either(words: list[str]) -> str:
    return ", ".join(words[:-1]) + ", or " + words[-1] if len(words) > 1 else "".join(words)


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its parent package is not there either
        return True


@dataclass(frozen=True)
class Endpoint:
    """One upstream API, tried in configuration order: Anthropic's own, or Claude on a platform."""

    name: str = _key(
        "name",
        _string,
        doc="Unique; names the endpoint in logs, metrics, `/health` and the status page",
        shown="the host of `baseUrl`, with `-2`, `-3`… when hosts repeat",
    )
    base_url: str = _key(
        "baseUrl",
        _url,
        doc="`http(s)://host[:port][/path/prefix]`; the request path is appended, a trailing slash dropped",
    )
    provider: str = _key(
        "provider",
        _choice(*PLATFORMS),
        default=DEFAULT_PROVIDER,
        doc="Which platform serves it: " + _either([platform.title for platform in PLATFORMS.values()]),
    )
    api_key: str | None = _key(
        "apiKey",
        _secret,
        default=None,
        secret=True,
        doc="The key sent upstream; without one, the client's own `x-api-key`/`Authorization` pass "
        "through (on a cloud: the platform's credentials sign instead)",
        shown="else none",
    )
    auth_header: str | None = _key(
        "authHeader",
        _choice("x-api-key", "bearer", "oauth"),
        default=None,
        doc="How the key is sent: `x-api-key: <key>`, `Authorization: Bearer <key>`, or `oauth` "
        "(a subscription's token: bearer plus the `oauth-2025-04-20` beta)",
        shown="`oauth` for an `sk-ant-oat…` key, else `x-api-key`",
    )
    headers: tuple[tuple[str, str], ...] = _key(
        "headers", _pairs("header names"), (), secret=True, doc="Extra request headers, in this order"
    )
    models: tuple[tuple[str, str], ...] = _key(
        "models",
        _pairs("model names"),
        default=(),
        doc='Client model → model at this endpoint; `"*"` for every model without an entry of its own',
    )
    enabled: bool = _key(
        "enabled", _boolean, default=True, doc="`false` keeps the endpoint in the file but never sends to it"
    )
    region: str | None = _key(
        "region",
        _string,
        default=None,
        doc="A cloud platform's region",
        shown="none: a cloud endpoint needs one, from here or the environment",
    )
    project: str | None = _key(
        "project",
        _string,
        default=None,
        doc="The cloud project the requests go to",
        shown="the credentials' project",
    )
    aws_profile: str | None = _key(
        "awsProfile",
        _string,
        default=None,
        doc="The AWS profile whose credentials sign the requests",
        shown="`AWS_PROFILE`, else AWS's default credential chain",
    )
    max_tokens_field: str = _key(
        "maxTokensField",
        _choice("max_tokens", "max_completion_tokens"),
        default="max_tokens",
        doc="The field that carries the token limit; some models want `max_completion_tokens`",
    )

    @property
    def auth(self) -> str:
        """How the key is sent: `authHeader`, else `oauth` for a subscription token, else `x-api-key`."""
        if self.auth_header:
            return self.auth_header
        return "oauth" if (self.api_key or "").startswith(OAUTH_KEY_PREFIX) else "x-api-key"

    def map_model(self, model: str) -> str:
        """The model name to send here: an exact entry, else the ``*`` entry, else unchanged."""
        return self.mapped_model(model) or model

    def mapped_model(self, model: str) -> str | None:
        """The exact entry of ``models``, else its ``*`` entry; None when neither is there."""
        table = dict(self.models)
        return table.get(model, table.get("*"))


@dataclass(frozen=True)
class Timeouts:
    """Deadlines in seconds; see config.example.yaml for what each one bounds."""

    connect: float = _key(
        "connect", _ms(), default=10.0, doc="To open a connection to an endpoint, TLS included"
    )
    first_byte: float = _key(
        "firstByte", _ms(), default=30.0, doc="Streaming requests: to the response headers"
    )
    response: float = _key(
        "response",
        _ms(),
        default=600.0,
        doc="Non-streaming requests: to the response headers (they may think for minutes)",
    )
    idle: float = _key("idle", _ms(), default=90.0, doc="The longest silence inside a stream")
    total: float = _key(
        "total",
        _ms(),
        default=600.0,
        doc="One client request, across all attempts and backoffs, until a response is chosen",
    )


@dataclass(frozen=True)
class Retry:
    """Retry, backoff, cooldown and retry-budget settings; delays in seconds."""

    enabled: bool = _key(
        "enabled",
        _boolean,
        default=True,
        doc="`false`: still fail over to each healthy endpoint once, never wait to retry one that failed",
    )
    initial_delay: float = _key(
        "initialDelay", _ms(0), default=1.0, doc="The first backoff, once no healthy endpoint is left"
    )
    max_delay: float = _key("maxDelay", _ms(0), default=60.0, doc="The longest backoff")
    backoff_factor: float = _key(
        "backoffFactor", _number(1), default=2.0, doc="Each backoff is the previous one times this"
    )
    max_retries: int = _key("maxRetries", _integer(1), default=3, doc="Attempts per endpoint per request")
    cooldown_seconds: float = _key(
        "cooldownSeconds",
        _number(0),
        default=300.0,
        doc="Seconds a failed endpoint is skipped (its `Retry-After`, if longer); then one request probes it",
    )
    max_wait_seconds: float = _key(
        "maxWaitSeconds",
        _number(0),
        default=5.0,
        doc="Seconds one request may wait in all for an endpoint to come back; when none is expected "
        "back within that, the client gets the endpoints' answer at once (a 429 with the soonest "
        "`retry-after`)",
    )
    credentials_failover: bool = _key(
        "credentialsFailover",
        _boolean,
        default=True,
        doc="A 401 or 403 to credentials the proxy chose (an endpoint's key, a cloud role) fails over "
        "and cools the endpoint; `false`: it goes back to the client as it came",
    )
    credentials_cooldown_seconds: float = _key(
        "credentialsCooldownSeconds",
        _number(0),
        default=3600.0,
        doc="Seconds an endpoint that refused the proxy's credentials is skipped; a config reload "
        "ends it sooner",
    )
    statuses: frozenset[int] = _key(
        "statuses",
        _statuses,
        default=_DEFAULT_STATUSES,
        doc="Upstream statuses that fail over; any other goes back to the client untouched",
    )
    budget_ratio: float = _key(
        "budgetRatio",
        _number(0),
        default=0.2,
        doc="Retry budget: retries to endpoints that already failed, as a fraction of client requests",
    )
    budget_min_retries: int = _key(
        "budgetMinRetries",
        _integer(0),
        default=10,
        doc="Retry budget: such retries always allowed in each 10-second window",
    )


_USD = _number(0)


@dataclass(frozen=True)
class Budget:
    """Spending caps in US dollars per calendar window (in `server.budgetTimezone`), of one client
    (`server.accessKeys[].budget`) or of all together (`server.budget`); none by default. What
    an answer bills counts once it has ended (cost/budgets.py)."""

    daily: float | None = _key(
        "daily", _USD, default=None, doc="US dollars per calendar day", shown="none (no cap)"
    )
    weekly: float | None = _key(
        "weekly", _USD, default=None, doc="US dollars per ISO week, from Monday 00:00", shown="none (no cap)"
    )
    monthly: float | None = _key(
        "monthly", _USD, default=None, doc="US dollars per calendar month", shown="none (no cap)"
    )

    def limits(self) -> dict[str, float]:
        """The windows that have a cap, and their caps: `{"daily": 20.0}`."""
        caps = {"daily": self.daily, "weekly": self.weekly, "monthly": self.monthly}
        return {window: cap for window, cap in caps.items() if cap is not None}


@dataclass(frozen=True)
class ClientKey:
    """One named client key of `server.accessKeys`."""

    name: str = _key(
        "name",
        _string,
        doc="Unique, of letters, digits, `_`, `.`, `-` (up to 32); names the client in logs, metrics "
        "(`client` label), `/health` and the status page",
        shown="required",
    )
    key: str = _key(
        "key",
        _string,
        secret=True,
        doc="What the client presents; compared in constant time, never forwarded",
        shown="required",
    )
    budget: Budget = field(default_factory=Budget, metadata={"key": "budget", "section": True, "check": None})


@dataclass(frozen=True)
class Server:
    """Where the proxy listens and what it accepts."""

    port: int = _key("port", _PORT, default=8765, doc="The port the proxy listens on")
    host: str = _key(
        "host",
        _string,
        default="127.0.0.1",
        doc="The address it listens on; `127.0.0.1` is this machine only",
    )
    access_key: str | None = _key(
        "accessKey",
        _secret,
        default=None,
        secret=True,
        doc="Clients must present it (`x-ccf-access-key`, or as their `x-api-key` or bearer token); "
        "never forwarded",
        shown="none: every client is served",
    )
    access_keys: tuple[ClientKey, ...] = _key(
        "accessKeys",
        _named_keys,
        default=(),
        secret=True,
        doc="Named client keys, `[{name, key, budget}]`; the name shows in logs, metrics and `/health`",
        entries=ClientKey,
    )
    # the whole proxy's, every client together
    budget: Budget = field(default_factory=Budget, metadata={"key": "budget", "section": True, "check": None})
    budget_timezone: str = _key(
        "budgetTimezone",
        _timezone,
        default="UTC",
        doc="Where the budgets' days, weeks and months begin and end",
    )
    metrics_port: int | None = _key(
        "metricsPort",
        _PORT,
        default=None,
        doc="A second listener that serves only Prometheus's `/metrics`",
        shown="none (off)",
    )
    max_body_bytes: int = _key(
        "maxBodyBytes",
        _integer(1),
        default=32 * 1024 * 1024,
        doc="A larger request body, with or without `content-length`, gets Anthropic's 413 "
        "`request_too_large`; it is read and dropped, never kept in memory (the addon sets mitmproxy's "
        "`stream_large_bodies` to this)",
    )
    workers: int = _key(
        "workers",
        _integer(1, 64),
        default=1,
        doc="Processes serving the port under `ccf start` and `ccf dev`",
    )
    drain_seconds: float = _key(
        "drainSeconds",
        _number(0),
        default=600.0,
        doc="How long a stop or a restart lets answers in flight finish before it ends them; "
        "Claude Code itself gives up on an answer after 600 s",
    )


@dataclass(frozen=True)
class Logging:
    """Log level (normalized, ``warning`` becomes ``warn``), format and key redaction."""

    level: str = _key("level", _LEVEL, default="info", doc="The lowest level logged")
    format: str = _key(
        "format",
        _choice("json", "pretty"),
        default="json",
        doc="`json`, one object a line, or `pretty` for reading in a terminal",
    )
    redact_keys: bool = _key(
        "redactKeys", _boolean, default=True, doc="Mask keys in logs and flows: `sk-ant-…abcd`"
    )


@dataclass(frozen=True)
class Streaming:
    """How much of a stream may be held back before committing to an endpoint."""

    resume: bool = _key(
        "resume", _boolean, default=False, doc="Continue a stream that breaks mid-answer on the next endpoint"
    )
    hold_max: float = _key(
        "holdMaxMs",
        _ms(0),
        default=15.0,
        doc="How long a stream's preamble may be held while it can still fail over",
    )
    hold_max_bytes: int = _key(
        "holdMaxBytes", _integer(0), default=65536, doc="How many bytes of a stream's preamble may be held"
    )
    ratelimit_threshold: int = _key(
        "ratelimitThreshold",
        _integer(0),
        default=0,
        doc="An `anthropic-ratelimit-*-remaining` at or below this cools the endpoint until its reset",
    )


@dataclass(frozen=True)
class RedisSettings:
    """Where the shared state lives and how long the proxy waits for it."""

    url: str | None = _key(
        "url",
        _redis_url,
        default=None,
        secret=True,
        doc="The Redis to share through (required with `backend: redis`); a password goes in the URL",
    )
    key_prefix: str = _key(
        "keyPrefix", _string, default="ccf:", doc="Put before every key, so that fleets can share one Redis"
    )
    timeout: float = _key(
        "timeout",
        _ms(),
        default=0.05,
        doc="The longest a request waits for Redis (to claim a probe, to look up a session); "
        "a healthy request never waits",
    )


@dataclass(frozen=True)
class State:
    """Where endpoint state lives: this process only, or shared by a fleet through Redis."""

    backend: str = _key(
        "backend",
        _choice("memory", "redis"),
        default="memory",
        doc="`memory`: this process only; `redis`: endpoint state shared by every instance on that Redis",
    )
    redis: RedisSettings = field(
        default_factory=RedisSettings, metadata={"key": "redis", "section": True, "check": None}
    )
    usage_file: str | None = _key(
        "usageFile",
        _string,
        default=None,
        doc="The SQLite file that keeps what each client spent (`ccf usage` reads it), relative to the "
        "config file's folder; with `backend: redis` the fleet's Redis keeps it instead",
        shown="`usage.db` in ccf's home (`$CLAUDE_FALLBACK_HOME`, else `~/.claude-code-fallback`)",
    )


@dataclass(frozen=True)
class Routing:
    """Which usable endpoint a request goes to first; see routing.py."""

    strategy: str = _key(
        "strategy",
        _choice("priority", "least-utilized"),
        default="priority",
        doc="`priority`: the configured order; `least-utilized`: the endpoint whose fullest usage "
        "window is emptiest",
    )
    session_affinity: bool = _key(
        "sessionAffinity",
        _boolean,
        default=True,
        doc="With `least-utilized`, a session stays on the endpoint that last served it while it is usable; "
        "`false` turns `cacheAware` off too",
    )
    step_aside_at: float | None = _key(
        "stepAsideAt",
        _number(0, 1),
        default=None,
        doc="A fraction: an endpoint whose fullest window is at or above it is skipped while another "
        "is usable",
        shown="none (off)",
    )
    cache_aware: bool = _key(
        "cacheAware",
        _boolean,
        default=True,
        doc="Keep each session where its prompt cache is warm: a tool loop where it began, a session "
        "back from a failover while that is cheaper than a cache rebuild, a session that must move "
        "where its cache is warm (off with `sessionAffinity: false`)",
    )
    cache_ttl_scale: float = _key(
        "cacheTtlScale",
        _number(0.001, 10),
        default=1.0,
        doc="Multiplies the prompt-cache lifetimes the routing assumes (5 minutes, or an hour for "
        '`"ttl": "1h"`)',
    )


_RATE_KEYS = ("input", "output", "cacheWrite5m", "cacheWrite1h", "cacheRead")
_PRICE_SHAPE = (
    "{input, output, cacheWrite5m, cacheWrite1h, cacheRead, longContext} (input and output required)"
)


def _price(value: Any, at: str, long: bool = False) -> dict[str, Any]:
    """One model's prices in US dollars per million tokens, checked key by key; a problem
    names its place (`at`: `.claude-opus-4-8.input`)."""
    shape = "{above, input, output, cacheWrite5m, cacheWrite1h, cacheRead}" if long else _PRICE_SHAPE
    if not isinstance(value, dict):
        raise _Invalid(f"a mapping {shape}", _kind(value), at)
    allowed = ("above", *_RATE_KEYS) if long else (*_RATE_KEYS, "longContext")
    for key in value:
        if key not in allowed:
            raise _Invalid(f"one of the keys {', '.join(allowed)}", "an unknown key", f"{at}.{key}")
    for key in ("above", "input", "output") if long else ("input", "output"):
        if value.get(key) is None:
            raise _Invalid("a number >= 0", "nothing: it is required", f"{at}.{key}")
    checked: dict[str, Any] = {}
    for key, item in value.items():
        if key == "longContext":
            checked[key] = _price(item, f"{at}.longContext", long=True)
            continue
        check = _integer(0) if key == "above" else _number(0)
        try:
            checked[key] = check(item)
        except _Invalid as e:
            unit = "" if key == "above" else " (US dollars per million tokens)"
            raise _Invalid(e.expected + unit, e.found, f"{at}.{key}") from None
    return checked


def _model_prices(value: Any, at: str = "") -> tuple[tuple[str, dict[str, Any]], ...]:
    """`pricing.models`: model name -> its prices; `*` stands for every model (on an endpoint)."""
    expected = f"a mapping of model names to prices {_PRICE_SHAPE}"
    if not isinstance(value, dict):
        raise _Invalid(expected, _kind(value), at)
    for name in value:
        if not isinstance(name, str) or not name.strip():
            raise _Invalid(expected, f"model name {_describe(name)}", at)
    return tuple((str(name), _price(spec, f"{at}.{name}")) for name, spec in value.items())


def _endpoint_prices(value: Any) -> tuple[tuple[str, tuple[tuple[str, dict[str, Any]], ...]], ...]:
    """`pricing.endpoints`: endpoint name -> model name (or `*`) -> its prices."""
    expected = 'a mapping of endpoint names to mappings of model names (or "*") to prices'
    if not isinstance(value, dict):
        raise _Invalid(expected, _kind(value))
    return tuple((str(name), _model_prices(models, f".{name}")) for name, models in value.items())


@dataclass(frozen=True)
class Pricing:
    """What tokens cost, in US dollars per million, over the prices this version ships (cost/prices.yaml)."""

    models: tuple[tuple[str, dict[str, Any]], ...] = _key(
        "models",
        _model_prices,
        default=(),
        doc="Model name → `{input, output, cacheWrite5m, cacheWrite1h, cacheRead, longContext: {above, "
        "input, output, …}}` in US dollars per million tokens; adds a model or replaces its shipped "
        "prices. A cache price left out is its multiple of `input` (1.25, 2, 0.1)",
        shown="none: the shipped prices",
    )
    endpoints: tuple[tuple[str, tuple[tuple[str, dict[str, Any]], ...]], ...] = _key(
        "endpoints",
        _endpoint_prices,
        default=(),
        doc='Endpoint name → model name or `"*"` (every model) → prices of the same shape; they come '
        "first on that endpoint, and are the only prices an OpenAI-format endpoint has",
        shown="none",
    )


_SAMPLERS = (
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
    "always_on",
    "always_off",
    "traceidratio",
)


@dataclass(frozen=True)
class Telemetry:
    """OpenTelemetry: a trace of each request, and metrics, sent over OTLP/HTTP (telemetry/).

    A key left unset leaves the standard `OTEL_*` variable, else the SDK's default, in force;
    one that is set wins over its variable.
    """

    enabled: bool = _key(
        "enabled",
        _boolean,
        default=False,
        doc="Send a trace of each request (and with `metrics`, metrics) to an OTLP/HTTP collector; "
        "needs the `otel` extra",
    )
    endpoint: str | None = _key(
        "endpoint",
        _url,
        default=None,
        doc="The collector's OTLP/HTTP base URL; `/v1/traces` and `/v1/metrics` are appended",
        shown="`OTEL_EXPORTER_OTLP_ENDPOINT`, else `http://localhost:4318`",
    )
    headers: tuple[tuple[str, str], ...] = _key(
        "headers",
        _pairs("header names"),
        default=(),
        secret=True,
        doc="Headers sent with every export, such as a vendor's API key",
        shown="`OTEL_EXPORTER_OTLP_HEADERS`, else none",
    )
    service_name: str | None = _key(
        "serviceName",
        _string,
        default=None,
        doc="The `service.name` the proxy's spans and metrics carry",
        shown="`OTEL_SERVICE_NAME`, else `claude-code-fallback`",
    )
    resource_attributes: tuple[tuple[str, str], ...] = _key(
        "resourceAttributes",
        _pairs("attribute names"),
        default=(),
        doc="Resource attributes (`deployment.environment.name: prod`), over those of "
        "`OTEL_RESOURCE_ATTRIBUTES`",
        shown="`OTEL_RESOURCE_ATTRIBUTES`, else none",
    )
    sampler: str | None = _key(
        "sampler",
        _choice(*_SAMPLERS),
        default=None,
        doc="Which requests are traced; the `parentbased_` samplers follow a client's `traceparent`",
        shown="`OTEL_TRACES_SAMPLER`, else `parentbased_always_on`",
    )
    sampler_arg: float | None = _key(
        "samplerArg",
        _number(0, 1),
        default=None,
        doc="The share of requests a `traceidratio` sampler traces",
        shown="`OTEL_TRACES_SAMPLER_ARG`, else 1",
    )
    metrics: bool = _key(
        "metrics",
        _boolean,
        default=False,
        doc="Also send the `/metrics` series and the GenAI client metrics over OTLP, beside Prometheus",
    )
    export_interval: float | None = _key(
        "exportInterval",
        _ms(),
        default=None,
        doc="How often metrics are sent, with `metrics`",
        shown="`OTEL_METRIC_EXPORT_INTERVAL`, else 60000",
    )
    schedule_delay: float | None = _key(
        "scheduleDelay",
        _ms(),
        default=None,
        doc="How long ended spans wait, at most, to be sent together",
        shown="`OTEL_BSP_SCHEDULE_DELAY`, else 5000",
    )
    max_queue_size: int | None = _key(
        "maxQueueSize",
        _integer(1),
        default=None,
        doc="Ended spans waiting to be sent, at most; while the collector is slow or away, more are "
        "dropped and counted in `ccf_telemetry_spans_dropped_total`, and no request waits",
        shown="`OTEL_BSP_MAX_QUEUE_SIZE`, else 2048",
    )
    timeout: float | None = _key(
        "timeout",
        _ms(),
        default=None,
        doc="The longest one export may take, retries included",
        shown="`OTEL_EXPORTER_OTLP_TIMEOUT`, else 10000",
    )


_SECTIONS: dict[str, type] = {
    "server": Server,
    "retry": Retry,
    "logging": Logging,
    "timeouts": Timeouts,
    "streaming": Streaming,
    "routing": Routing,
    "state": State,
    "pricing": Pricing,
    "telemetry": Telemetry,
}
_ENV_OPTIONS = {
    "CLAUDE_FALLBACK_PORT": "server.port",
    "CLAUDE_FALLBACK_HOST": "server.host",
    "CLAUDE_FALLBACK_WORKERS": "server.workers",
    "CLAUDE_FALLBACK_LOG_LEVEL": "logging.level",
}


@dataclass(frozen=True)
class Config:
    """The validated configuration: endpoints in failover order plus one value per section."""

    endpoints: tuple[Endpoint, ...]
    server: Server = field(default_factory=Server)
    retry: Retry = field(default_factory=Retry)
    logging: Logging = field(default_factory=Logging)
    timeouts: Timeouts = field(default_factory=Timeouts)
    streaming: Streaming = field(default_factory=Streaming)
    routing: Routing = field(default_factory=Routing)
    state: State = field(default_factory=State)
    pricing: Pricing = field(default_factory=Pricing)
    telemetry: Telemetry = field(default_factory=Telemetry)
    source: str | None = None

    @property
    def active_endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(endpoint for endpoint in self.endpoints if endpoint.enabled)


def _schema(cls: Any) -> dict[str, Field[Any]]:
    return {f.metadata["key"]: f for f in fields(cls) if "key" in f.metadata}


@dataclass
class _Reader:
    """Checks values from one source, recording each problem prefixed with that source."""

    source: str
    problems: list[str]
    env: Mapping[str, str] = field(default_factory=dict)  # for the platforms' defaults

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{self.source}: {path}: {message}")

    def mapping(self, raw: object, path: str) -> dict[Any, Any]:
        if raw is None:  # an empty section, e.g. one whose keys are all commented out
            return {}
        if not isinstance(raw, dict):
            self.fail(path, f"expected a mapping, got {_kind(raw)}")
            return {}
        return raw

    def apply(self, base: _T, raw: object, path: str) -> _T:
        """``base`` updated with the checked keys of ``raw``; a null value keeps the default."""
        schema, changes = _schema(type(base)), {}
        for key, value in self.mapping(raw, path).items():
            spec, where = schema.get(key), f"{path}.{key}"
            if spec is None:
                self.fail(where, f"unknown key; expected one of {', '.join(schema)}")
            elif spec.metadata.get("section"):
                changes[spec.name] = self.apply(getattr(base, spec.name), value, where)
            elif value is not None:
                try:
                    changes[spec.name] = spec.metadata["check"](value)
                except _Invalid as e:
                    self.fail(where + e.at, f"expected {e.expected}, got {e.found or _kind(value)}")
        return replace(base, **changes)

    def set_option(self, sections: dict[str, Any], dotted: str, value: object) -> None:
        section, _, key = dotted.partition(".")
        if section not in sections or not key:
            expected = f"<section>.<key> with a section among {', '.join(sections)}"
            self.fail(dotted, f"unknown option; expected {expected}")
            return
        value = _Text(value) if isinstance(value, str) else value
        sections[section] = self.apply(sections[section], {key: value}, section)

    def endpoints(self, raw: object, path: str) -> list[Endpoint] | None:
        if not isinstance(raw, list):
            self.fail(path, f"expected a list of endpoints, got {_kind(raw)}")
            return None
        if not raw:
            self.fail(path, "no endpoint configured; list at least one")
            return None
        template, before = Endpoint(name="", base_url=""), len(self.problems)
        parsed = [
            self.platform(
                self.apply(template, {"baseUrl": item} if isinstance(item, str) else item, f"{path}[{i}]"),
                f"{path}[{i}]",
            )
            for i, item in enumerate(raw)
        ]
        used: dict[str, int] = {}
        for i, endpoint in enumerate(parsed):
            if endpoint.name in used:
                other = f"{path}[{used[endpoint.name]}]"
                self.fail(f"{path}[{i}].name", f"{endpoint.name!r} is already used by {other}")
            elif endpoint.name:
                used[endpoint.name] = i
        for i, endpoint in enumerate(parsed):
            if not endpoint.name:  # name it after its host, as the Node tool does
                host = name = urlsplit(endpoint.base_url).hostname or "endpoint"
                suffix = 2
                while name in used:
                    name, suffix = f"{host}-{suffix}", suffix + 1
                used[name] = i
                parsed[i] = replace(endpoint, name=name)
        if len(self.problems) > before:
            return None
        if not any(endpoint.enabled for endpoint in parsed):
            self.fail(path, "every endpoint is disabled; enable at least one")
            return None
        return parsed

    def platform(self, endpoint: Endpoint, path: str) -> Endpoint:
        """The endpoint with its platform's defaults filled in from the environment, as the
        platform's own SDK fills them (`platforms.py` says how); a key that its
        provider does not use is a mistake, and one that it cannot do without is asked for."""
        platform, schema = PLATFORMS[endpoint.provider], _schema(Endpoint)
        for key in _PLATFORM_KEYS:
            spec = schema[key]
            if key not in platform.takes and getattr(endpoint, spec.name) != spec.default:
                takers = ", ".join(p.name for p in PLATFORMS.values() if key in p.takes)
                self.fail(f"{path}.{key}", f"not used by provider {platform.name} (only by {takers})")
        if platform.extra and _absent(platform.extra[1]):
            extra = platform.extra[0]
            self.fail(
                f"{path}.provider", f"{platform.name} needs the {extra} extra; install it: {platform.install}"
            )
        found: dict[str, Any] = {}
        for key, names in platform.variables.items():
            name = schema[key].name
            # the key last: whether it may go depends on where the endpoint is (`key_goes_to`)
            if key != "apiKey" and not getattr(endpoint, name) and (value := self.variable(names)):
                found[name] = value.rstrip("/") if key == "baseUrl" else value
        endpoint = replace(endpoint, **found)
        missing = [key for key in platform.required if not getattr(endpoint, schema[key].name)]
        for key in missing:
            variables = platform.variables.get(key)
            more = f"; or set {variables[0]}" if variables else ""
            self.fail(f"{path}.{key}", f"required for provider {platform.name}{more}{platform.required[key]}")
        if missing:
            return endpoint
        if not endpoint.base_url and platform.url:
            endpoint = replace(endpoint, base_url=platform.url(endpoint.region))
        if not endpoint.api_key and platform.key_goes_to(endpoint.base_url):
            endpoint = replace(endpoint, api_key=self.variable(platform.variables.get("apiKey", ())))
        return endpoint

    def variable(self, names: tuple[str, ...]) -> str | None:
        """The value of the first of the environment variables `names` that is set."""
        return next((self.env[name] for name in names if self.env.get(name)), None)


# The endpoint keys that some platforms take and others refuse, in the file's order.
_PLATFORM_KEYS = [key for key in _schema(Endpoint) if any(key in p.takes for p in PLATFORMS.values())]


@dataclass(frozen=True)
class KeyDoc:
    """One key of the configuration file, as the configuration reference shows it."""

    path: str  # as problems name it: server.port, endpoints[].apiKey, state.redis.url
    accepts: str  # what its check accepts, in the words of its error message
    default: Any  # in the file's units: milliseconds where the file takes milliseconds
    shown: str  # the default in words, where the value alone would mislead
    variables: tuple[str, ...]  # the environment variables that set it
    doc: str


def reference() -> list[KeyDoc]:
    """Every key of the file, in schema order, described by its field's metadata.

    The environment variables come from the tables that read them (`_ENV_OPTIONS`, each
    platform's `variables`), so the reference cannot name one the code ignores.
    """
    docs = [
        KeyDoc(
            "endpoints",
            "a list of endpoints, each a mapping or a URL",
            None,
            f"one endpoint, `default`, at `{DEFAULT_BASE_URL}`",
            ("CLAUDE_FALLBACK_ENDPOINTS",),
            "The upstream endpoints, tried in this order; the variable (a JSON array, or "
            "comma-separated URLs) replaces the whole list",
        )
    ]
    docs += [_on_platforms(doc) for doc in _key_docs(Endpoint, "endpoints[]")]
    for name, cls in _SECTIONS.items():
        docs += _key_docs(cls, name)
    return docs


def _key_docs(cls: type, prefix: str) -> list[KeyDoc]:
    docs = []
    for spec in fields(cls):
        if "key" not in spec.metadata:
            continue
        path = f"{prefix}.{spec.metadata['key']}"
        if spec.metadata.get("section"):
            docs += _key_docs(spec.default_factory, path)  # type: ignore[arg-type]
            continue
        check, default = spec.metadata["check"], None if spec.default is MISSING else spec.default
        try:
            check(object())  # nothing passes a check: its complaint says what it takes
            accepts = ""
        except _Invalid as e:
            accepts = e.expected
        if isinstance(check, _Number) and isinstance(default, float):
            default = round(default * check.per_second, 6)
            default = int(default) if default.is_integer() else default
        meta = spec.metadata
        docs.append(KeyDoc(path, accepts, default, meta["shown"], _variables(path), meta["doc"]))
        if meta.get("entries") is not None:
            docs += _key_docs(meta["entries"], f"{path}[]")
    return docs


def _variables(path: str) -> tuple[str, ...]:
    """The environment variables that set the option at `path`, as `load_config` reads them."""
    return tuple(variable for variable, option in _ENV_OPTIONS.items() if option == path)


def _on_platforms(doc: KeyDoc) -> KeyDoc:
    """An endpoint key as the platforms see it: which of them take it or need it, what each
    adds to its meaning and its default, and the variables each reads for it."""
    key, platforms = doc.path.removeprefix("endpoints[]."), PLATFORMS.values()
    takers = [p.name for p in platforms if key in p.takes]
    needers = [p.name for p in platforms if key in p.required]
    meaning = "; ".join(dict.fromkeys([doc.doc, *(p.notes[key] for p in platforms if key in p.notes)]))
    if takers:
        meaning += f". Only for provider {_names(takers)}" + (", which need it" if needers == takers else "")
    if needers and needers != takers:
        meaning += f". Required with provider {_names(needers)}"
    shown = [*(p.defaults[key] for p in platforms if key in p.defaults), doc.shown]
    variables = [*doc.variables, *(name for p in platforms for name in p.variables.get(key, ()))]
    return replace(
        doc,
        doc=meaning,
        shown="; ".join(dict.fromkeys(words for words in shown if words)),
        variables=tuple(dict.fromkeys(variables)),
    )


def _names(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string value (not in keys)."""
    if isinstance(value, dict):
        return {key: _interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, env) for item in value]
    if isinstance(value, str) and "${" in value:
        return _Text(_REFERENCE.sub(lambda m: env.get(m[1]) or m[2] or "", value))
    return value


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: cannot read config file: it is not UTF-8 text") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: invalid YAML at {where}: {getattr(e, 'problem', None) or e}") from e


def _env_endpoints(text: str) -> object:
    """``CLAUDE_FALLBACK_ENDPOINTS``: a JSON array of endpoints or comma-separated URLs."""
    if text.startswith(("[", "{")):
        return json.loads(text)
    return [url.strip() for url in text.split(",") if url.strip()]


def default_config_path(env: Mapping[str, str]) -> Path:
    """``$CLAUDE_FALLBACK_HOME/config.yaml``, else ``~/.claude-code-fallback/config.yaml``."""
    if home := env.get("CLAUDE_FALLBACK_HOME"):
        return Path(home).expanduser() / "config.yaml"
    user_home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return user_home / ".claude-code-fallback" / "config.yaml"


def load_config(
    path: str | Path | None,
    env: Mapping[str, str],
    overrides: Mapping[str, object] | None = None,
    default_base_url: str = DEFAULT_BASE_URL,
) -> Config:
    """Read, layer and validate the configuration; raise ConfigError listing every problem."""
    if path is not None:
        file: Path | None = Path(path).expanduser()
    elif (default_file := default_config_path(env)).is_file():
        file = default_file
    else:
        file = None  # no file at all is fine: defaults and environment only
    data = _interpolate(_read_yaml(file), env) if file else None
    problems: list[str] = []
    reader = _Reader(str(file) if file else "defaults", problems, env)
    top = reader.mapping(data, "top level")
    for key in top:
        if key not in {"endpoints", *_SECTIONS}:
            reader.fail(str(key), f"unknown key; expected one of endpoints, {', '.join(_SECTIONS)}")
    sections = {name: reader.apply(cls(), top.get(name), name) for name, cls in _SECTIONS.items()}
    default = Endpoint(name="default", base_url=default_base_url)
    endpoints: list[Endpoint] | None = [reader.platform(default, "endpoints")]
    if top.get("endpoints") is not None:
        endpoints = reader.endpoints(top["endpoints"], "endpoints")

    if env_endpoints := env.get("CLAUDE_FALLBACK_ENDPOINTS", "").strip():
        reader = _Reader("environment", problems, env)
        try:
            raw = _env_endpoints(env_endpoints)
        except json.JSONDecodeError as e:
            where = f"line {e.lineno}, column {e.colno}"
            reader.fail("CLAUDE_FALLBACK_ENDPOINTS", f"invalid JSON at {where}: {e.msg}")
        else:
            endpoints = reader.endpoints(raw, "CLAUDE_FALLBACK_ENDPOINTS")
    for variable, option in _ENV_OPTIONS.items():
        if text := env.get(variable, "").strip():
            _Reader(f"environment variable {variable}", problems).set_option(sections, option, text)
    for option, value in (overrides or {}).items():
        _Reader("command line", problems).set_option(sections, option, value)

    state = sections["state"]
    if state.backend == "redis" and not state.redis.url:
        _Reader(str(file) if file else "defaults", problems).fail(
            "state.redis.url", "required when state.backend is redis, like redis://127.0.0.1:6379/0"
        )
    if sections["telemetry"].enabled and _absent(TELEMETRY_MODULE):
        _Reader(str(file) if file else "defaults", problems).fail(
            "telemetry.enabled", f"needs the otel extra; install it: {TELEMETRY_INSTALL}"
        )
    named = {endpoint.name for endpoint in endpoints or ()}
    for name, _ in sections["pricing"].endpoints if endpoints else ():
        if name not in named:
            _Reader(str(file) if file else "defaults", problems).fail(
                f"pricing.endpoints.{name}",
                f"no endpoint has this name; the endpoints are {', '.join(sorted(named))}",
            )
    if problems or not endpoints:
        raise ConfigError("\n".join(problems))
    return Config(tuple(endpoints), source=str(file) if file else None, **sections)


def mask_secret(value: str) -> str:
    """A key shortened for display: ``sk-ant-api03-…`` becomes ``sk-ant-…wxyz``."""
    if len(value) < 12:
        return "****"
    prefix = value[:3]
    if value.startswith("sk-"):
        second_dash = value.find("-", 3)
        # A recognisable provider prefix is short; a dash deep inside the key is key material.
        prefix = value[: second_dash + 1] if 0 < second_dash < 8 else "sk-"
    return f"{prefix}…{value[-4:]}"
