"""The metrics pass `promtool check metrics`, and a real Prometheus server scrapes them."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest

from addon.fakes.anthropic import Behavior

from .conftest import ACCESS_KEY, ROOT, endpoints_config, free_port, wait_until
from .test_failover import MESSAGE, post, sdk

needs = "install Debian's `prometheus` package (.ci/run does)"


def exercise(proxy, primary) -> None:
    headers = {"x-ccf-access-key": proxy.key} if proxy.key else {}
    primary.behavior = Behavior(kind="status", status=429)
    with sdk(proxy, default_headers=headers).messages.stream(**MESSAGE) as stream:
        assert stream.get_final_text()
    primary.behavior = Behavior(kind="ok")
    assert post(proxy, stream=True, headers=headers).status_code == 200


@pytest.mark.skipif(shutil.which("promtool") is None, reason=f"promtool not found: {needs}")
def test_promtool_accepts_the_metrics(proxy, primary):
    exercise(proxy, primary)
    text = proxy.get("/metrics")[1]
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"ccf_tokens_total" in text and b"ccf_failovers_total" in text
    assert b'ccf_cost_usd_total{client="' in text  # priced: the fake answers claude-sonnet-4-6


@pytest.mark.skipif(shutil.which("prometheus") is None, reason=f"prometheus not found: {needs}")
def test_a_real_prometheus_scrapes_both_listeners(proxy_factory, primary, backup, tmp_path):
    # Under an access key, as a team's gateway runs: the proxy port wants it as a bearer
    # token (the README's scrape config), the metrics port stays open.
    metrics_port = free_port()
    server = {"metricsPort": metrics_port, "accessKey": ACCESS_KEY}
    proxy = proxy_factory(endpoints_config(primary, backup, server=server))
    exercise(proxy, primary)
    proxy_target = proxy.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: proxy\n    authorization: {{type: Bearer, credentials: {ACCESS_KEY}}}\n"
        f"    static_configs:\n      - targets: ['{proxy_target}']\n"
        f"  - job_name: side\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    web_port = free_port()
    server = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{web_port}/api/v1/query"

    def query(expr: str) -> list[dict]:
        try:
            return httpx.get(api, params={"query": expr}, timeout=5).json()["data"]["result"]
        except (httpx.HTTPError, KeyError, ValueError):
            return []

    try:
        up = wait_until(
            lambda: len([r for r in query("up") if r["value"][1] == "1"]) == 2, 60, "both scrapes"
        )
        assert up
        failovers = wait_until(lambda: query("ccf_failovers_total"), 30, "failovers in Prometheus")
        jobs = {r["metric"]["job"] for r in failovers}
        assert jobs == {"proxy", "side"}
        assert all(r["metric"]["from_endpoint"] == "primary" for r in failovers)
        assert float(failovers[0]["value"][1]) == 1
        assert wait_until(lambda: query('ccf_endpoint_up{endpoint="primary"} == 0'), 30, "primary down")
    finally:
        server.terminate()
        server.wait(10)


RULES = ROOT / "contrib" / "prometheus"


@pytest.mark.skipif(shutil.which("promtool") is None, reason=f"promtool not found: {needs}")
def test_promtool_accepts_the_alert_rules_and_their_tests_pass():
    def promtool(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True, timeout=60)

    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
