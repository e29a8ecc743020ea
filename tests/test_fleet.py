"""A fleet sharing its view of the endpoints through a real redis-server (`state.backend: redis`).

Three real `ccf dev` processes, one redis-server on a free loopback port, fake upstreams,
real clients. Redis is killed and started again for real.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from addon.fakes.anthropic import Account, Behavior, Window

from .conftest import ROOT, endpoints_config, wait_until
from .test_failover import MESSAGE

WORDS = "one two three four five six seven eight"
ALICE_KEY = "ccf-client-key-ALICE-000000000001"
BOB_KEY = "ccf-client-key-BOB-0000000000002"


def fleet_config(redis_server, *fakes, **sections):
    state = {
        "backend": "redis",
        "redis": {"url": redis_server.url, "keyPrefix": f"test-{uuid.uuid4().hex[:6]}:"},
    }
    return endpoints_config(*fakes, state=state, **sections)


def start_fleet(proxy_factory, config, count=3):
    proxies = [proxy_factory(config, ccf=True) for _ in range(count)]
    for proxy in proxies:
        wait_until(lambda p=proxy: p.health()["state"] == "redis", 10, "the instance to reach Redis")
    return proxies


def ask(proxy, stream=False, headers=None) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/messages",
        json=dict(MESSAGE, stream=stream),
        headers={"x-api-key": "sk-ant-client-key-0000", **(headers or {})},
        timeout=30,
    )


def cooling(proxy, name="primary") -> bool:
    return proxy.endpoint(name)["status"] == "cooling"


def test_a_429_seen_by_one_instance_keeps_the_whole_fleet_off_the_primary(
    proxy_factory, redis_server, primary, backup
):
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "60"),))
    a, b, c = start_fleet(proxy_factory, fleet_config(redis_server, primary, backup))
    assert ask(a).headers["x-fake-name"] == "backup"
    started = time.monotonic()
    wait_until(lambda: cooling(b) and cooling(c), 2, "the cooldown to reach the other instances")
    assert time.monotonic() - started < 1.0
    assert b.endpoint("primary")["cooldownSecondsLeft"] > 55  # the retry-after, not a guess
    for i in range(30):
        assert ask((a, b, c)[i % 3], stream=i % 2 == 0).headers["x-fake-name"] == "backup"
    assert primary.request_count == 1  # in total, across the fleet


def test_after_the_cooldown_exactly_one_probe_reaches_the_primary_from_the_fleet(
    proxy_factory, redis_server, primary, backup
):
    primary.behavior = Behavior(kind="status", status=503)
    config = fleet_config(redis_server, primary, backup, retry={"cooldownSeconds": 2})
    fleet = start_fleet(proxy_factory, config)
    assert ask(fleet[0]).headers["x-fake-name"] == "backup"
    wait_until(lambda: all(cooling(p) for p in fleet), 2, "the cooldown to reach every instance")
    probe = Behavior(kind="ok", delay=1.5)  # a slow probe: the others must not stampede meanwhile
    primary.behavior = probe
    wait_until(lambda: all(p.endpoint("primary")["cooldownSecondsLeft"] == 0 for p in fleet), 5, "cooldowns")
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: ask(fleet[i % 3]), range(12)))
    assert all(r.status_code == 200 for r in answers)
    seen = primary.requests[1:]  # after the first 503
    probed_at = seen[0].time
    assert len([r for r in seen if r.time < probed_at + probe.delay]) == 1
    assert sum(r.headers["x-fake-name"] == "backup" for r in answers) >= 11
    # the probe's verdict reaches everyone: the primary serves again across the fleet
    wait_until(lambda: not any(cooling(p) for p in fleet), 3, "the recovery to reach every instance")
    primary.behavior = Behavior(kind="ok")
    assert {ask(p).headers["x-fake-name"] for p in fleet} == {"primary"}


def test_a_session_served_by_one_instance_stays_on_its_account_through_another(
    proxy_factory, redis_server, primary, backup
):
    primary.account = Account(Window("5h", utilization=0.6, per_request=0.0))
    backup.account = Account(Window("5h", utilization=0.1, per_request=0.0))
    config = fleet_config(redis_server, primary, backup, routing={"strategy": "least-utilized"})
    a, b = start_fleet(proxy_factory, config, count=2)
    session = {"x-claude-code-session-id": str(uuid.uuid4())}
    assert ask(a).headers["x-fake-name"] == "primary"  # a tie: A now knows the primary is at 60 %
    assert ask(a, headers=session).headers["x-fake-name"] == "backup"  # the emptier one
    # B has read neither account: on its own it would pick the primary (a tie, config order)
    assert ask(b, headers=session).headers["x-fake-name"] == "backup"
    assert ask(b, stream=True, headers=session).headers["x-fake-name"] == "backup"


def test_redis_killed_mid_run_loses_no_request_and_sharing_resumes(
    proxy_factory, redis_server, primary, backup
):
    primary.behavior = Behavior(kind="ok", text=WORDS, event_delay=0.1)
    fleet = start_fleet(proxy_factory, fleet_config(redis_server, primary, backup))

    async def streams(count: int) -> list[str]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:

            async def one(i: int) -> str:
                body = dict(MESSAGE, stream=True)
                async with client.stream("POST", fleet[i % 3].url + "/v1/messages", json=body) as response:
                    text = (await response.aread()).decode()
                    return "ok" if response.status_code == 200 and "message_stop" in text else text[:200]

            return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=False)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(asyncio.run, streams(200))
        primary.wait_for_requests(60, timeout=30)
        redis_server.stop()  # mid-run
        wait_until(
            lambda: all(p.health()["state"] == "local" for p in fleet), 10, "every instance to go local"
        )
        results = running.result(timeout=120)
    assert results == ["ok"] * 200
    for proxy in fleet:
        assert proxy.metric("ccf_state_backend_up") == 0
        assert proxy.logs().count('"state_backend_down"') == 1  # logged once
    # Learnt alone while Redis is away: the others do not hear of it yet.
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "60"),))
    assert ask(fleet[0]).headers["x-fake-name"] == "backup"
    assert not cooling(fleet[1])
    redis_server.start()
    restarted = time.monotonic()
    wait_until(lambda: cooling(fleet[1]) and cooling(fleet[2]), 5, "the cooldown to be shared again")
    assert time.monotonic() - restarted < 2.0
    assert all(p.metric("ccf_state_backend_up") == 1 for p in fleet)


def test_the_fleet_view_lists_every_live_instance(proxy_factory, redis_server, primary, backup):
    # under named keys, as a team runs it: `ccf status --fleet` presents the config's first key
    server = {"accessKeys": [{"name": "alice", "key": ALICE_KEY}]}
    fleet = start_fleet(proxy_factory, fleet_config(redis_server, primary, backup, server=server))
    wait_until(lambda: len(fleet[0].health_fleet()) == 3, 5, "three heartbeats")
    instances = fleet[0].health_fleet()
    assert sorted(i["address"] for i in instances) == sorted(f"127.0.0.1:{p.port}" for p in fleet)
    for instance in instances:
        assert instance["version"] and instance["uptimeSeconds"] >= 0 and instance["activeStreams"] == 0
        assert set(instance["endpoints"]) == {"primary", "backup"}
    fleet[2].stop()
    wait_until(lambda: len(fleet[0].health_fleet()) == 2, 10, "the stopped instance to leave the view")
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "addon.cli",
            "-c",
            str(fleet[0].config_path),
            "-p",
            str(fleet[0].port),
            "status",
            "--fleet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=fleet[0].env,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    assert f"127.0.0.1:{fleet[0].port}" in status.stdout and f"127.0.0.1:{fleet[1].port}" in status.stdout
    assert "PRIMARY" in status.stdout and "state     redis" in status.stdout


def test_an_unreachable_redis_is_a_warning_and_local_state(proxy_factory, primary, backup):
    config = endpoints_config(
        primary, backup, state={"backend": "redis", "redis": {"url": "redis://127.0.0.1:9/0"}}
    )
    proxy = proxy_factory(config, ccf=True)
    assert ask(proxy).headers["x-fake-name"] == "primary"
    assert proxy.health()["state"] == "local"
    assert proxy.metric("ccf_state_backend_up") == 0
    wait_until(lambda: '"state_backend_down"' in proxy.logs(), 5, "the warning")
    assert proxy.health_fleet() is None


def test_a_redis_url_with_a_wrong_scheme_is_a_config_error(tmp_path, primary):
    config = endpoints_config(primary, state={"backend": "redis", "redis": {"url": "http://127.0.0.1:6379"}})
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    run = subprocess.run(
        [sys.executable, "-m", "addon.cli", "-c", str(path), "dev"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert run.returncode == 2
    assert (
        f"{path}: state.redis.url: expected a redis://, rediss:// or unix:// URL, got scheme 'http'"
        in run.stderr
    )


# -- named client keys ------------------------------------------------------------------------


@pytest.fixture
def keyed(proxy_factory, primary, backup):
    config = endpoints_config(primary, backup)
    config["server"] = {"accessKeys": [{"name": "alice", "key": ALICE_KEY}, {"name": "bob", "key": BOB_KEY}]}
    return proxy_factory(config)


def test_named_client_keys_show_who_used_what(keyed, primary):
    assert ask(keyed, headers={"x-ccf-access-key": ALICE_KEY}).status_code == 200
    assert ask(keyed, stream=True, headers={"x-ccf-access-key": ALICE_KEY}).status_code == 200
    assert ask(keyed, headers={"x-api-key": BOB_KEY}).status_code == 200
    refused = ask(keyed, headers={"x-api-key": "sk-ant-someone-else-000000000"})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    wait_until(lambda: keyed.metric("ccf_requests_total", outcome="success", client="alice") == 2)
    assert keyed.metric("ccf_requests_total", outcome="success", client="bob") == 1
    assert keyed.metric("ccf_requests_total", outcome="rejected", client="unauthenticated") == 1
    assert keyed.health()["clients"] == {"alice": 2, "bob": 1, "unauthenticated": 1}
    logs = keyed.logs()
    assert '"client": "alice"' in logs and '"client": "bob"' in logs
    assert ALICE_KEY not in logs and BOB_KEY not in logs
    for seen in primary.requests:  # the proxy's key is never forwarded
        assert ALICE_KEY not in json.dumps(seen.headers) and BOB_KEY not in json.dumps(seen.headers)


def test_the_retry_budget_is_the_fleets(proxy_factory, redis_server, primary):
    primary.behavior = Behavior(kind="status", status=503)
    retry = {"maxRetries": 3, "budgetMinRetries": 2, "budgetRatio": 0, "initialDelay": 10, "maxDelay": 50}
    retry["maxWaitSeconds"] = 60  # past the cooldown: only the budget stops the retries
    a, b = start_fleet(proxy_factory, fleet_config(redis_server, primary, retry=retry), count=2)
    assert ask(a).status_code == 503
    assert primary.request_count == 3  # the first attempt and the fleet's 2 retries, all spent by A
    # B hears of A's spending with A's next heartbeat (once a second)
    wait_until(
        lambda: any(
            i["budget"][1] == 2 for i in b.health_fleet() or [] if i["address"].endswith(f":{a.port}")
        ),
        5,
        "A's budget in B's view of the fleet",
    )
    assert ask(b).status_code == 503
    assert primary.request_count == 4  # B tried once and did not retry: the budget was spent
    assert b.metric("ccf_retry_budget_exhausted_total") == 1


def test_a_flushed_redis_is_refilled_and_nothing_fails(proxy_factory, redis_server, primary, backup):
    fleet = start_fleet(proxy_factory, fleet_config(redis_server, primary, backup), count=2)
    wait_until(lambda: len(fleet[0].health_fleet() or []) == 2, 5, "two heartbeats")
    assert redis_server.command("FLUSHALL").startswith(b"+OK")
    assert all(ask(p).status_code == 200 for p in fleet)
    wait_until(lambda: len(fleet[0].health_fleet() or []) == 2, 5, "the heartbeats to come back")
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "60"),))
    assert ask(fleet[0]).headers["x-fake-name"] == "backup"
    wait_until(lambda: cooling(fleet[1]), 2, "the cooldown to be shared after the flush")


def test_a_slow_redis_is_gone_around_and_sharing_comes_back(proxy_factory, redis_server, primary, backup):
    fleet = start_fleet(proxy_factory, fleet_config(redis_server, primary, backup), count=2)
    with ThreadPoolExecutor(1) as pool:
        sleeping = pool.submit(redis_server.command, "DEBUG", "SLEEP", "3")  # Redis answers nothing for 3 s
        wait_until(
            lambda: all(p.health()["state"] == "local" for p in fleet), 5, "every instance to go local"
        )
        assert all(ask(p).status_code == 200 for p in fleet)  # served meanwhile, from local state
        assert sleeping.result(timeout=10).startswith(b"+OK")
    wait_until(lambda: all(p.health()["state"] == "redis" for p in fleet), 5, "Redis to be used again")
    primary.behavior = Behavior(kind="status", status=429, headers=(("retry-after", "60"),))
    assert ask(fleet[0]).headers["x-fake-name"] == "backup"
    wait_until(lambda: cooling(fleet[1]), 2, "the cooldown to be shared again")
