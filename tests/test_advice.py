from __future__ import annotations

from pathlib import Path

import yaml

from addon.config import Config, load_config
from addon.ops import advice
from addon.state.access import Access

MODE = ["reverse:https://api.anthropic.com@8765"]
ENV_KEY = "sk-ant-api03-environment-key-0123456789"


def config(tmp_path: Path, **server: object) -> Config:
    path = tmp_path / "config.yaml"
    endpoints = [
        {"name": "anthropic", "baseUrl": "https://api.anthropic.com"},
        {"name": "glm", "baseUrl": "https://open.bigmodel.cn/api/anthropic"},
        {"name": "keyed", "baseUrl": "https://llm.example", "apiKey": "sk-llm-example-0001"},
    ]
    path.write_text(yaml.safe_dump({"endpoints": endpoints, "server": server}))
    path.chmod(0o600)
    return load_config(path, {})


def events(advices: list[advice.Advice]) -> list[str]:
    return [event for event, _ in advices]


def test_listening_beyond_loopback_is_exposed_only_without_any_access_key(tmp_path):
    open_config = config(tmp_path)
    assert events(advice.exposed(Access(open_config.server), MODE, "0.0.0.0")) == ["exposed"]
    assert events(advice.exposed(Access(open_config.server), MODE, "")) == ["exposed"]  # all interfaces
    assert advice.exposed(Access(open_config.server), MODE, "127.0.0.1") == []
    assert advice.exposed(Access(open_config.server), MODE, "localhost") == []
    single = config(tmp_path, accessKey="sk-proxy-access-0001")
    assert advice.exposed(Access(single.server), MODE, "0.0.0.0") == []
    named = config(tmp_path, accessKeys=[{"name": "ci", "key": "sk-proxy-access-0002"}])
    assert advice.exposed(Access(named.server), MODE, "0.0.0.0") == []


def test_the_environments_key_is_named_masked_for_each_keyless_endpoint_outside_anthropic(tmp_path):
    found = advice.env_key_withheld(config(tmp_path), {"ANTHROPIC_API_KEY": ENV_KEY})
    assert [fields["endpoint"] for _, fields in found] == ["glm"]
    warning = str(found[0][1]["warning"])
    assert "open.bigmodel.cn" in warning and ENV_KEY not in warning and ENV_KEY[-4:] in warning
    assert advice.env_key_withheld(config(tmp_path), {}) == []


def test_a_config_others_can_read_is_named_with_the_fix(tmp_path):
    private = config(tmp_path)
    assert advice.config_readable(private) == []
    assert private.source is not None
    Path(private.source).chmod(0o644)
    [(event, fields)] = advice.config_readable(private)
    assert event == "config_permissions" and f"chmod 600 {private.source}" in str(fields["warning"])


def test_workers_outside_ccf_are_ignored_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("CCF_WORKERS", raising=False)
    assert advice.workers_ignored(config(tmp_path)) == []
    assert events(advice.workers_ignored(config(tmp_path, workers=2))) == ["workers_ignored"]
