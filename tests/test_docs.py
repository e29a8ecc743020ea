"""The documentation: the site builds strictly, its references come from the code, and what it
shows (configs, commands, metrics, tests) is what the code has and the tests run."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from addon import config as schema
from addon.cli import commands as cli
from addon.config import Server, load_config
from addon.fakes.anthropic import FakeAnthropic
from addon.metrics import Metrics
from addon.state.endpoints import EndpointPool

from .conftest import ROOT, endpoints_config, free_port, wait_until
from .test_cli import Cli

DOCS = ROOT / "docs"
EXAMPLE = ROOT / "config.example.yaml"
PAGES = sorted(DOCS.rglob("*.md"))
README = ROOT / "README.md"


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    return load_module("ccf_docs_reference", ROOT / "scripts" / "reference.py")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as `mkdocs build --strict` writes it: a broken link, a missing page or snippet fails."""
    out = tmp_path_factory.mktemp("site")
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert "WARNING" not in built.stderr, built.stderr
    return out


def html(site: Path, page: str) -> str:
    return (site / page).read_text(encoding="utf-8")


# -- the site --------------------------------------------------------------------------------


def test_every_page_is_built_and_in_the_navigation(site):
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            for value in item.values() if isinstance(item, dict) else [item]:
                walk(value) if isinstance(value, list) else listed.append(value)

    walk(nav["nav"])
    assert sorted(listed) == sorted(str(page.relative_to(DOCS)) for page in PAGES)
    for page in listed:
        assert (site / page.replace(".md", ".html")).is_file(), page


EXTERNAL = re.compile(
    r"""<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)=["']?(?:https?:)?//""", re.I
)


def test_the_site_loads_nothing_from_outside(site):
    pages = list(site.rglob("*.html"))
    assert len(pages) >= len(PAGES)
    for page in pages:
        assert not EXTERNAL.search(page.read_text(encoding="utf-8")), page
    for sheet in site.rglob("*.css"):
        assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", sheet.read_text(encoding="utf-8")), sheet


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium not found: .ci/run installs Debian's")
def test_the_site_opens_from_disk_with_no_network(site):
    from playwright.sync_api import sync_playwright

    from .test_dashboard import CHROMIUM_ARGS

    outside: list[str] = []

    def only_files(route: Any) -> None:
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", only_files)
            page.goto((site / "index.html").as_uri())
            assert page.locator("h1").first.inner_text().startswith("claude-code-fallback")
            assert page.locator("img").first.evaluate("image => image.naturalWidth") > 0
            page.get_by_role("link", name="Operating it").first.click()
            page.wait_for_url("**/operating.html")
            assert page.locator("h1").first.inner_text().startswith("Operating it")
        finally:
            browser.close()
    assert outside == []


# -- the configuration reference -------------------------------------------------------------

# A comment line that reads as a key (`# region: us-east-1`, `#   - name: bedrock`) is a
# commented-out example: the check below counts its key as named by the example file.
COMMENTED_KEY = re.compile(r"^(\s*)# ?(\s*)((?:- )?[a-z][A-Za-z0-9]*:(?:\s|$).*)$")


def uncommented(text: str) -> str:
    return "\n".join(
        m[1] + m[2] + m[3] if (m := COMMENTED_KEY.match(line)) else line for line in text.splitlines()
    )


def example_problems(keys: set[str], text: str) -> list[str]:
    """Where the schema's keys and the keys the example file names (commented out or not) differ."""
    containers = {path.rsplit(".", 1)[0] for path in keys if "." in path}
    containers |= {path.rsplit(".", 1)[0] for path in containers if "." in path}
    named: set[str] = set()

    def walk(mapping: dict[Any, Any], prefix: str) -> None:
        for key, value in mapping.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            named.add(path)
            if path in containers and isinstance(value, dict):
                walk(value, path)
            elif f"{path}[]" in containers and isinstance(value, list):
                for entry in value:
                    if isinstance(entry, dict):
                        walk(entry, f"{path}[]")

    walk(yaml.safe_load(uncommented(text)) or {}, "")
    known = keys | containers
    missing = [f"{p}: a key of addon/config.py that config.example.yaml does not show" for p in keys - named]
    unknown = [f"{p}: named by config.example.yaml, not a key of addon/config.py" for p in named - known]
    return sorted(missing + unknown)


def schema_keys(module: Any = schema) -> set[str]:
    return {key.path for key in module.reference()}


def test_the_example_file_names_every_key_of_the_schema_and_no_other():
    assert example_problems(schema_keys(), EXAMPLE.read_text(encoding="utf-8")) == []


def test_ccf_init_ships_the_same_example_file():
    packaged = ROOT / "addon" / "config.example.yaml"
    assert packaged.is_symlink() and packaged.resolve() == EXAMPLE.resolve()
    assert cli.EXAMPLE_CONFIG.read_bytes() == EXAMPLE.read_bytes()


# In the package, so that the copy's relative imports (the platforms' table) resolve as the original's do.
CONFIG_COPY = "addon.ccf_config_copy"


def code_with_a_new_key(tmp_path: Path, **changes: str) -> Path:
    """A copy of addon/config.py with one more key in `server`, as a change to the code alone would add."""
    text = (ROOT / "addon" / "config.py").read_text(encoding="utf-8")
    anchor = '    port: int = _key("port", _PORT, default=8765, doc="The port the proxy listens on")\n'
    assert anchor in text
    line = changes.get(
        "line", '    colour: str = _key("colour", _string, default="blue", doc="What colour")\n'
    )
    copy = tmp_path / "config_copy.py"
    copy.write_text(text.replace(anchor, anchor + line), encoding="utf-8")
    return copy


def test_a_key_added_to_the_code_alone_fails_the_check_and_shows_in_the_reference(tmp_path, reference):
    changed = load_module(CONFIG_COPY, code_with_a_new_key(tmp_path))
    keys = schema_keys(changed)
    assert "server.colour" in keys
    assert example_problems(keys, EXAMPLE.read_text(encoding="utf-8")) == [
        "server.colour: a key of addon/config.py that config.example.yaml does not show"
    ]
    assert "| `server.colour` | `blue` | What colour. Takes a non-empty string. |" in reference.configuration(
        changed.reference()
    )


def test_a_key_without_its_meaning_cannot_be_declared(tmp_path):
    line = '    colour: str = _key("colour", _string, default="blue")\n'
    with pytest.raises(TypeError, match="doc"):
        load_module(CONFIG_COPY, code_with_a_new_key(tmp_path, line=line))


@pytest.mark.parametrize("line", ["  colour: blue", "  # colour: blue"])
def test_a_key_named_by_the_example_alone_fails_the_check(line):
    text = EXAMPLE.read_text(encoding="utf-8").replace("\nserver:\n", f"\nserver:\n{line}\n", 1)
    assert example_problems(schema_keys(), text) == [
        "server.colour: named by config.example.yaml, not a key of addon/config.py"
    ]


def test_the_example_shows_the_defaults_the_reference_gives():
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    for key in schema.reference():
        section, _, rest = key.path.partition(".")
        if section.startswith("endpoints") or key.shown:
            continue
        value: Any = data[section]
        for part in rest.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None and key.default is not None:
            continue  # a commented-out key
        expected = sorted(key.default) if isinstance(key.default, frozenset) else key.default
        assert value == ({} if expected == () else expected), key.path


def test_every_key_says_what_it_means_and_takes(site):
    page = html(site, "reference/configuration.html")
    for key in schema.reference():
        assert key.doc and key.accepts, key.path
        assert f"<code>{key.path}</code>" in page, key.path
    for variable in ("CLAUDE_FALLBACK_PORT", "CLAUDE_FALLBACK_WORKERS", "AWS_REGION", "ANTHROPIC_API_KEY"):
        assert f"<code>{variable}</code>" in page
    assert "fallback_web_max_flows" in page and "fallback.reload" in page  # the mitmproxy options


# -- the metrics reference -------------------------------------------------------------------


def exported() -> set[str]:
    """The name of each family a proxy's /metrics serves, from the registry itself."""
    text = Metrics(EndpointPool()).render().decode()
    # `_created`: when a counter started, prometheus-client's own
    return {f.name for f in text_string_to_metric_families(text) if not f.name.endswith("_created")}


def test_the_metrics_reference_lists_every_series_with_its_labels_and_meaning(site, reference):
    page = html(site, "reference/metrics.html")
    rows = reference.registry_families()
    assert {name.removesuffix("_total") for name, *_ in rows} == exported()
    for name, _, labels, meaning in rows:
        assert meaning, name
        assert f"<code>{name}</code>" in page
        for label in labels:
            assert f"<code>{label}</code>" in page
    requests = next(row for row in rows if row[0] == "ccf_requests_total")
    assert requests[2] == ["outcome", "client"]
    windows = next(row for row in rows if row[0] == "ccf_endpoint_ratelimit_utilization")
    assert windows[2] == ["endpoint", "window"]


def test_every_metric_the_docs_name_is_exported(reference):
    rows = reference.registry_families()
    names = {name for name, *_ in rows}
    histograms = {name for name, kind, *_ in rows if kind == "histogram"}
    known = names | {f"{h}{suffix}" for h in histograms for suffix in ("_bucket", "_sum", "_count")}
    for page in [*PAGES, README]:
        for name in re.findall(r"\bccf_[a-z_]+[a-z]", page.read_text(encoding="utf-8")):
            assert name in known, f"{page.name} names {name}, which /metrics does not serve"


# -- commands --------------------------------------------------------------------------------


def test_each_commands_help_links_to_the_page_that_explains_it(site):
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    helps = {"ccf": parser.format_help()} | {name: p.format_help() for name, p in commands.choices.items()}
    assert set(helps) == set(cli.PAGES)
    for name, text in helps.items():
        link = cli.PAGES[name]
        assert link in " ".join(text.split()), name
        page, _, anchor = link.removeprefix("docs/").partition("#")
        assert f'id="{anchor}"' in html(site, page.replace(".md", ".html")), link
        assert f"ccf {name}" in (DOCS / page).read_text(encoding="utf-8") or name == "ccf"


def inline_and_block_code(text: str) -> Iterator[str]:
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        yield from block.splitlines()
    yield from re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))


def test_every_ccf_command_the_docs_show_exists_with_its_options():
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    shown = 0
    for page in [*PAGES, README]:
        for code in inline_and_block_code(page.read_text(encoding="utf-8")):
            for match in re.finditer(r"(?:^|\$\()ccf ([a-z]+)([^`#)\"|]*)", code):
                name, rest = match[1], match[2]
                if name not in commands.choices:
                    continue  # `ccf start`/`ccf dev` as a phrase, or prose after a command
                own = commands.choices[name]
                options = {option for action in own._actions for option in action.option_strings}
                for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", rest):
                    assert flag in options, f"{page.name}: `ccf {name}{rest}`: no option {flag}"
                shown += 1
    assert shown > 30


# Each command a page shows in a code block, and the test (or CI step) that runs it.
RUN_BY = {
    "scripts/ccf": ["tests/test_docs.py::test_the_quick_start_runs_the_proxy_from_a_checkout"],
    "scripts/test": [".ci/run"],
    "pip install": ["tests/test_install.py::test_a_built_wheel_runs_the_demo_and_ships_the_example_config"],
    "ccf init": ["tests/test_cli.py::test_init_writes_the_example_once"],
    "ccf check": ["tests/test_cli.py::test_check_passes_when_every_endpoint_answers"],
    "ccf env": ["tests/test_cli.py::test_env_prints_two_lines_for_eval"],
    "ccf start": ["tests/test_cli.py::test_start_status_stop_round_trip"],
    "ccf status": ["tests/test_cli.py::test_start_status_stop_round_trip"],
    "ccf logs": ["tests/test_cli.py::test_start_status_stop_round_trip"],
    "ccf stop": ["tests/test_cli.py::test_start_status_stop_round_trip"],
    "ccf restart": [
        "tests/test_restart.py::test_a_restart_under_load_cuts_no_stream_and_refuses_no_connection"
    ],
    "ccf usage": [
        "tests/test_usage.py::test_an_answers_tokens_and_cost_reach_the_metric_the_log_line_the_page_and_ccf_usage"
    ],
    "ccf demo": [
        "tests/test_cli.py::test_demo_fails_over_to_the_backup",
        "tests/test_cli.py::test_demo_accounts_spreads_sessions_over_two_subscriptions",
    ],
    "claude": [
        "tests/test_claude_cli.py::"
        "test_claude_cli_prints_the_backups_answer_when_the_primary_errors_after_its_preamble"
    ],
    "mitmdump -s": ["tests/test_failover.py::test_healthy_primary_streams_and_gets_its_own_key"],
    "mitmweb -s": [
        "tests/test_operations.py::test_mitmweb_shows_endpoint_attempts_masked_keys_and_the_assembled_stream"
    ],
    "promtool check": [
        "tests/test_prometheus.py::test_promtool_accepts_the_alert_rules_and_their_tests_pass"
    ],
    "promtool test": ["tests/test_prometheus.py::test_promtool_accepts_the_alert_rules_and_their_tests_pass"],
    "$EDITOR": [],  # the user's own editor
}


def shell_commands(text: str) -> Iterator[str]:
    for block in re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s{2,}#", line)[0].strip()
            if line:
                inner = re.fullmatch(r'eval "\$\((.*)\)"', line)
                yield inner[1] if inner else line


def test_every_command_in_a_code_block_is_run_by_a_test():
    seen = set()
    for page in [*PAGES, README]:
        for command in shell_commands(page.read_text(encoding="utf-8")):
            words = shlex.split(command)
            key = next((k for k in RUN_BY if words[: len(k.split())] == k.split()), None)
            assert key is not None, f"{page.name}: `{command}` is run by no test RUN_BY names"
            seen.add(key)
    assert seen == set(RUN_BY)
    for where in {test for tests in RUN_BY.values() for test in tests}:
        path, _, name = where.partition("::")
        text = (ROOT / path).read_text(encoding="utf-8")
        assert (f"def {name}(" in text) if name else ("scripts/test" in text), where


# -- snippets, tests and tables the pages name -----------------------------------------------

EXAMPLES = sorted((DOCS / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_config_a_page_shows_loads(path):
    text = path.read_text(encoding="utf-8")
    variables = set(re.findall(r"\$\{([A-Z_]+)", text))
    env = {v: "redis://127.0.0.1:6379/0" if "REDIS" in v else f"sk-test-{v.lower()}" for v in variables}
    config = load_config(path, env)
    assert config.endpoints
    assert any(f'--8<-- "docs/examples/{path.name}"' in page.read_text(encoding="utf-8") for page in PAGES)


def test_no_page_writes_out_a_config_of_its_own():
    for page in [*PAGES, README]:
        for block in re.findall(r"```ya?ml\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            assert re.fullmatch(r'\s*--8<-- "[^"]+"\s*', block), (
                f"{page.name}: a config not from a file: {block}"
            )


def test_the_prometheus_example_scrapes_the_job_the_alerts_expect():
    scrape = yaml.safe_load((DOCS / "examples" / "prometheus.yml").read_text(encoding="utf-8"))
    rules = yaml.safe_load((ROOT / "contrib" / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    (down,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "CcfProxyDown"]
    (job,) = scrape["scrape_configs"]
    assert f'job="{job["job_name"]}"' in down["expr"]
    assert scrape["rule_files"][0].endswith("contrib/prometheus/alerts.yml")
    page = (DOCS / "operating.md").read_text(encoding="utf-8")
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert re.findall(r"^\| `(Ccf\w+)` \|", page, re.M) == alerts


def test_the_kubernetes_example_probes_readiness_and_liveness_and_outwaits_the_drain():
    pod = yaml.safe_load((DOCS / "examples" / "kubernetes.yml").read_text(encoding="utf-8"))
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pod["terminationGracePeriodSeconds"] > Server().drain_seconds


def test_every_test_the_pages_name_exists():
    named = 0
    for page in PAGES:
        for path, name in re.findall(r"(test_\w+\.py)::(test_\w+)", page.read_text(encoding="utf-8")):
            assert f"def {name}(" in (ROOT / "tests" / path).read_text(encoding="utf-8"), (
                f"{page.name}: {name}"
            )
            named += 1
    assert named >= 40


def test_the_fault_matrix_has_every_row_with_its_test():
    page = (DOCS / "failover.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \|(.*)\|$", page, re.M)
    assert [int(number) for number, _ in rows] == list(range(1, len(rows) + 1))
    assert len(rows) >= 40  # FAULTS.md's 30, and the platforms'
    for number, cells in rows:
        assert len(cells.split(" | ")) == 4 and "::test_" in cells, number


# -- the README ------------------------------------------------------------------------------


def test_the_readme_is_short_and_its_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target


@pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "ccf").exists(),
    reason="scripts/ccf runs from .venv, which scripts/test makes",
)
def test_the_quick_start_runs_the_proxy_from_a_checkout(tmp_path: Path, primary: FakeAnthropic):
    runner, port = Cli(tmp_path / "home"), free_port()
    config = runner.write_config(endpoints_config(primary, server={"port": port}))
    log = (tmp_path / "dev.log").open("wb")
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "ccf"), "-c", str(config), "dev"], env=runner.env, stdout=log, stderr=log
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: process.poll() is None and cli.fetch_health(url) is not None, 60, "scripts/ccf dev"
        )
        answer = httpx.post(
            url + "/v1/messages",
            json={"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": "client"},
            timeout=10,
        )
        assert answer.status_code == 200 and answer.headers["x-fake-name"] == "primary"
    finally:
        process.terminate()
        process.wait(20)
        log.close()
