"""The Grafana dashboard and the alert rules in contrib/ query metrics a real proxy exports."""

from __future__ import annotations

import json
import re
import signal
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from addon.fakes.anthropic import Account, Behavior, Window

from .conftest import CUT_STREAM_ERRORS, ROOT, Proxy, endpoints_config, wait_until
from .test_failover import stream_text

DASHBOARD = ROOT / "contrib" / "grafana" / "claude-code-fallback.json"
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
SCRAPE_LABELS = {"job", "instance"}  # Prometheus adds these to every series it scrapes
PROMQL_WORDS = {"sum", "max", "min", "avg", "rate", "increase", "histogram_quantile", "by", "without"}
# what the issue asks the dashboard to show
WANTED = {
    "ccf_requests_total",
    "ccf_failovers_total",
    "ccf_endpoint_up",
    "ccf_endpoint_cooldown_remaining_seconds",
    "ccf_upstream_time_to_headers_seconds_bucket",
    "ccf_tokens_total",
    "ccf_active_streams",
    "ccf_retry_budget_exhausted_total",
}


def exported_series(proxy: Proxy) -> dict[str, set[str]]:
    """Each sample name in /metrics, with every label name it carries."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(proxy.get("/metrics")[1].decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def references(expr: str) -> tuple[dict[str, set[str]], set[str], set[str]]:
    """(metric → label names it is selected by, labels grouped by, words that are neither)."""
    selected: dict[str, set[str]] = {}
    for name, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\s*(?:\{([^}]*)\})?\s*(?:\[[^\]]*\])?", expr):
        if name in PROMQL_WORDS:
            continue
        selected.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    grouped = {
        label.strip()
        for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in labels.split(",")
    }
    for label in grouped:
        selected.pop(label, None)
    others = {name for name in selected if not name.startswith("ccf_") and name != "up"}
    return selected, grouped, others


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


@pytest.fixture
def busy_proxy(proxy_factory, primary, backup) -> Proxy:
    """A proxy after a failover, tokens, usage windows, a cooldown, a reload and a stream abort,
    with a budget."""
    backup.account = Account(Window("5h", utilization=0.5, per_request=0.0))
    proxy = proxy_factory(endpoints_config(primary, backup, server={"budget": {"monthly": 1000}}))
    primary.behavior = Behavior(kind="status", status=429)
    assert stream_text(proxy) == "Hello from the fake."
    backup.behavior = Behavior(kind="close_mid_stream", text="one two three four", after_events=5)
    with pytest.raises(CUT_STREAM_ERRORS):
        stream_text(proxy)
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.metric("ccf_config_reloads_total", result="success") == 1, 10, "the reload")
    wait_until(lambda: "ccf_stream_aborts_total" in exported_series(proxy), 10, "the abort's metric")
    return proxy


def check(exprs: list[str], series: dict[str, set[str]]) -> set[str]:
    used: set[str] = set()
    for expr in exprs:
        selected, grouped, others = references(expr)
        assert not others, f"{expr!r}: {others} are neither metrics of the proxy nor PromQL words"
        for metric, labels in selected.items():
            if metric == "up":  # the scrape's own series, not the proxy's
                continue
            assert metric in series, f"{expr!r}: the proxy exports no {metric}"
            unknown = labels - series[metric] - SCRAPE_LABELS
            assert not unknown, f"{expr!r}: {metric} has no label {unknown}"
            missing = grouped - series[metric] - SCRAPE_LABELS
            assert not missing, f"{expr!r}: {metric} has no label {missing} to group by"
            used.add(metric)
    return used


def test_every_dashboard_query_reads_real_metrics_and_labels(busy_proxy):
    series = exported_series(busy_proxy)
    used = check(dashboard_exprs(), series)
    assert used >= WANTED, f"the dashboard does not show {WANTED - used}"


def test_every_alert_reads_real_metrics_and_labels(busy_proxy):
    check(alert_exprs(), exported_series(busy_proxy))


def test_the_dashboard_asks_for_its_data_source():
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    sources = [p["datasource"] for p in dashboard["panels"] if p["type"] != "row"]
    sources += [t["datasource"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert sources and all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_checker_catches_a_wrong_metric_and_a_wrong_label():
    series = {"ccf_requests_total": {"outcome"}}
    with pytest.raises(AssertionError, match="exports no ccf_request_total"):
        check(["rate(ccf_request_total[5m])"], series)
    with pytest.raises(AssertionError, match="has no label"):
        check(['sum by (endpoint) (rate(ccf_requests_total{outcome="ok"}[5m]))'], series)
    with pytest.raises(AssertionError, match="has no label"):
        check(['rate(ccf_requests_total{result="ok"}[5m])'], series)
    with pytest.raises(AssertionError, match="neither metrics"):
        check(["rate(http_requests_total[5m])"], series)
