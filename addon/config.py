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
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import yaml

DEFAULT_BASE_URL = "https://api.anthropic.com"
OAUTH_KEY_PREFIX = "sk-ant-oat"  # OAuth tokens of Claude subscriptions, e.g. from `claude setup-token`
OAUTH_BETA = "oauth-2025-04-20"  # the API takes such a token only with this beta

Check = Callable[[Any], Any]
_T = TypeVar("_T", bound="DataclassInstance")

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class ConfigError(Exception):
    """The configuration cannot be used; ``str(error)`` lists every problem, one per line."""


class _Text(str):
    """A string read from text (environment, command line, ``${VAR}``): may spell a number."""


class _Invalid(Exception):
    def __init__(self, expected: str, found: str | None = None) -> None:
        super().__init__(expected)
        self.expected, self.found = expected, found


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


def _number(low: float, high: float = math.inf, *, integer: bool = False, per_second: float = 1) -> Check:
    noun = "an integer" if integer else "a number" + (" of milliseconds" if per_second > 1 else "")
    expected = f"{noun} from {low:g} to {high:g}" if high < math.inf else f"{noun} >= {low:g}"

    def check(value: Any) -> float:
        value = _parsed(value, int if integer else float)
        kinds = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            raise _Invalid(expected, _describe(value))
        if not low <= value <= high:
            raise _Invalid(expected, _describe(value))
        return value if integer else value / per_second

    return check


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
    expected = "an http:// or https:// URL with a host, like https://api.anthropic.com"
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


def _named_keys(value: Any) -> tuple[tuple[str, str], ...]:
    """`server.accessKeys`: a list of `{name, key}`, names unique and fit for a metric label."""
    expected = "a list of {name, key} with unique names of letters, digits, '_', '.', '-' (up to 32)"
    if not isinstance(value, list):
        raise _Invalid(expected, _kind(value))
    pairs: dict[str, str] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"name", "key"}:
            raise _Invalid(expected, f"{_kind(item)} at [{i}]")
        name, key = item["name"], item["key"]
        if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name) or name in pairs:
            raise _Invalid(expected, f"name {_describe(name)} at [{i}]")
        if not isinstance(key, str) or not key:
            raise _Invalid(expected, f"an empty or non-string key at [{i}]")  # never echo a key
        pairs[name] = key
    return tuple(pairs.items())


def _redis_url(value: Any) -> str:
    expected = "a redis://, rediss:// or unix:// URL"
    if not isinstance(value, str):
        raise _Invalid(expected, _kind(value))
    scheme = urlsplit(value.strip()).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise _Invalid(expected, f"scheme {scheme!r}" if scheme else "no scheme")
    return value.strip()


_REQUIRED: Any = object()
_DEFAULT_STATUSES = frozenset({429, 500, 502, 503, 504, 529})


def _key(name: str, check: Check, default: Any = _REQUIRED, secret: bool = False) -> Any:
    """A dataclass field read from the file key ``name`` and converted by ``check``."""
    options: dict[str, Any] = {"metadata": {"key": name, "check": check}, "repr": not secret}
    return field(**options) if default is _REQUIRED else field(default=default, **options)


_PORT, _STATUS = _integer(1, 65535), _integer(400, 599)
_LEVEL = _choice("trace", "debug", "info", "warn", "error", warning="warn")


PROVIDERS = ("anthropic", "bedrock", "bedrock-mantle", "vertex", "openai")
# provider -> the pip extra that installs its libraries, and a module of theirs to look for
PROVIDER_EXTRAS = {
    "bedrock": ("bedrock", "botocore"),
    "bedrock-mantle": ("bedrock", "botocore"),
    "vertex": ("vertex", "google.auth"),
}


@dataclass(frozen=True)
class Endpoint:
    """One upstream API, tried in configuration order: Anthropic's own, or Claude on a platform."""

    name: str = _key("name", _string)
    base_url: str = _key("baseUrl", _url)
    provider: str = _key("provider", _choice(*PROVIDERS), default="anthropic")
    api_key: str | None = _key("apiKey", _secret, default=None, secret=True)
    auth_header: str | None = _key("authHeader", _choice("x-api-key", "bearer", "oauth"), default=None)
    headers: tuple[tuple[str, str], ...] = _key("headers", _pairs("header names"), (), secret=True)
    models: tuple[tuple[str, str], ...] = _key("models", _pairs("model names"), default=())
    enabled: bool = _key("enabled", _boolean, default=True)
    region: str | None = _key("region", _string, default=None)
    project: str | None = _key("project", _string, default=None)
    aws_profile: str | None = _key("awsProfile", _string, default=None)
    max_tokens_field: str = _key(
        "maxTokensField", _choice("max_tokens", "max_completion_tokens"), default="max_tokens"
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

    connect: float = _key("connect", _ms(), default=10.0)
    first_byte: float = _key("firstByte", _ms(), default=30.0)
    response: float = _key("response", _ms(), default=600.0)
    idle: float = _key("idle", _ms(), default=90.0)
    total: float = _key("total", _ms(), default=600.0)


@dataclass(frozen=True)
class Retry:
    """Retry, backoff, cooldown and retry-budget settings; delays in seconds."""

    enabled: bool = _key("enabled", _boolean, default=True)
    initial_delay: float = _key("initialDelay", _ms(0), default=1.0)
    max_delay: float = _key("maxDelay", _ms(0), default=60.0)
    backoff_factor: float = _key("backoffFactor", _number(1), default=2.0)
    max_retries: int = _key("maxRetries", _integer(1), default=3)
    cooldown_seconds: float = _key("cooldownSeconds", _number(0), default=300.0)
    statuses: frozenset[int] = _key("statuses", _statuses, default=_DEFAULT_STATUSES)
    budget_ratio: float = _key("budgetRatio", _number(0), default=0.2)
    budget_min_retries: int = _key("budgetMinRetries", _integer(0), default=10)


@dataclass(frozen=True)
class Server:
    """Where the proxy listens and what it accepts."""

    port: int = _key("port", _PORT, default=8765)
    host: str = _key("host", _string, default="127.0.0.1")
    access_key: str | None = _key("accessKey", _secret, default=None, secret=True)
    access_keys: tuple[tuple[str, str], ...] = _key("accessKeys", _named_keys, default=(), secret=True)
    metrics_port: int | None = _key("metricsPort", _PORT, default=None)
    max_body_bytes: int = _key("maxBodyBytes", _integer(1), default=32 * 1024 * 1024)
    workers: int = _key("workers", _integer(1, 64), default=1)


@dataclass(frozen=True)
class Logging:
    """Log level (normalized, ``warning`` becomes ``warn``), format and key redaction."""

    level: str = _key("level", _LEVEL, default="info")
    format: str = _key("format", _choice("json", "pretty"), default="json")
    redact_keys: bool = _key("redactKeys", _boolean, default=True)


@dataclass(frozen=True)
class Streaming:
    """How much of a stream may be held back before committing to an endpoint."""

    resume: bool = _key("resume", _boolean, default=False)
    hold_max: float = _key("holdMaxMs", _ms(0), default=15.0)
    hold_max_bytes: int = _key("holdMaxBytes", _integer(0), default=65536)
    ratelimit_threshold: int = _key("ratelimitThreshold", _integer(0), default=0)


@dataclass(frozen=True)
class RedisSettings:
    """Where the shared state lives and how long the proxy waits for it."""

    url: str | None = _key("url", _redis_url, default=None, secret=True)
    key_prefix: str = _key("keyPrefix", _string, default="ccf:")
    timeout: float = _key("timeout", _ms(), default=0.05)


@dataclass(frozen=True)
class State:
    """Where endpoint state lives: this process only, or shared by a fleet through Redis."""

    backend: str = _key("backend", _choice("memory", "redis"), default="memory")
    redis: RedisSettings = field(
        default_factory=RedisSettings, metadata={"key": "redis", "section": True, "check": None}
    )


@dataclass(frozen=True)
class Routing:
    """Which usable endpoint a request goes to first; see routing.py."""

    strategy: str = _key("strategy", _choice("priority", "least-utilized"), default="priority")
    session_affinity: bool = _key("sessionAffinity", _boolean, default=True)
    step_aside_at: float | None = _key("stepAsideAt", _number(0, 1), default=None)


_SECTIONS: dict[str, type] = {
    "server": Server,
    "retry": Retry,
    "logging": Logging,
    "timeouts": Timeouts,
    "streaming": Streaming,
    "routing": Routing,
    "state": State,
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
                    self.fail(where, f"expected {e.expected}, got {e.found or _kind(value)}")
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
        platform's own SDK fills them; a key that its provider does not use is a mistake."""
        provider, env = endpoint.provider, self.env
        for key, value, takes in (
            ("region", endpoint.region, ("bedrock", "bedrock-mantle", "vertex")),
            ("project", endpoint.project, ("vertex",)),
            ("awsProfile", endpoint.aws_profile, ("bedrock", "bedrock-mantle")),
            ("authHeader", endpoint.auth_header, ("anthropic",)),
            ("apiKey", endpoint.api_key, ("anthropic", "bedrock", "bedrock-mantle", "openai")),
        ):
            if value is not None and provider not in takes:
                self.fail(f"{path}.{key}", f"not used by provider {provider} (only by {', '.join(takes)})")
        if (extra := PROVIDER_EXTRAS.get(provider)) and importlib.util.find_spec(extra[1]) is None:
            install = f"pip install 'claude-code-fallback[{extra[0]}]'"
            self.fail(f"{path}.provider", f"{provider} needs the {extra[0]} extra; install it: {install}")
        if provider == "openai":
            if not endpoint.base_url:
                self.fail(f"{path}.baseUrl", "required for provider openai, like http://127.0.0.1:11434/v1")
            if not endpoint.models:
                self.fail(
                    f"{path}.models",
                    'required for provider openai: which model serves each client model ("*": all)',
                )
            return endpoint
        if endpoint.max_tokens_field != "max_tokens":
            self.fail(f"{path}.maxTokensField", f"not used by provider {provider} (only by openai)")
        platform = _PLATFORMS.get(provider)
        if platform is None:
            return replace(endpoint, base_url=endpoint.base_url or DEFAULT_BASE_URL)
        region = endpoint.region or next((env[v] for v in platform.region_variables if env.get(v)), None)
        if not region:
            self.fail(
                f"{path}.region", f"required for provider {provider}; or set {platform.region_variables[0]}"
            )
            return endpoint
        return replace(
            endpoint,
            region=region,
            base_url=endpoint.base_url
            or env.get(platform.base_url_variable, "").rstrip("/")
            or platform.url(region),
            api_key=endpoint.api_key or next((env[v] for v in platform.key_variables if env.get(v)), None),
            project=endpoint.project
            or (env.get(platform.project_variable) if platform.project_variable else None),
        )


@dataclass(frozen=True)
class _Platform:
    """Where a platform's defaults come from, as its SDK reads them."""

    url: Callable[[str], str]  # the base URL for a region
    region_variables: tuple[str, ...]
    base_url_variable: str
    key_variables: tuple[str, ...] = ()
    project_variable: str | None = None


def _vertex_base_url(region: str) -> str:
    """Where Vertex AI serves `region`, as the anthropic SDK picks it."""
    if region == "global":
        return "https://aiplatform.googleapis.com/v1"
    if region in ("us", "eu"):
        return f"https://aiplatform.{region}.rep.googleapis.com/v1"
    return f"https://{region}-aiplatform.googleapis.com/v1"


_AWS_REGION = ("AWS_REGION", "AWS_DEFAULT_REGION")
_PLATFORMS = {
    "bedrock": _Platform(
        lambda region: f"https://bedrock-runtime.{region}.amazonaws.com",
        _AWS_REGION,
        "ANTHROPIC_BEDROCK_BASE_URL",
        ("AWS_BEARER_TOKEN_BEDROCK",),
    ),
    "bedrock-mantle": _Platform(
        lambda region: f"https://bedrock-mantle.{region}.api.aws/anthropic",
        _AWS_REGION,
        "ANTHROPIC_BEDROCK_MANTLE_BASE_URL",
        ("AWS_BEARER_TOKEN_BEDROCK", "ANTHROPIC_AWS_API_KEY"),
    ),
    "vertex": _Platform(
        _vertex_base_url,
        ("CLOUD_ML_REGION",),
        "ANTHROPIC_VERTEX_BASE_URL",
        project_variable="ANTHROPIC_VERTEX_PROJECT_ID",
    ),
}


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


def is_anthropic_host(url: str) -> bool:
    """Whether `url`'s host is anthropic.com or one of its subdomains."""
    host = urlsplit(url).hostname or ""
    return host == "anthropic.com" or host.endswith(".anthropic.com")


def takes_env_key(endpoint: Endpoint) -> bool:
    """``ANTHROPIC_API_KEY`` fills in the key of a keyless endpoint only on Anthropic's own hosts."""
    return not endpoint.api_key and is_anthropic_host(endpoint.base_url)


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
    endpoints: list[Endpoint] | None = [Endpoint(name="default", base_url=default_base_url)]
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
    if problems or not endpoints:
        raise ConfigError("\n".join(problems))
    if default_key := env.get("ANTHROPIC_API_KEY"):
        endpoints = [replace(e, api_key=default_key) if takes_env_key(e) else e for e in endpoints]
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
