"""OpenTelemetry, when the config turns it on: each request's trace given and found again
(`switch`), and the SDK's side, loaded only then: the spans and their exporter (`spans`), the
`/metrics` series and the GenAI metrics over OTLP (`meters`).
"""
