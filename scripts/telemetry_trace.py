"""Draws one failed-over request's trace, as the proxy sends it over OTLP, into docs/telemetry-trace.png.

Starts three fake upstreams (the first answers 529, the second 429 with `retry-after`, the
third streams the answer), the proxy as `ccf dev` runs it with telemetry on, and a small
OTLP/HTTP collector on loopback; sends one streamed request through the proxy, decodes the
spans the collector received (opentelemetry-proto), draws them as a waterfall in a page, and
has headless Chromium take its picture. From the repository root:

    python scripts/telemetry_trace.py [--out docs/telemetry-trace.png] [--html trace.html]
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: E402
from opentelemetry.proto.common.v1.common_pb2 import AnyValue  # noqa: E402

from addon.fakes.anthropic import Behavior, FakeAnthropic  # noqa: E402

SHOWN = (  # the attributes each row shows under its bar, when the span has them
    "gen_ai.request.model",
    "gen_ai.response.finish_reasons",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.conversation.id",
    "ccf.client",
    "ccf.outcome",
    "ccf.endpoint",
    "http.response.status_code",
    "ccf.failure.kind",
    "ccf.retry_after",
    "ccf.cooled",
    "ccf.time_to_first_byte",
    "http.request.resend_count",
)
KINDS = {2: "server", 3: "client"}


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP receiver on loopback that keeps every span it is sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/v1/traces":
                    collector.received(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def received(self, request: Any) -> None:
        for resource_spans in request.resource_spans:
            service = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}["service.name"]
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "trace": span.trace_id.hex(),
                            "name": span.name,
                            "kind": KINDS.get(span.kind, "internal"),
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "error": span.status.code == 2,
                            "service": service,
                            "attributes": {a.key: value_of(a.value) for a in span.attributes},
                            "events": [(e.name, e.time_unix_nano) for e in span.events],
                        }
                    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def failed_over_trace(workdir: Path) -> list[dict[str, Any]]:
    """The spans of one request that the first two endpoints failed and the third answered."""
    collector = Collector()
    fakes = [FakeAnthropic(name).start_in_thread() for name in ("primary", "secondary", "backup")]
    fakes[0].behavior = Behavior(kind="status", status=529, delay=0.02)
    fakes[1].behavior = Behavior(kind="status", status=429, delay=0.01, headers=(("retry-after", "30"),))
    fakes[2].behavior = Behavior(
        kind="ok", text="The backup streams this answer, word by word.", event_delay=0.01
    )
    port = free_port()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    config = workdir / "config.yaml"
    config.write_text(
        "endpoints:\n"
        + "".join(f'  - {{name: {f.name}, baseUrl: "{f.url}", apiKey: sk-ant-example}}\n' for f in fakes)
        + "logging: {level: warn}\n"
        + f'telemetry: {{enabled: true, endpoint: "{endpoint}", scheduleDelay: 50}}\n'
    )
    env = {"PYTHONPATH": str(ROOT), "CLAUDE_FALLBACK_HOME": str(workdir / "home"), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "addon.cli", "-c", str(config), "-p", str(port), "dev"]
    proxy = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait(lambda: answers(f"{url}/health"), "the proxy")
        body = {
            "model": "claude-sonnet-4-6",
            "max_tokens": 256,
            "stream": True,
            "messages": [{"role": "user", "content": "Say hello."}],
        }
        request = urllib.request.Request(
            f"{url}/v1/messages",
            data=json.dumps(body).encode(),
            headers={
                "content-type": "application/json",
                "x-claude-code-session-id": "0b6a7c55-2f1e-4c3b-9d8e-5f4a3b2c1d0e",
            },
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
        wait(lambda: len(collector.spans) >= 4, "the trace's four spans")
        return sorted(collector.spans, key=lambda s: s["start"])
    finally:
        proxy.terminate()
        proxy.wait(10)
        for fake in fakes:
            fake.stop_thread()
        collector.shutdown()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def wait(ready: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"telemetry_trace: timed out waiting for {what}")
        time.sleep(0.05)


def shorter(value: Any) -> Any:
    """A float as a reader takes it in: four significant digits."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def page(spans: list[dict[str, Any]]) -> str:
    """A waterfall of the spans: one row each, its bar at its time, its attributes under it."""
    start, end = spans[0]["start"], max(s["end"] for s in spans)
    total = end - start
    rows = []
    for span in spans:
        depth = 0 if not span["parent"] or span["parent"] not in {s["id"] for s in spans} else 1
        left = (span["start"] - start) / total * 100
        width = max((span["end"] - span["start"]) / total * 100, 0.3)
        marks = "".join(
            f'<i class="event" style="left:{(at - start) / total * 100:.2f}%"></i>'
            for _, at in span["events"]
        )
        shown = [
            f"<b>{html.escape(key)}</b>={html.escape(json.dumps(shorter(span['attributes'][key])))}"
            for key in SHOWN
            if key in span["attributes"]
        ]
        where = " · ".join([span["service"], *([span["attributes"]["ccf.endpoint"]] if depth else [])])
        took = (span["end"] - span["start"]) / 1e6
        events = [f"<b>event</b> {html.escape(name)}" for name, _ in span["events"]]
        rows.append(
            f'<div class="row d{depth}"><div class="label"><span class="kind">{span["kind"]}</span> '
            f'{html.escape(span["name"])}<span class="ms">{took:.1f} ms</span>'
            f"<small>{html.escape(where)}</small></div>"
            f'<div class="lane"><div class="bar{" error" if span["error"] else ""}" '
            f'style="left:{left:.2f}%;width:{width:.2f}%"></div>{marks}</div>'
            f'<div class="attrs">{" · ".join(shown + events)}</div></div>'
        )
    title = f"Trace {spans[0]['trace']}: {len(spans)} spans, {total / 1e6:.1f} ms"
    return f"""<!doctype html><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 13px/1.4 system-ui, sans-serif; margin: 16px 20px; color: #1f2328; background: #fff; }}
h1 {{ font-size: 16px; margin: 0 0 2px; }} p.sub {{ margin: 0 0 12px; color: #59636e; }}
.row {{ display: grid; grid-template-columns: 300px 1fr; border-top: 1px solid #e6e8eb; padding: 6px 0; }}
.label {{ font-weight: 600; }} .d1 .label {{ padding-left: 22px; }}
.label small {{ display: block; font-weight: 400; color: #59636e; }}
.kind {{ font: 11px monospace; background: #eef1f4; border-radius: 3px; padding: 0 4px; color: #444; }}
.lane {{ position: relative; height: 22px;
  background: repeating-linear-gradient(90deg, #fff 0 9.9%, #f2f4f6 9.9% 10%); }}
.bar {{ position: absolute; top: 4px; height: 14px; background: #3b82c4; border-radius: 2px; }}
.bar.error {{ background: #d0453a; }}
.event {{ position: absolute; top: 1px; width: 2px; height: 20px; background: #111; }}
.ms {{ float: right; padding-right: 14px; font-weight: 400; color: #59636e; }}
.attrs {{ grid-column: 2; font: 11.5px/1.5 monospace; color: #444; padding-top: 3px; }}
.attrs b {{ color: #6639ba; font-weight: 500; }}
</style>
<h1>{html.escape(spans[0]["name"])}</h1>
<p class="sub">{title}, as the collector received it over OTLP/HTTP. Red: the attempts that failed;
black ticks: span events.</p>
{"".join(rows)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "telemetry-trace.png")
    parser.add_argument("--html", type=Path, help="keep the page drawn, here")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("telemetry_trace: chromium not found (apt-get install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="ccf-trace-") as tmp:
        workdir = Path(tmp)
        spans = failed_over_trace(workdir)
        drawn = args.html or workdir / "trace.html"
        drawn.write_text(page(spans), encoding="utf-8")
        shot = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        shot += [f"--screenshot={args.out.resolve()}", "--window-size=1280,430", drawn.resolve().as_uri()]
        subprocess.run(shot, check=True, capture_output=True, timeout=60)
    print(f"telemetry_trace: {len(spans)} spans drawn into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
