"""Running it every day: live reload, drain on SIGTERM, masked secrets (rows 23-24), mitmweb inspection."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import yaml
from mitmproxy.version import VERSION as mitmproxy_version

from addon.fakes.anthropic import Behavior

from .conftest import BACKUP_KEY, PRIMARY_KEY, Proxy, endpoints_config, free_port, wait_until
from .test_failover import MESSAGE, post, stream_text
from .test_faults import body_of, chunks_of

CLIENT_KEY = "sk-ant-client-CLIENTSECRETKEY000000003"
WORDS = " ".join(f"w{i}" for i in range(30))


def rewrite(proxy: Proxy, config: dict | str) -> None:
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    proxy.config_path.write_text(text)


def test_config_change_is_picked_up_and_endpoint_state_kept(proxy_factory, primary, backup, fakes):
    config = endpoints_config(primary, backup)
    proxy = proxy_factory(config)
    primary.behavior = Behavior(kind="status", status=503)
    post(proxy)
    third = fakes("third")
    config["endpoints"].append({"name": "third", "baseUrl": third.url})
    rewrite(proxy, config)
    wait_until(lambda: len(proxy.health()["endpoints"]) == 3, 10, "the new endpoint to appear")
    assert proxy.endpoint("primary")["status"] == "cooling"  # unchanged endpoint keeps its state
    assert proxy.metric("ccf_config_reloads_total", result="success") == 1


def test_invalid_config_on_reload_keeps_the_running_one(proxy, primary, backup):
    rewrite(proxy, "endpoints:\n  - name: broken\n    baseUrl: not a url\n")
    wait_until(
        lambda: proxy.metric("ccf_config_reloads_total", result="error") == 1, 10, "the reload to fail"
    )
    assert "config_reload_failed" in proxy.logs()
    assert "endpoints[0].baseUrl" in proxy.logs()
    assert [e["name"] for e in proxy.health()["endpoints"]] == ["primary", "backup"]
    assert stream_text(proxy) == "Hello from the fake."


def test_sighup_reloads(proxy, primary, backup):
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.metric("ccf_config_reloads_total", result="success") == 1, 10, "SIGHUP reload")


def test_reload_does_not_drop_a_stream_in_flight(proxy, primary, backup):
    primary.behavior = Behavior(kind="ok", text=WORDS, event_delay=0.05)
    result: dict[str, str] = {}
    reader = threading.Thread(target=lambda: result.update(text=stream_text(proxy)))
    reader.start()
    primary.wait_for_requests(1)
    config = endpoints_config(backup)  # the streaming endpoint is even removed
    rewrite(proxy, config)
    wait_until(lambda: len(proxy.health()["endpoints"]) == 1, 10, "the reload")
    reader.join(10)
    assert result["text"] == WORDS


def test_sigterm_lets_streams_finish_then_exits(proxy, primary):
    primary.behavior = Behavior(kind="ok", text=WORDS, event_delay=0.05)
    result: dict[str, str] = {}
    reader = threading.Thread(target=lambda: result.update(text=stream_text(proxy)))
    reader.start()
    primary.wait_for_requests(1)
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    reader.join(10)
    assert result["text"] == WORDS
    assert proxy.process.wait(10) == 0
    assert "draining" in proxy.logs()


def test_a_stop_that_waits_on_a_stream_says_so_at_the_warn_level(proxy_factory, primary):
    proxy = proxy_factory(endpoints_config(primary, logging={"level": "warn"}))
    primary.behavior = Behavior(kind="ok", text=WORDS, event_delay=0.05)
    reader = threading.Thread(target=lambda: stream_text(proxy))
    reader.start()
    primary.wait_for_requests(1)
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    reader.join(10)
    assert proxy.process.wait(10) == 0
    draining = [
        json.loads(line.split("] ", 1)[1]) for line in proxy.logs().splitlines() if '"draining"' in line
    ]
    assert len(draining) == 1, proxy.logs()
    assert draining[0]["level"] == "warning"
    assert draining[0]["active_streams"] + draining[0]["choosing"] == 1  # chosen, or still held


def test_a_stop_with_clients_still_connected_is_not_logged_as_an_error(proxy_factory, primary):
    proxy = proxy_factory(endpoints_config(primary), ccf=True)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:  # keeps its connection open
        for stream in (False, True):
            assert post_on(client, stream).status_code == 200
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(10) == 0
    assert "stopping" in proxy.logs()
    assert "Traceback" not in proxy.logs() and "Exception" not in proxy.logs(), proxy.logs()


def post_on(client: httpx.Client, stream: bool) -> httpx.Response:
    body = dict(MESSAGE, stream=stream)
    return client.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})


def test_no_key_appears_in_logs_health_metrics_errors_or_flows(proxy_factory, primary, backup, tmp_path):
    flows = tmp_path / "flows.mitm"
    config = endpoints_config(primary, backup, retry={"cooldownSeconds": 0})
    proxy = proxy_factory(config, None, "--set", f"save_stream_file={flows}")
    client = {"x-api-key": CLIENT_KEY}
    outputs = []
    for behavior in (
        Behavior(kind="status", status=429),
        Behavior(kind="status", status=401),
        Behavior(kind="sse_error_after_preamble"),
        Behavior(kind="cut", after_events=4),
        Behavior(kind="garbage"),
        Behavior(kind="ok"),
    ):
        primary.behavior = behavior
        for stream in (False, True):
            try:
                outputs.append(post(proxy, stream=stream, headers=client).text)
            except httpx.HTTPError as e:
                outputs.append(str(e))
        outputs.append(proxy.get("/health")[1].decode())
    backup.behavior = primary.behavior = Behavior(kind="status", status=503)
    outputs.append(post(proxy, headers=client).text)
    outputs.append(proxy.get("/health")[1].decode())
    outputs.append(proxy.get("/metrics")[1].decode())
    proxy.stop()
    outputs.append(proxy.logs())
    outputs.append(flows.read_bytes().decode("utf-8", "replace"))
    everything = "\n".join(outputs)
    assert "sk-ant-…0003" in everything  # the masked form is what appears
    for key in (PRIMARY_KEY, BACKUP_KEY, CLIENT_KEY):
        assert key not in everything
        assert key[8:-4] not in everything


def test_mitmweb_shows_endpoint_attempts_masked_keys_and_the_assembled_stream(tmp_path, primary, backup):
    proxy = Proxy(tmp_path, endpoints_config(primary, backup))
    web_port = free_port()
    proxy.command = lambda *extra, _c=proxy.command: mitmweb_command(_c(*extra), web_port)  # type: ignore[method-assign]
    primary.behavior = Behavior(kind="status", status=529)
    backup.behavior = Behavior(kind="ok", text="Assembled reply here")
    proxy.start()
    try:
        assert post(proxy, stream=True, headers={"x-api-key": CLIENT_KEY}).status_code == 200
        with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers=WEB_AUTH, timeout=5) as web:

            def finished_flow():
                flows = web.get("/flows").json()
                return next(
                    (f for f in flows if f["request"]["path"] == "/v1/messages" and f.get("response")), None
                )

            flow = wait_until(finished_flow, 10, "the flow in mitmweb")
            assert flow["request"]["host"] == "127.0.0.1" and flow["request"]["port"] == backup.port
            assert "primary: sse_error" in flow["comment"] or "primary: status" in flow["comment"]
            assert "backup: ok" in flow["comment"]
            headers = dict(flow["request"]["headers"])
            assert CLIENT_KEY not in json.dumps(flow) and headers["x-api-key"].startswith("sk-ant-")
            body = web.get(f"/flows/{flow['id']}/response/content.data").text
            assert body.count("event: content_block_delta") == 3 and "message_stop" in body
            view = web.get(f"/flows/{flow['id']}/response/content/anthropic-message.json").json()
            rendered = view.get("text")  # mitmweb 12 sends the text, 11 styled lines
            if not isinstance(rendered, str):
                rendered = "\n".join(text for line in view["lines"] for _, text in line)
            assert "Assembled reply here" in rendered and "stop_reason=end_turn" in rendered
            ran = web.post("/commands/fallback.reload", headers=xsrf(web), json={"arguments": []})
            assert ran.status_code == 200, ran.text
            status = web.post("/commands/fallback.status", headers=xsrf(web), json={"arguments": []})
            assert json.loads(status.json()["value"])["endpoints"][0]["name"] == "primary"
        assert proxy.metric("ccf_config_reloads_total", result="success") == 1
    finally:
        proxy.stop()


def test_a_config_set_in_mitmweb_brings_its_body_limit(tmp_path, primary, backup):
    proxy = Proxy(tmp_path, endpoints_config(primary, backup, server={"maxBodyBytes": 1_000_000}))
    web_port = free_port()
    proxy.command = lambda *extra, _c=proxy.command: mitmweb_command(_c(*extra), web_port)  # type: ignore[method-assign]
    larger = tmp_path / "larger.yaml"
    larger.write_text(yaml.safe_dump(endpoints_config(primary, backup, server={"maxBodyBytes": 3_000_000})))
    proxy.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers=WEB_AUTH, timeout=5) as web:
            arguments = ["fallback_config", str(larger)]
            ran = web.post("/commands/set", headers=xsrf(web), json={"arguments": arguments})
            assert ran.status_code == 200, ran.text
        # unannounced size: mitmproxy keeps it only under its streaming option, which must follow
        body = body_of(2_000_000)
        response = httpx.post(
            proxy.url + "/v1/messages",
            content=chunks_of(body),
            headers={"content-type": "application/json", "x-api-key": "k"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert primary.wait_for_requests(1)[0].body == body
    finally:
        proxy.stop()


def xsrf(web: httpx.Client) -> dict[str, str]:
    """mitmweb's POSTs want tornado's double-submit token: the same value as cookie and header
    (the cookie is `_xsrf` in mitmproxy 11, `_mitmproxy_xsrf` in 12)."""
    token = "c0ffee" * 8
    web.cookies.update({"_xsrf": token, "_mitmproxy_xsrf": token})
    return {"X-XSRFToken": token}


# mitmweb 12 wants a password (as a bearer token); 11 has no such option.
WEB_PASSWORD = "ccf-test-web-password"
WEB_AUTH = {"Authorization": f"Bearer {WEB_PASSWORD}"} if int(mitmproxy_version.split(".")[0]) >= 12 else {}


def mitmweb_command(command: list[str], web_port: int) -> list[str]:
    script = Path(command[0])
    password = ["--set", f"web_password={WEB_PASSWORD}"] if WEB_AUTH else []
    return [
        str(script.with_name("mitmweb")),
        *command[1:],
        "--web-port",
        str(web_port),
        "--set",
        "web_open_browser=false",
        *password,
    ]


def test_bad_config_file_permissions_are_warned_about(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup))
    proxy.config_path.chmod(0o644)
    rewrite(proxy, endpoints_config(primary, backup))
    wait_until(lambda: "readable by others" in proxy.logs(), 10, "a permissions warning")


def test_pretty_logs_are_one_readable_line_per_outcome(proxy_factory, primary, backup):
    proxy = proxy_factory(endpoints_config(primary, backup, logging={"format": "pretty"}))
    primary.behavior = Behavior(kind="status", status=503)
    post(proxy)
    wait_until(lambda: "request method=POST" in proxy.logs(), 5, "the request line")
    lines = proxy.logs().splitlines()
    assert any("endpoint_cooling endpoint=primary reason=status status=503" in line for line in lines)
    assert any("failover from_endpoint=primary to_endpoint=backup" in line for line in lines)
    outcome = next(line for line in lines if "request method=POST" in line)
    assert "endpoint=backup status=200 outcome=success attempts=2" in outcome
    assert not any(line.lstrip("[0123456789:.] ").startswith("{") for line in lines)
