"""Running the proxy: `/health` and `/metrics` (`service`), the status page (`dashboard`,
`timeline`), advice on the config (`advice`), client access keys (`access`), endpoint
checks (`checks`), mitmweb's flow cap (`flowcap`), what a flow shows (`inspection`), each request's
accounting (`accounting`), the config's life: reloads, the drain, the metrics port (`lifecycle`),
and OpenTelemetry when the config turns it on (`telemetry`, with the SDK's side in `otel_traces`
and `otel_metrics`).
"""
