from __future__ import annotations

from pathlib import Path

import pytest

from addon.config import (
    DEFAULT_BASE_URL,
    Config,
    ConfigError,
    Endpoint,
    Logging,
    Retry,
    Server,
    Streaming,
    Timeouts,
    default_config_path,
    load_config,
    mask_secret,
)
from addon.platforms import is_anthropic_host

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
KEY = "sk-ant-api03-" + "s3cr3t" * 10


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load(
    tmp_path: Path,
    text: str,
    env: dict[str, str] | None = None,
    overrides: dict[str, object] | None = None,
) -> Config:
    return load_config(write(tmp_path, text), env or {}, overrides)


# --- files and defaults ---------------------------------------------------------------


def test_no_file_gives_one_default_endpoint(tmp_path: Path) -> None:
    config = load_config(None, {"CLAUDE_FALLBACK_HOME": str(tmp_path)})
    assert config.endpoints == (Endpoint(name="default", base_url=DEFAULT_BASE_URL),)
    assert config.source is None


def test_no_file_gives_section_defaults(tmp_path: Path) -> None:
    config = load_config(None, {"CLAUDE_FALLBACK_HOME": str(tmp_path)})
    assert (config.server.port, config.server.host, config.server.access_key) == (
        8765,
        "127.0.0.1",
        None,
    )
    assert config.retry.statuses == frozenset({429, 500, 502, 503, 504, 529})
    assert (config.timeouts.connect, config.timeouts.total) == (10.0, 600.0)
    assert config.streaming.hold_max == 15.0


def test_default_base_url_can_be_replaced(tmp_path: Path) -> None:
    config = load_config(None, {"CLAUDE_FALLBACK_HOME": str(tmp_path)}, default_base_url="http://127.0.0.1:9")
    assert config.endpoints[0].base_url == "http://127.0.0.1:9"


def test_an_endpoint_without_base_url_is_anthropic_whatever_the_default(tmp_path: Path) -> None:
    path = write(tmp_path, "endpoints:\n  - https://llm.example/api\n  - {name: own}\n")
    config = load_config(path, {}, default_base_url="https://llm.example")
    assert [e.base_url for e in config.endpoints] == ["https://llm.example/api", DEFAULT_BASE_URL]


def test_default_path_uses_claude_fallback_home(tmp_path: Path) -> None:
    assert default_config_path({"CLAUDE_FALLBACK_HOME": str(tmp_path)}) == tmp_path / "config.yaml"


def test_default_path_falls_back_to_home(tmp_path: Path) -> None:
    expected = tmp_path / ".claude-code-fallback" / "config.yaml"
    assert default_config_path({"HOME": str(tmp_path)}) == expected


def test_default_path_is_read_when_present(tmp_path: Path) -> None:
    write(tmp_path, "server: {port: 9001}\n")
    config = load_config(None, {"CLAUDE_FALLBACK_HOME": str(tmp_path)})
    assert config.server.port == 9001
    assert config.source == str(tmp_path / "config.yaml")


def test_missing_explicit_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", {})


def test_unreadable_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, {})


def test_original_tool_minimal_config_loads(tmp_path: Path) -> None:
    text = """
endpoints:
  - name: anthropic
    baseUrl: https://api.anthropic.com
    apiKey: ${ANTHROPIC_API_KEY}

server:
  port: 8765
"""
    config = load(tmp_path, text, {"ANTHROPIC_API_KEY": KEY})
    assert config.endpoints[0].name == "anthropic"
    assert config.endpoints[0].api_key == KEY


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file_means_defaults(tmp_path: Path, text: str) -> None:
    assert load(tmp_path, text).server == Server()


def test_null_section_means_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, "retry:\n  # maxRetries: 5\n").retry == Retry()


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level: expected a mapping, got list"):
        load(tmp_path, "- a\n- b\n")


def test_bad_yaml_names_file_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.yaml: invalid YAML at line 3, column 7"):
        load(tmp_path, "server:\n  port: [8765\n  host: x\n")


# --- the example file -----------------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE, {})
    assert [e.name for e in config.endpoints] == ["anthropic", "backup"]
    assert config.endpoints[1].base_url == "https://llm.example.com/api/anthropic"
    assert config.endpoints[1].auth_header == "bearer"


def test_example_config_shows_the_defaults() -> None:
    config = load_config(EXAMPLE, {})
    assert (config.server, config.retry, config.logging) == (Server(), Retry(), Logging())
    assert (config.timeouts, config.streaming) == (Timeouts(), Streaming())


# --- values and conversions -----------------------------------------------------------


def test_milliseconds_become_seconds(tmp_path: Path) -> None:
    text = "timeouts: {connect: 1500, firstByte: 250}\nstreaming: {holdMaxMs: 0}\n"
    config = load(tmp_path, text)
    assert (config.timeouts.connect, config.timeouts.first_byte) == (1.5, 0.25)
    assert config.streaming.hold_max == 0.0


def test_every_retry_key_is_read(tmp_path: Path) -> None:
    text = """
retry:
  enabled: false
  initialDelay: 500
  maxDelay: 8000
  backoffFactor: 1.5
  maxRetries: 5
  cooldownSeconds: 60
  statuses: [429, 503]
  budgetRatio: 0.5
  budgetMinRetries: 3
  maxWaitSeconds: 12.5
  credentialsFailover: false
  credentialsCooldownSeconds: 600
"""
    assert load(tmp_path, text).retry == Retry(
        enabled=False,
        initial_delay=0.5,
        max_delay=8.0,
        backoff_factor=1.5,
        max_retries=5,
        cooldown_seconds=60.0,
        statuses=frozenset({429, 503}),
        budget_ratio=0.5,
        budget_min_retries=3,
        max_wait_seconds=12.5,
        credentials_failover=False,
        credentials_cooldown_seconds=600.0,
    )


def test_every_server_key_is_read(tmp_path: Path) -> None:
    text = "server: {port: 1, host: 0.0.0.0, accessKey: k, metricsPort: 9, maxBodyBytes: 10}\n"
    assert load(tmp_path, text).server == Server(
        port=1, host="0.0.0.0", access_key="k", metrics_port=9, max_body_bytes=10
    )


def test_float_keys_accept_integers(tmp_path: Path) -> None:
    backoff = load(tmp_path, "retry: {backoffFactor: 3}\n").retry.backoff_factor
    assert backoff == 3.0
    assert isinstance(backoff, float)


def test_integer_key_rejects_a_quoted_number(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.port: expected an integer from 1 to 65535"):
        load(tmp_path, "server: {port: '8765'}\n")


def test_integer_key_rejects_a_float(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"retry\.maxRetries: expected an integer >= 1"):
        load(tmp_path, "retry: {maxRetries: 2.5}\n")


def test_port_out_of_range_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.port: .* got integer 70000"):
        load(tmp_path, "server: {port: 70000}\n")


@pytest.mark.parametrize("value", ["'yes'", "1"])
def test_booleans_must_be_real_booleans(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"retry\.enabled: expected a boolean"):
        load(tmp_path, f"retry: {{enabled: {value}}}\n")


def test_numbers_reject_booleans(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"retry\.initialDelay: .* got boolean True"):
        load(tmp_path, "retry: {initialDelay: true}\n")


def test_negative_duration_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"timeouts\.idle: expected a number of milliseconds >= 1"):
        load(tmp_path, "timeouts: {idle: -5}\n")


def test_status_outside_400_599_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"retry\.statuses: .* got integer 302"):
        load(tmp_path, "retry: {statuses: [429, 302]}\n")


def test_statuses_must_be_a_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"retry\.statuses: expected a list"):
        load(tmp_path, "retry: {statuses: 429}\n")


@pytest.mark.parametrize(("spelling", "stored"), [("WARNING", "warn"), ("Debug", "debug")])
def test_log_level_is_normalized(tmp_path: Path, spelling: str, stored: str) -> None:
    assert load(tmp_path, f"logging: {{level: {spelling}}}\n").logging.level == stored


def test_unknown_log_format_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"logging\.format: expected one of json, pretty"):
        load(tmp_path, "logging: {format: xml}\n")


def test_unknown_top_level_key_lists_allowed_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"retries: unknown key; expected one of endpoints, ser"):
        load(tmp_path, "retries: {}\n")


def test_unknown_endpoint_key_names_its_path(tmp_path: Path) -> None:
    text = "endpoints:\n  - baseUrl: https://a.example\n    apikey: x\n"
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.apikey: unknown key; .*apiKey"):
        load(tmp_path, text)


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.yaml: server: expected a mapping, got list"):
        load(tmp_path, "server: [1]\n")


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "server: {port: 0, host: ''}\nlogging: {level: loud}\n")
    assert len(str(caught.value).splitlines()) == 3


# --- interpolation --------------------------------------------------------------------


def test_variables_are_interpolated(tmp_path: Path) -> None:
    text = "server: {host: '${HOST}', accessKey: 'a-${MISSING:-fallback}'}\n"
    server = load(tmp_path, text, {"HOST": "0.0.0.0"}).server
    assert (server.host, server.access_key) == ("0.0.0.0", "a-fallback")


def test_unset_variable_becomes_empty(tmp_path: Path) -> None:
    assert load(tmp_path, "server: {accessKey: 'k${UNSET}'}\n").server.access_key == "k"


def test_empty_api_key_after_interpolation_is_no_key(tmp_path: Path) -> None:
    config = load(tmp_path, "endpoints:\n  - {baseUrl: 'https://a.example', apiKey: '${K}'}\n")
    assert config.endpoints[0].api_key is None


def test_interpolated_number_is_read_as_number(tmp_path: Path) -> None:
    assert load(tmp_path, "server: {port: '${PORT}'}\n", {"PORT": "9100"}).server.port == 9100


def test_interpolated_boolean_is_read_as_boolean(tmp_path: Path) -> None:
    text = """
endpoints:
  - https://a.example
  - {baseUrl: 'https://b.example', enabled: '${B:-no}'}
"""
    assert load(tmp_path, text).endpoints[1].enabled is False


# --- endpoints ------------------------------------------------------------------------


def test_base_url_keeps_port_and_prefix_and_drops_trailing_slash(tmp_path: Path) -> None:
    text = "endpoints:\n  - baseUrl: https://llm.example:8443/api/anthropic/\n"
    assert load(tmp_path, text).endpoints[0].base_url == "https://llm.example:8443/api/anthropic"


@pytest.mark.parametrize(
    ("url", "found"),
    [
        ("ftp://a.example", "scheme 'ftp'"),
        ("api.anthropic.com", "no scheme"),
        ("https://", "no host"),
        ("https://a.example/?k=v", "query string"),
        ("https://a.example:99999", "invalid host or port"),
    ],
)
def test_bad_base_url_is_an_error(tmp_path: Path, url: str, found: str) -> None:
    with pytest.raises(ConfigError, match=rf"endpoints\[0\]\.baseUrl: expected an http.* {found}"):
        load(tmp_path, f"endpoints:\n  - baseUrl: '{url}'\n")


def test_endpoint_without_base_url_uses_the_default(tmp_path: Path) -> None:
    config = load(tmp_path, "endpoints:\n  - {name: second-account, apiKey: k}\n")
    assert config.endpoints[0].base_url == DEFAULT_BASE_URL


def test_endpoint_may_be_a_plain_url(tmp_path: Path) -> None:
    config = load(tmp_path, "endpoints:\n  - https://a.example/v\n")
    assert (config.endpoints[0].name, config.endpoints[0].base_url) == (
        "a.example",
        "https://a.example/v",
    )


def test_missing_names_come_from_hosts_without_clashes(tmp_path: Path) -> None:
    text = """
endpoints:
  - baseUrl: https://api.anthropic.com
  - name: api.anthropic.com-2
    baseUrl: https://b.example
  - baseUrl: https://api.anthropic.com:8443
"""
    names = [e.name for e in load(tmp_path, text).endpoints]
    assert names == ["api.anthropic.com", "api.anthropic.com-2", "api.anthropic.com-3"]


def test_duplicate_names_name_both_indexes(tmp_path: Path) -> None:
    text = "endpoints:\n  - {name: a, baseUrl: 'https://a.x'}\n  - {name: a, baseUrl: 'https://b.x'}\n"
    with pytest.raises(ConfigError, match=r"endpoints\[1\]\.name: 'a' is already used by endpoints\[0\]"):
        load(tmp_path, text)


def test_empty_name_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.name: expected a non-empty string"):
        load(tmp_path, "endpoints:\n  - {name: '', baseUrl: 'https://a.example'}\n")


def test_empty_endpoint_list_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="endpoints: no endpoint"):
        load(tmp_path, "endpoints: []\n")


def test_all_endpoints_disabled_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="endpoints: every endpoint is disabled"):
        load(tmp_path, "endpoints:\n  - {baseUrl: 'https://a.example', enabled: false}\n")


def test_active_endpoints_skip_disabled_ones(tmp_path: Path) -> None:
    text = "endpoints:\n  - {baseUrl: 'https://a.example', enabled: false}\n  - https://b.example\n"
    config = load(tmp_path, text)
    assert len(config.endpoints) == 2
    assert [e.name for e in config.active_endpoints] == ["b.example"]


def test_headers_and_models_keep_file_order(tmp_path: Path) -> None:
    text = """
endpoints:
  - baseUrl: https://a.example
    headers: {X-B: '2', X-A: '1'}
    models: {claude-x: big, '*': small}
"""
    endpoint = load(tmp_path, text).endpoints[0]
    assert endpoint.headers == (("X-B", "2"), ("X-A", "1"))
    assert endpoint.models == (("claude-x", "big"), ("*", "small"))


def test_header_values_must_be_strings(tmp_path: Path) -> None:
    text = "endpoints:\n  - {baseUrl: 'https://a.example', headers: {X-N: 5}}\n"
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.headers: .* got integer at key 'X-N'"):
        load(tmp_path, text)


def test_unknown_auth_header_is_an_error(tmp_path: Path) -> None:
    text = "endpoints:\n  - {baseUrl: 'https://a.example', authHeader: basic}\n"
    with pytest.raises(ConfigError, match=r"authHeader: expected one of x-api-key, bearer, oauth"):
        load(tmp_path, text)


@pytest.mark.parametrize(
    ("model", "mapped"), [("claude-x", "big"), ("claude-y", "small"), ("other", "small")]
)
def test_map_model_prefers_exact_then_star(model: str, mapped: str) -> None:
    endpoint = Endpoint(name="a", base_url="https://a", models=(("claude-x", "big"), ("*", "small")))
    assert endpoint.map_model(model) == mapped


def test_map_model_without_star_leaves_model_unchanged() -> None:
    endpoint = Endpoint(name="a", base_url="https://a", models=(("claude-x", "big"),))
    assert endpoint.map_model("claude-y") == "claude-y"


# --- environment and command line -----------------------------------------------------


def test_env_endpoints_json_replaces_file_endpoints(tmp_path: Path) -> None:
    env = {"CLAUDE_FALLBACK_ENDPOINTS": '[{"name": "x", "baseUrl": "https://x.example/"}]'}
    config = load(tmp_path, "endpoints:\n  - https://a.example\n", env)
    assert [(e.name, e.base_url) for e in config.endpoints] == [("x", "https://x.example")]


def test_env_endpoints_urls_get_names_from_hosts(tmp_path: Path) -> None:
    env = {"CLAUDE_FALLBACK_ENDPOINTS": "https://a.example, https://a.example/v2"}
    assert [e.name for e in load(tmp_path, "", env).endpoints] == ["a.example", "a.example-2"]


def test_env_endpoints_errors_name_the_variable(tmp_path: Path) -> None:
    env = {"CLAUDE_FALLBACK_ENDPOINTS": '[{"baseUrl": "ftp://x"}]'}
    with pytest.raises(ConfigError, match=r"environment: CLAUDE_FALLBACK_ENDPOINTS\[0\]\.baseUrl"):
        load(tmp_path, "", env)


def test_env_endpoints_bad_json_is_an_error(tmp_path: Path) -> None:
    env = {"CLAUDE_FALLBACK_ENDPOINTS": '[{"baseUrl": }]'}
    with pytest.raises(ConfigError, match="CLAUDE_FALLBACK_ENDPOINTS: invalid JSON at line 1"):
        load(tmp_path, "", env)


def test_env_port_overrides_file(tmp_path: Path) -> None:
    config = load(tmp_path, "server: {port: 9000}\n", {"CLAUDE_FALLBACK_PORT": "9001"})
    assert config.server.port == 9001


def test_env_port_must_be_an_integer(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"environment variable CLAUDE_FALLBACK_PORT: server\.port: .* 'http'"
    ):
        load(tmp_path, "", {"CLAUDE_FALLBACK_PORT": "http"})


def test_env_host_and_log_level_are_applied(tmp_path: Path) -> None:
    env = {"CLAUDE_FALLBACK_HOST": "0.0.0.0", "CLAUDE_FALLBACK_LOG_LEVEL": "warning"}
    config = load(tmp_path, "", env)
    assert (config.server.host, config.logging.level) == ("0.0.0.0", "warn")


def test_anthropic_api_key_fills_only_keyless_endpoints(tmp_path: Path) -> None:
    text = "endpoints:\n  - {baseUrl: 'https://api.anthropic.com', apiKey: own}\n  - https://anthropic.com\n"
    config = load(tmp_path, text, {"ANTHROPIC_API_KEY": KEY})
    assert [e.api_key for e in config.endpoints] == ["own", KEY]


@pytest.mark.parametrize(
    ("url", "anthropic"),
    [
        ("https://api.anthropic.com", True),
        ("https://anthropic.com/v1", True),
        ("http://EU.API.Anthropic.com:8443/prefix", True),
        ("https://evilanthropic.com", False),
        ("https://anthropic.com.evil.example", False),
        ("https://api.anthropic.co", False),
        ("https://user:anthropic.com@llm.example", False),
        ("http://127.0.0.1:9", False),
    ],
)
def test_anthropic_hosts(url: str, anthropic: bool) -> None:
    assert is_anthropic_host(url) is anthropic


def test_anthropic_api_key_goes_only_to_anthropic_hosts(tmp_path: Path) -> None:
    text = """
endpoints:
  - https://api.anthropic.com
  - https://eu.api.anthropic.com/prefix
  - https://evilanthropic.com
  - http://127.0.0.1:9
  - {name: explicit, baseUrl: 'https://llm.example', apiKey: '${ANTHROPIC_API_KEY}'}
"""
    config = load(tmp_path, text, {"ANTHROPIC_API_KEY": KEY})
    assert [e.api_key for e in config.endpoints] == [KEY, KEY, None, None, KEY]


def test_anthropic_api_key_goes_to_the_default_endpoint(tmp_path: Path) -> None:
    config = load_config(None, {"CLAUDE_FALLBACK_HOME": str(tmp_path), "ANTHROPIC_API_KEY": KEY})
    assert (config.endpoints[0].base_url, config.endpoints[0].api_key) == (DEFAULT_BASE_URL, KEY)


def test_anthropic_api_key_does_not_follow_a_non_anthropic_reverse_target(tmp_path: Path) -> None:
    env = {"CLAUDE_FALLBACK_HOME": str(tmp_path), "ANTHROPIC_API_KEY": KEY}
    config = load_config(None, env, default_base_url="http://127.0.0.1:9")
    assert config.endpoints[0].api_key is None


def test_empty_anthropic_api_key_is_ignored(tmp_path: Path) -> None:
    config = load(tmp_path, "", {"ANTHROPIC_API_KEY": ""})
    assert config.endpoints[0].api_key is None


def test_overrides_beat_environment(tmp_path: Path) -> None:
    overrides = {"server.port": 9002, "logging.level": "debug"}
    config = load(tmp_path, "", {"CLAUDE_FALLBACK_PORT": "9001"}, overrides=overrides)
    assert (config.server.port, config.logging.level) == (9002, "debug")


def test_override_strings_are_parsed(tmp_path: Path) -> None:
    config = load(tmp_path, "", overrides={"server.port": "9003", "retry.statuses": "429,503"})
    assert (config.server.port, config.retry.statuses) == (9003, frozenset({429, 503}))


def test_overrides_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"command line: server\.port: expected an integer"):
        load(tmp_path, "", overrides={"server.port": 0})


def test_unknown_override_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"command line: server\.bind: unknown key"):
        load(tmp_path, "", overrides={"server.bind": "x"})


def test_override_without_section_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="command line: port: unknown option"):
        load(tmp_path, "", overrides={"port": 1})


# --- secrets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"endpoints:\n  - baseUrl: {KEY}\n",
        f"endpoints:\n  - {{baseUrl: 'https://a.example', authHeader: 'Bearer {KEY}'}}\n",
        f"endpoints:\n  - {{baseUrl: 'https://a.example', headers: 'Authorization: {KEY}'}}\n",
        f"server: {{host: '{KEY}', accessKey: [{KEY}]}}\n",
    ],
)
def test_errors_never_echo_a_key(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert "s3cr3t" not in str(caught.value)


def test_repr_hides_keys() -> None:
    endpoint = Endpoint(name="a", base_url="https://a", api_key=KEY, headers=(("X-K", KEY),))
    assert "s3cr3t" not in repr(endpoint)
    assert "s3cr3t" not in repr(Server(access_key=KEY))


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("sk-ant-api03-abcdefghwxyz", "sk-ant-…wxyz"),
        ("sk-abcdefghijklmnopwxyz", "sk-…wxyz"),
        ("sk-abcdefghijklmnop-wxyz", "sk-…wxyz"),
        ("abcdefghwxyz", "abc…wxyz"),
        ("short-key", "****"),
    ],
)
def test_mask_secret(value: str, masked: str) -> None:
    assert mask_secret(value) == masked


# --- subscriptions and routing ----------------------------------------------------------

OAUTH_TOKEN = "sk-ant-oat01-" + "t0k3n" * 12


def test_an_oauth_token_is_sent_as_oauth_unless_auth_header_says_otherwise(tmp_path: Path) -> None:
    text = (
        "endpoints:\n"
        f"  - {{name: sub, baseUrl: 'https://a.example', apiKey: {OAUTH_TOKEN}}}\n"
        f"  - {{name: forced, baseUrl: 'https://a.example', apiKey: {OAUTH_TOKEN}, authHeader: bearer}}\n"
        f"  - {{name: key, baseUrl: 'https://a.example', apiKey: {KEY}}}\n"
        f"  - {{name: oauth, baseUrl: 'https://a.example', apiKey: {KEY}, authHeader: oauth}}\n"
    )
    config = load(tmp_path, text)
    assert [e.auth for e in config.endpoints] == ["oauth", "bearer", "x-api-key", "oauth"]


def test_routing_defaults_change_nothing(tmp_path: Path) -> None:
    routing = load(tmp_path, "endpoints: ['https://a.example']\n").routing
    assert (routing.strategy, routing.session_affinity, routing.step_aside_at) == ("priority", True, None)


def test_routing_keys_are_read(tmp_path: Path) -> None:
    text = "routing: {strategy: least-utilized, sessionAffinity: false, stepAsideAt: 0.95}\n"
    routing = load(tmp_path, text).routing
    assert (routing.strategy, routing.session_affinity, routing.step_aside_at) == (
        "least-utilized",
        False,
        0.95,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("routing: {strategy: round-robin}", r"routing\.strategy: expected one of priority, least-utilized"),
        ("routing: {stickiness: true}", r"routing\.stickiness: unknown key; expected one of strategy, "),
        (
            "routing: {stepAsideAt: 1.5}",
            r"routing\.stepAsideAt: expected a number from 0 to 1, got number 1.5",
        ),
    ],
)
def test_bad_routing_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load(tmp_path, text + "\n")
    assert str(tmp_path / "config.yaml") in str(error.value)


# --- fleet state and client keys ------------------------------------------------------------


def test_state_defaults_to_memory(tmp_path: Path) -> None:
    state = load(tmp_path, "endpoints: ['https://a.example']\n").state
    assert (state.backend, state.redis.url, state.redis.key_prefix, state.redis.timeout) == (
        "memory",
        None,
        "ccf:",
        0.05,
    )


def test_redis_state_reads_its_url_from_the_environment(tmp_path: Path) -> None:
    text = "state: {backend: redis, redis: {url: '${REDIS_URL}', keyPrefix: 'team-a:', timeout: 80}}\n"
    state = load(tmp_path, text, env={"REDIS_URL": "rediss://:pw@redis.example:6380/1"}).state
    assert (state.backend, state.redis.url, state.redis.key_prefix, state.redis.timeout) == (
        "redis",
        "rediss://:pw@redis.example:6380/1",
        "team-a:",
        0.08,
    )
    assert "pw" not in repr(state)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("state: {backend: redis}", r"state\.redis\.url: required when state\.backend is redis"),
        ("state: {backend: etcd}", r"state\.backend: expected one of memory, redis"),
        (
            "state: {redis: {url: 'http://x:6379'}}",
            r"state\.redis\.url: expected a redis://, rediss:// or unix://",
        ),
        (
            "state: {redis: {port: 6379}}",
            r"state\.redis\.port: unknown key; expected one of url, keyPrefix, timeout",
        ),
    ],
)
def test_bad_state_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text + "\n")


def test_named_access_keys(tmp_path: Path) -> None:
    text = "server: {accessKeys: [{name: alice, key: '${A}'}, {name: bob, key: k-bob-123456789}]}\n"
    server = load(tmp_path, text, env={"A": "k-alice-123456789"}).server
    pairs = [(client.name, client.key) for client in server.access_keys]
    assert pairs == [("alice", "k-alice-123456789"), ("bob", "k-bob-123456789")]
    assert "k-alice" not in repr(server)


@pytest.mark.parametrize(
    ("keys", "found"),
    [
        ("[{name: alice, key: a1}, {name: alice, key: a2}]", r"name string 'alice' at \[1\]"),
        ("[{name: 'has space', key: a1}]", r"name string 'has space' at \[0\]"),
        ("[{name: alice}]", r"mapping at \[0\]"),
        ("[{name: alice, key: ''}]", r"an empty or non-string key at \[0\]"),
    ],
)
def test_bad_access_keys_name_the_entry_and_never_the_key(tmp_path: Path, keys: str, found: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.accessKeys: expected a list of \{name, key\}.*" + found):
        load(tmp_path, f"server: {{accessKeys: {keys}}}\n")


def test_workers_come_from_the_file_or_the_environment(tmp_path: Path) -> None:
    assert load(tmp_path, "").server.workers == 1
    assert load(tmp_path, "server: {workers: 4}\n").server.workers == 4
    assert load(tmp_path, "server: {workers: 4}\n", {"CLAUDE_FALLBACK_WORKERS": "2"}).server.workers == 2


@pytest.mark.parametrize("value", ["0", "65", "two", "1.5"])
def test_bad_worker_counts_name_the_field_and_the_file(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"config\.yaml.*server\.workers: .*an integer from 1 to 64"):
        load(tmp_path, f"server: {{workers: {value}}}\n")
