"""The status page: served by a real proxy, read by a real headless Chromium, guarded by the access key."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from mitmproxy import io
from mitmproxy.http import HTTPFlow
from playwright.sync_api import Browser, Page, expect, sync_playwright

from addon.fakes.anthropic import Account, Behavior, Window

from .conftest import ACCESS_KEY, endpoints_config, wait_until
from .test_cli import Cli
from .test_failover import post

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = {"x-ccf-access-key": ACCESS_KEY}
SAME_ORIGIN = {"sec-fetch-site": "same-origin"}
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Chromium not found: install Debian's `chromium` package (.ci/run does)",
)
expect.set_options(timeout=20_000)  # two shared cores: the page polls once a second, give it room


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def guarded(proxy_factory, primary, backup, tmp_path):
    """A proxy under server.accessKey, whose backup reports two usage windows."""
    backup.account = Account(
        Window("5h", utilization=0.42, per_request=0.0), Window("7d", utilization=0.18, per_request=0.0)
    )
    config = endpoints_config(primary, backup, server={"accessKey": ACCESS_KEY})
    config["endpoints"].append({"name": "spare", "baseUrl": "http://127.0.0.1:9", "enabled": False})
    # every flow is saved as mitmweb would show it: the key and the cookie must be masked there
    return proxy_factory(config, None, "--set", f"save_stream_file={flows_file(tmp_path)}")


def flows_file(tmp_path: Path) -> Path:
    return tmp_path / "flows.mitm"


def fail_over(proxy, primary) -> None:
    primary.behavior = Behavior(kind="status", status=429)
    response = post(proxy, stream=True, headers=KEY)
    assert response.status_code == 200 and response.headers["x-fake-name"] == "backup"


def row(page: Page, endpoint: str):
    return page.locator(f'#endpoints tr[data-endpoint="{endpoint}"]')


def countdown(page: Page) -> int:
    text = row(page, "primary").locator(".countdown").inner_text()
    match = re.fullmatch(r"(\d+)s left", text)
    assert match, text
    return int(match.group(1))


@needs_chromium
def test_the_page_shows_a_failover_live_without_reloading(guarded, primary, browser, tmp_path):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    answer = page.goto(f"{guarded.url}/?key={ACCESS_KEY}")
    assert answer is not None and answer.status == 200
    assert page.url == guarded.url + "/"  # the key left the address bar
    (cookie,) = context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/")
    assert ACCESS_KEY not in cookie["value"]
    expect(row(page, "primary")).to_contain_text("serving")
    expect(row(page, "spare")).to_contain_text("disabled")
    expect(page.locator("#incidents")).to_contain_text("None since the proxy started.")
    page.evaluate("window.loadedOnce = true")

    fail_over(guarded, primary)

    expect(row(page, "primary")).to_contain_text("cooling")
    expect(row(page, "primary")).to_contain_text("HTTP 429")
    expect(row(page, "backup")).to_contain_text("serving")
    first = countdown(page)
    wait_until(lambda: countdown(page) < first, 15, "the countdown to go down")
    incident = page.locator("#incidents tr").first
    expect(incident).to_contain_text("failover")
    expect(incident.locator("td").nth(2)).to_have_text("primary")
    expect(incident.locator("td").nth(3)).to_have_text("backup")
    expect(incident.locator("td").nth(4)).to_have_text("HTTP 429")
    expect(page.locator("#windows")).to_contain_text("5h: 42 %")
    expect(page.locator("#windows")).to_contain_text("7d: 18 %")
    history = page.locator('#history [data-endpoint="primary"] figcaption')
    expect(history.nth(0)).to_have_text("Requests 1")
    expect(history.nth(1)).to_have_text("Failovers 1")
    expect(page.locator('#history [data-endpoint="backup"] figcaption').nth(2)).to_have_text(
        re.compile(r"Tokens [1-9]")
    )
    expect(row(page, "backup").locator("td").nth(2)).to_have_text(re.compile(r"\d+ ms"))
    assert page.evaluate("window.loadedOnce") is True  # changed in place, never reloaded
    page.screenshot(path=tmp_path / "status-page.png", full_page=True)
    assert (tmp_path / "status-page.png").stat().st_size > 10_000

    page.set_viewport_size({"width": 360, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    page.screenshot(path=tmp_path / "status-page-phone.png", full_page=True)
    context.close()
    wait_until(lambda: flows_file(tmp_path).read_bytes().count(b"/dashboard/summary") > 2)
    with flows_file(tmp_path).open("rb") as saved:
        requests = [f.request for f in io.FlowReader(saved).stream() if isinstance(f, HTTPFlow)]
    (exchange,) = [r for r in requests if "key" in r.query]
    assert exchange.query["key"] == "ccf…0005"  # masked on the flow
    assert ACCESS_KEY.encode() not in flows_file(tmp_path).read_bytes()
    # the session cookie is masked wherever the browser sent it (its Set-Cookie had to reach it whole)
    assert all(cookie["value"].encode() not in bytes(r.headers) for r in requests)
    assert any("…" in r.cookies.get("ccf_session", "") for r in requests)


@needs_chromium
def test_without_the_key_the_page_is_refused(guarded, browser):
    page = browser.new_page()
    for address in ("/", "/dashboard", "/?key=ccf-wrong-key-000000000000"):
        answer = page.goto(guarded.url + address)
        assert answer is not None and answer.status == 401
        expect(page.locator("body")).to_contain_text("needs the proxy's access key")
    assert page.context.cookies() == []
    page.close()


@needs_chromium
def test_the_reload_button_works_from_the_keyboard(guarded, browser):
    page = browser.new_page()
    page.goto(f"{guarded.url}/dashboard?key={ACCESS_KEY}")
    expect(row(page, "primary")).to_be_visible()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "reload"
    page.keyboard.press("Enter")
    expect(page.locator("#reload-result")).to_have_text("Config reloaded.")
    assert guarded.metric("ccf_config_reloads_total", result="success") == 1
    page.close()


def test_the_summary_says_who_serves_who_cools_and_what_happened(guarded, primary):
    assert httpx.get(guarded.url + "/dashboard/summary").status_code == 401
    fail_over(guarded, primary)
    summary = httpx.get(guarded.url + "/dashboard/summary", headers=KEY).json()
    assert summary["serving"] == "backup"
    states = {e["name"]: e["state"] for e in summary["endpoints"]}
    assert states == {"primary": "cooling", "backup": "serving", "spare": "disabled"}
    primary_state = summary["endpoints"][0]
    assert 0 < primary_state["cooldownSecondsLeft"] <= 30 and primary_state["lastErrorDetail"] == "HTTP 429"
    assert summary["endpoints"][1]["timeToHeadersP50Ms"] > 0
    assert summary["configSource"] == str(guarded.config_path)
    history = summary["history"]["endpoints"]
    assert len(summary["history"]["minutes"]) == 60
    assert (sum(history["primary"]["requests"]), sum(history["primary"]["errors"])) == (1, 1)
    assert sum(history["primary"]["failovers"]) == 1
    assert sum(history["backup"]["tokens"]) > 0
    (incident,) = summary["incidents"]
    assert (incident["event"], incident["from"], incident["to"], incident["reason"]) == (
        "failover",
        "primary",
        "backup",
        "HTTP 429",
    )


def test_reload_is_for_the_page_own_origin_only(guarded):
    def reload(headers: dict[str, str]) -> httpx.Response:
        return httpx.post(guarded.url + "/dashboard/reload", headers=headers)

    assert reload(SAME_ORIGIN).status_code == 401  # no key, no cookie
    assert reload(KEY).status_code == 403  # no sign of where it comes from
    assert reload({**KEY, "sec-fetch-site": "cross-site"}).status_code == 403
    assert reload({**KEY, "origin": "http://evil.example"}).status_code == 403
    assert guarded.metric("ccf_config_reloads_total", result="success") == 0
    answer = reload({**KEY, "origin": guarded.url})
    assert answer.status_code == 200 and answer.json() == {"ok": True, "error": None}
    guarded.config_path.write_text("endpoints: not a list\n")
    answer = reload({**KEY, **SAME_ORIGIN})
    assert answer.status_code == 422 and answer.json()["ok"] is False
    assert guarded.metric("ccf_config_reloads_total", result="error") >= 1


@needs_chromium
def test_the_page_says_when_an_endpoint_refused_the_proxys_credentials(proxy, primary, browser):
    primary.behavior = Behavior(kind="status", status=401)  # to the proxy's key: fails over
    assert post(proxy).headers["x-fake-name"] == "backup"
    page = browser.new_page()
    page.goto(proxy.url + "/")
    state = row(page, "primary").locator("td").nth(0)
    expect(state).to_contain_text("cooling")
    expect(state).to_contain_text("credentials refused (HTTP 401)")
    expect(row(page, "primary")).to_contain_text("the endpoint refused the proxy's credentials")
    page.close()


def test_a_proxy_without_access_key_serves_the_page_openly(proxy):
    page = httpx.get(proxy.url + "/")
    assert page.status_code == 200 and "<title>claude-code-fallback status</title>" in page.text
    assert "script-src 'sha256-" in page.headers["content-security-policy"]
    assert httpx.get(proxy.url + "/dashboard/summary").json()["serving"] == "primary"
    assert "set-cookie" not in httpx.get(proxy.url + "/?key=anything").headers


def test_ccf_open_gives_the_browser_the_key_once_and_prints_it_nowhere(guarded, tmp_path):
    cli = Cli(tmp_path / "home")
    opened = fake_browser(cli, tmp_path / "opened")
    result = cli("--config", str(guarded.config_path), "--port", str(guarded.port), "open")
    assert result.returncode == 0, result.stderr
    assert f"status page: {guarded.url}/" in result.stdout
    assert ACCESS_KEY not in result.stdout + result.stderr
    first = httpx.get(wait_until(opened, 10, "the browser to start"))
    assert first.status_code == 303 and first.headers["location"] == "/"
    assert httpx.get(guarded.url + "/", cookies=first.cookies).status_code == 200


def test_ccf_open_gives_a_named_key_when_the_proxy_has_only_named_keys(proxy_factory, primary, tmp_path):
    keys = [{"name": "alice", "key": "ccf-alice-key-0001"}, {"name": "bob", "key": "ccf-bob-key-0002"}]
    proxy = proxy_factory(endpoints_config(primary, server={"accessKeys": keys}))
    cli = Cli(tmp_path / "home")
    target = ("--config", str(proxy.config_path), "--port", str(proxy.port), "open")
    for chosen, extra in (("alice", ()), ("bob", ("--as", "bob"))):
        opened = fake_browser(cli, tmp_path / f"opened-{chosen}")
        result = cli(*target, *extra)
        assert result.returncode == 0, result.stderr
        assert f"the key of '{chosen}'" in result.stdout and "ccf-" not in result.stdout + result.stderr
        first = httpx.get(wait_until(opened, 10, "the browser to start"))
        assert first.status_code == 303
        assert httpx.get(proxy.url + "/", cookies=first.cookies).status_code == 200
    unknown = cli(*target, "--as", "carol")
    assert unknown.returncode != 0 and "no access key named 'carol'" in unknown.stderr
    assert "alice, bob" in unknown.stderr and "ccf-" not in unknown.stderr


def fake_browser(cli: Cli, landing: Path) -> Callable[[], str]:
    """Makes `cli`'s browser a script that writes the address it is given to `landing`;
    returns what reads it back ("" until it is there)."""
    browser = landing.with_suffix(".sh")
    browser.write_text(f'#!/bin/sh\necho "$1" > {landing}\n')
    browser.chmod(0o755)
    cli.env["BROWSER"] = str(browser)
    return lambda: landing.read_text().strip() if landing.exists() else ""


def test_ccf_open_says_when_no_proxy_answers(tmp_path):
    cli = Cli(tmp_path / "home")
    cli.env["BROWSER"] = "false"
    cli.write_config(yaml.safe_load("endpoints: [{name: a, baseUrl: 'http://127.0.0.1:9'}]"))
    result = cli("--port", "9", "open")
    assert result.returncode == 3 and "no proxy answers" in result.stderr


def test_the_session_cookie_never_reaches_an_endpoint(guarded, primary):
    assert post(guarded, headers={**KEY, "cookie": "ccf_session=abc123; theirs=1"}).status_code == 200
    assert primary.wait_for_requests(1)[0].header("cookie") == "theirs=1"
