"""Spend through the real proxy: the anthropic SDK against the fake, `ccf_cost_usd_total`, the
`request` log line, the status page, and `ccf usage` reading the store the proxy wrote, across
a restart of the proxy and across two proxies on one Redis."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from addon.fakes.anthropic import Behavior

from .conftest import ROOT, Proxy, endpoints_config, wait_until
from .test_failover import MESSAGE, sdk

ALICE = "ccf-client-key-ALICE-000000000001"
# Round prices for the model MESSAGE asks for: cache writes 1.25 and 2, reads 0.1 (per million)
PRICING = {"models": {"claude-sonnet-4-6": {"input": 1, "output": 2}}}
CACHING = Behavior(cache_read=1000, cache_write_5m=200, cache_write_1h=300)


def usage_config(*fakes, **sections: Any) -> dict[str, Any]:
    server = {"accessKeys": [{"name": "alice", "key": ALICE}]}
    return endpoints_config(*fakes, server=server, pricing=PRICING, **sections)


def ccf_usage(proxy: Proxy, *args: str) -> dict[str, Any]:
    """`ccf usage --json` as a user runs it beside that proxy (same config, same home)."""
    done = subprocess.run(
        [sys.executable, "-m", "addon.cli", "-c", str(proxy.config_path), "usage", "--json", *args],
        cwd=ROOT,
        env=proxy.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def requests_counted(proxy: Proxy) -> int:
    return sum(row["requests"] for row in ccf_usage(proxy)["rows"])


def ask(proxy: Proxy, stream: bool) -> Any:
    """One answer through the SDK as alice; the usage the SDK read from it."""
    client = sdk(proxy, default_headers={"x-ccf-access-key": ALICE})
    if stream:
        with client.messages.stream(**MESSAGE) as answer:
            return answer.get_final_message().usage
    return client.messages.create(**MESSAGE).usage


def cost_of(usage: Any) -> float:
    split = usage.cache_creation
    return (
        usage.input_tokens * 1
        + usage.output_tokens * 2
        + usage.cache_read_input_tokens * 0.1
        + split.ephemeral_5m_input_tokens * 1.25
        + split.ephemeral_1h_input_tokens * 2
    ) / 1_000_000


def request_lines(proxy: Proxy) -> list[dict[str, Any]]:
    lines = [line for line in proxy.logs().splitlines() if '"event": "request"' in line]
    return [json.loads(line[line.index("{") :]) for line in lines]


def test_an_answers_tokens_and_cost_reach_the_metric_the_log_line_the_page_and_ccf_usage(
    proxy_factory, primary
):
    primary.behavior = CACHING
    proxy = proxy_factory(usage_config(primary))
    reported = [ask(proxy, stream=True), ask(proxy, stream=False)]
    assert {u.cache_creation.ephemeral_1h_input_tokens for u in reported} == {300}
    cost = sum(cost_of(u) for u in reported)

    labels = {"client": "alice", "endpoint": "primary", "model": "claude-sonnet-4-6"}
    wait_until(lambda: proxy.metric("ccf_cost_usd_total", **labels) > 0, 5, "the cost metric")
    assert proxy.metric("ccf_cost_usd_total", **labels) == pytest.approx(cost)

    lines = wait_until(
        lambda: len(request_lines(proxy)) == 2 and request_lines(proxy), 5, "two request lines"
    )
    for line, usage in zip(lines, reported, strict=True):
        assert line["client"] == "alice" and line["model"] == "claude-sonnet-4-6" and line["billed"] is True
        assert (line["input_tokens"], line["output_tokens"]) == (usage.input_tokens, usage.output_tokens)
        assert (line["cache_read_tokens"], line["cache_write_tokens"]) == (1000, 500)
        assert (line["cache_write_5m_tokens"], line["cache_write_1h_tokens"]) == (200, 300)
        assert line["cost_usd"] == pytest.approx(cost_of(usage))

    expected = {
        "client": "alice",
        "endpoint": "primary",
        "model": "claude-sonnet-4-6",
        "requests": 2,
        "input_tokens": sum(u.input_tokens for u in reported),
        "output_tokens": sum(u.output_tokens for u in reported),
        "cache_read_tokens": sum(u.cache_read_input_tokens for u in reported),
        "cache_write_tokens": sum(u.cache_creation_input_tokens for u in reported),
        "cost_usd": pytest.approx(cost),
    }
    wait_until(lambda: ccf_usage(proxy)["rows"] == [expected], 10, "ccf usage to count both answers")

    def spend() -> Any:
        return json.loads(proxy.get("/dashboard/summary")[1])["spend"]

    today = wait_until(lambda: (s := spend()) and s["clients"] and s, 15, "the status page's spend")
    ((client,), (endpoint,)) = today["clients"], today["endpoints"]
    assert (client["name"], client["requests"], endpoint["name"]) == ("alice", 2, "primary")
    assert client["costUsd"] == pytest.approx(cost) == client["billedUsd"]


@pytest.mark.parametrize("ccf", [False, True], ids=["mitmdump", "ccf-dev"])
def test_counts_survive_a_restart_of_the_proxy(proxy_factory, primary, tmp_path, ccf):
    home = {"CLAUDE_FALLBACK_HOME": str(tmp_path / "ccf-home")}  # both proxies' store: usage.db there
    first = proxy_factory(usage_config(primary), home, ccf=ccf)
    ask(first, stream=True)
    ask(first, stream=False)
    first.stop()  # within the second that batches writes: the last write is made on the way out
    assert requests_counted(first) == 2
    second = proxy_factory(usage_config(primary), home, ccf=ccf)
    ask(second, stream=True)
    wait_until(lambda: requests_counted(second) == 3, 10, "the third answer added to the first two")


def test_two_proxies_on_one_redis_add_to_one_total(proxy_factory, redis_server, primary):
    state = {
        "backend": "redis",
        "redis": {"url": redis_server.url, "keyPrefix": f"test-{uuid.uuid4().hex[:6]}:"},
    }
    config = usage_config(primary, state=state)
    primary.behavior = CACHING
    one, two = proxy_factory(config), proxy_factory(config)
    reported = []
    for proxy in (one, two):
        wait_until(lambda p=proxy: p.health()["state"] == "redis", 10, "the proxy to reach Redis")
        reported.append(ask(proxy, stream=True))
    wait_until(lambda: requests_counted(one) == 2, 10, "both proxies' answers in Redis")
    (row,) = ccf_usage(two, "--by", "client")["rows"]
    assert (row["client"], row["endpoint"], row["model"], row["requests"]) == ("alice", None, None, 2)
    assert row["output_tokens"] == sum(u.output_tokens for u in reported)
    assert row["cost_usd"] == pytest.approx(sum(cost_of(u) for u in reported))
    assert not (one.workdir / "home" / "usage.db").exists()  # the fleet keeps no file of its own


def test_a_proxys_workers_add_to_one_usage_file(proxy_factory, primary):
    config = usage_config(primary)
    config["server"]["workers"] = 2
    proxy = proxy_factory(config, ccf=True)

    def post(_: int) -> int:  # a connection each, several at once: both workers serve
        headers = {"x-ccf-access-key": ALICE, "connection": "close"}
        return httpx.post(proxy.url + "/v1/messages", json=MESSAGE, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(post, range(40))) == {200}
    # (workers' lines may share a line of the log: they write it at once)
    assert set(re.findall(r'"event": "request", "worker": (\d+)', proxy.logs())) == {"0", "1"}
    wait_until(lambda: requests_counted(proxy) == 40, 10, "every worker's answers in the one file")
    assert "usage_store_down" not in proxy.logs()
