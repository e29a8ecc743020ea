"""The real Claude Code CLI (`claude -p`) through the proxy while the primary fails mid-preamble.

The CLI comes from the npm registry (`@anthropic-ai/claude-code`, which pulls its native
binary in as the optional package `@anthropic-ai/claude-code-<platform>`). `.ci/run`
installs it into /tmp/ccf-claude-cli and exports `CCF_CLAUDE_CLI`; without it the test
skips and says how to install it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from addon.fakes.anthropic import Behavior, FakeAnthropic, SeenRequest

from .conftest import endpoints_config

INSTALL_DIR = Path("/tmp/ccf-claude-cli")
INSTALL_HINT = (
    "set CCF_CLAUDE_CLI to its command, put `claude` on PATH, or run "
    f"`npm install --prefix {INSTALL_DIR} --no-audit --no-fund @anthropic-ai/claude-code` "
    "(.ci/run does this)"
)
CLI_KEY = "sk-ant-test-cli-000000000001"
PROMPT = "say hello"
BACKUP_TEXT = "The backup says hello from loopback."
CLI_TIMEOUT = 90


def cli_env(home: Path, base_url: str) -> dict[str, str]:
    """A clean environment: nothing of the caller's ANTHROPIC_*, CLAUDE_*, proxies or ~/.claude."""
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": CLI_KEY,
        # Offline: without these the CLI resolves api.anthropic.com for its side traffic.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        # The proxy must do the failing over: no retries (the CLI retries a 529 up to
        # 10 times by default) and no non-streaming second try from the CLI itself.
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK": "1",
    }


def candidates() -> list[list[str]]:
    """Commands that may run the CLI, best first."""
    found: list[list[str]] = []
    if command := os.environ.get("CCF_CLAUDE_CLI", "").strip():
        found.append(shlex.split(command))
    if claude := shutil.which("claude"):
        found.append([claude])
    modules = INSTALL_DIR / "node_modules"
    # .bin/claude is the native binary once the package's postinstall has run, else a stub.
    if (linked := modules / ".bin" / "claude").exists():
        found.append([str(linked)])
    found += [[str(p)] for p in sorted(modules.glob("@anthropic-ai/claude-code-*/claude"))]
    wrapper = modules / "@anthropic-ai" / "claude-code" / "cli-wrapper.cjs"
    if wrapper.exists() and (node := shutil.which("node")):
        found.append([node, str(wrapper)])
    return found


def find_cli(home: Path) -> list[str]:
    """The first candidate whose `--version` names Claude Code; skip the test when none does."""
    tried = []
    env = cli_env(home, "http://127.0.0.1:9")
    for command in candidates():
        try:
            run = subprocess.run(
                [*command, "--version"],
                env=env,
                cwd=home,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append(f"{shlex.join(command)}: {e}")
            continue
        if run.returncode == 0 and "Claude Code" in run.stdout:
            return command
        said = (run.stderr or run.stdout).strip().splitlines()[:1]
        tried.append(f"{shlex.join(command)}: exit {run.returncode} {' '.join(said)}".rstrip())
    pytest.skip(
        f"Claude Code CLI not installed: {INSTALL_HINT}; tried: {'; '.join(tried) or 'nothing found'}"
    )


def user_texts(body: dict[str, Any]) -> list[str]:
    texts = []
    for message in body.get("messages") or []:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"]
    return texts


def main_requests(fake: FakeAnthropic) -> list[SeenRequest]:
    """The streaming Messages requests that carry the prompt (not HEAD /, titles, counts...)."""
    found = []
    for request in list(fake.requests):
        if request.method != "POST" or not request.path.split("?", 1)[0].endswith("/v1/messages"):
            continue
        try:
            body = request.json()
        except ValueError:
            continue
        if body.get("stream") is True and any(t.strip() == PROMPT for t in user_texts(body)):
            found.append(request)
    return found


def seen(fake: FakeAnthropic) -> str:
    lines = []
    for r in list(fake.requests):
        try:
            body = r.json() if r.body else {}
            summary = {k: body[k] for k in ("model", "max_tokens", "stream") if k in body}
        except ValueError:
            summary = {"body": r.body[:80]}
        lines.append(f"  {r.method} {r.path} {json.dumps(summary, default=str)}")
    return f"{fake.name}:\n" + "\n".join(lines or ["  (nothing)"])


def run_cli(
    cli: list[str], tmp_path: Path, home: Path, proxy: Any, *fakes: FakeAnthropic
) -> tuple[subprocess.CompletedProcess[str], str]:
    """`claude -p PROMPT` through the proxy, in an empty project; (the run, what to print if it fails)."""
    work = tmp_path / "project"  # no CLAUDE.md, settings or git repo of ours in sight
    work.mkdir()
    started = time.monotonic()
    try:
        run = subprocess.run(
            [*cli, "-p", PROMPT],
            env=cli_env(home, proxy.url),
            cwd=work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"`claude -p` still running after {CLI_TIMEOUT} s\nstdout: {e.stdout!r}\nstderr: {e.stderr!r}\n"
            + "\n".join(seen(fake) for fake in fakes)
            + f"\nproxy log:\n{proxy.logs()[-3000:]}"
        )
    took = time.monotonic() - started
    context = (
        f"exit {run.returncode} after {took:.1f} s\nstdout: {run.stdout!r}\nstderr: {run.stderr!r}\n"
        + "\n".join(seen(fake) for fake in fakes)
        + f"\nproxy log:\n{proxy.logs()[-3000:]}"
    )
    return run, context


def test_claude_cli_prints_the_backups_answer_when_the_primary_errors_after_its_preamble(
    tmp_path, proxy_factory, primary, backup
):
    home = tmp_path / "home"
    home.mkdir()
    cli = find_cli(home)
    # Every Messages call to the primary (streaming or not) gets a stream that errors after
    # message_start, content_block_start and ping; other routes get 200 JSON.
    primary.behavior = Behavior(kind="sse_error_after_preamble")
    backup.behavior = Behavior(kind="ok", text=BACKUP_TEXT)
    proxy = proxy_factory(endpoints_config(primary, backup))
    run, context = run_cli(cli, tmp_path, home, proxy, primary, backup)
    assert run.returncode == 0, context
    assert BACKUP_TEXT in run.stdout, context
    tried, answered = main_requests(primary), main_requests(backup)
    assert tried, context  # the primary saw the prompt first and broke its stream...
    assert answered, context  # ...and the backup got the same request and answered it
    assert tried[0].time <= answered[0].time, context
    assert proxy.metric("ccf_upstream_attempts_total", endpoint="primary", outcome="sse_error") >= 1
    assert proxy.metric("ccf_failovers_total", from_endpoint="primary", to_endpoint="backup") >= 1


def test_claude_cli_session_moves_off_an_account_whose_window_is_refused(
    tmp_path, proxy_factory, primary, backup
):
    """Two subscription accounts under least-utilized: the CLI's session avoids the overage one."""
    from addon.fakes.anthropic import Account, Window

    home = tmp_path / "home"
    home.mkdir()
    cli = find_cli(home)
    primary.account = Account(Window("5h", utilization=1.0, per_request=0.0), overage=True)
    backup.account = Account(Window("5h", utilization=0.3, per_request=0.0), overage=True)
    backup.behavior = Behavior(kind="ok", text=BACKUP_TEXT)
    proxy = proxy_factory(endpoints_config(primary, backup, routing={"strategy": "least-utilized"}))
    run, context = run_cli(cli, tmp_path, home, proxy, primary, backup)
    assert run.returncode == 0, context
    assert BACKUP_TEXT in run.stdout, context
    answered = main_requests(backup)
    assert answered, context
    session = answered[-1].header("x-claude-code-session-id")
    assert session, context  # Claude Code names its session; the proxy keyed affinity on it
    assert proxy.health()["routing"]["sessions"] >= 1
    state = proxy.endpoint("primary")
    assert state["status"] == "cooling" and state["overage"] is True, context


def test_claude_cli_gets_bedrocks_streamed_answer_when_anthropic_rate_limits(
    tmp_path, proxy_factory, primary
):
    """Claude on AWS as the backup: the CLI prints Bedrock's answer, decoded from its event stream."""
    from addon.fakes.cloud import FakeBedrock
    from addon.providers import cloud

    from .test_clouds import ACCESS_KEY, REGION, SECRET_KEY, platform, with_keys

    home = tmp_path / "home"
    home.mkdir()
    cli = find_cli(home)
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "60"),))
    with FakeBedrock(region=REGION, aws_access_key=ACCESS_KEY, aws_secret_key=SECRET_KEY) as bedrock:
        bedrock.behavior = Behavior(kind="ok", text=BACKUP_TEXT)
        config = endpoints_config(primary)
        config["endpoints"].append(platform("bedrock", "bedrock", bedrock.url))
        proxy = proxy_factory(config, with_keys(tmp_path))
        run, context = run_cli(cli, tmp_path, home, proxy, primary, bedrock)
        streamed = [r for r in bedrock.requests if r.path.endswith("/invoke-with-response-stream")]
    assert run.returncode == 0, context
    assert BACKUP_TEXT in run.stdout, context
    prompted = [r for r in streamed if any(t.strip() == PROMPT for t in user_texts(r.json()))]
    assert prompted, context
    body = prompted[0].json()
    assert set(body.get("anthropic_beta", [])) <= cloud.PLATFORM_BETAS, context
    assert not set(body) & {"model", "stream", *cloud.FIRST_PARTY_FIELDS}, context
    assert {m["role"] for m in body["messages"]} <= {"user", "assistant"}, context
    assert all(r.auth == "sigv4" and r.refusal is None for r in bedrock.requests), context
    # the primary's first 429 (maybe on the CLI's HEAD /) cooled it; the prompt then went to Bedrock
    assert primary.request_count >= 1 and proxy.endpoint("primary")["status"] == "cooling", context


def test_claude_cli_gets_an_openai_format_backups_answer(tmp_path, proxy_factory, primary):
    """The last line of defence: a Chat Completions model answers, translated both ways."""
    from addon.fakes import openai as fakeopenai
    from addon.fakes.openai import FakeOpenAI

    home = tmp_path / "home"
    home.mkdir()
    cli = find_cli(home)
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "60"),))
    with FakeOpenAI("openai") as openai:
        openai.behavior = fakeopenai.Behavior(answer=fakeopenai.Answer(text=BACKUP_TEXT))
        config = endpoints_config(primary)
        config["endpoints"].append(
            {"name": "openai", "provider": "openai", "baseUrl": openai.url, "models": {"*": "gpt-fake"}}
        )
        proxy = proxy_factory(config)
        run, context = run_cli(cli, tmp_path, home, proxy, primary)
        bodies = [r.json() for r in openai.requests]
        refusals = list(openai.refusals)
    assert run.returncode == 0, context + f"\nopenai refused: {refusals}"
    assert BACKUP_TEXT in run.stdout, context
    assert refusals == [], context  # strict as OpenAI: no argument it does not define
    prompted = [
        b for b in bodies if b.get("stream") and any(PROMPT in str(m.get("content")) for m in b["messages"])
    ]
    assert prompted, context
    body = prompted[0]
    assert body["messages"][0]["role"] == "system" and len(body.get("tools", [])) >= 10, context
    assert "cache_control" not in json.dumps(body) and "anthropic" not in json.dumps(sorted(body)), context


def test_claude_cli_answers_from_the_backup_when_the_primary_refuses_the_proxys_key(
    tmp_path, proxy_factory, primary, backup
):
    """A revoked key of the proxy's own: the CLI must not be told its login is bad."""
    home = tmp_path / "home"
    home.mkdir()
    cli = find_cli(home)
    primary.behavior = Behavior(kind="status", status=401)  # the API's own words for a bad key
    backup.behavior = Behavior(kind="ok", text=BACKUP_TEXT)
    proxy = proxy_factory(endpoints_config(primary, backup))
    run, context = run_cli(cli, tmp_path, home, proxy, primary, backup)
    assert run.returncode == 0, context
    assert BACKUP_TEXT in run.stdout, context
    said = (run.stdout + run.stderr).lower()
    assert "login" not in said and "api key" not in said, context
    assert main_requests(backup), context
    assert proxy.metric("ccf_endpoint_credentials_refused_total", endpoint="primary") >= 1, context
    assert proxy.endpoint("primary")["status"] == "cooling", context
