"""Running the proxy: `/health`, `/readyz`, `/livez` and `/metrics` (`service`), the status page
(`dashboard`, `timeline`), advice on the config (`advice`), endpoint checks (`checks`),
mitmweb's flow cap (`flowcap`), what a flow shows (`inspection`), the config's life: reloads
and the metrics port (`lifecycle`), and how the process ends: a stop, or a restart (`drain`).
"""
