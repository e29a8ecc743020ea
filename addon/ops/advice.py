"""Settings that work but put keys or expectations at risk: what the proxy warns about.

Each check returns (event, fields) pairs for the event log; the addon logs them as
warnings when it starts (and, for the config file, on every load).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from mitmproxy.proxy.mode_specs import ProxyMode

from ..config import Config, mask_secret
from ..fleet import workers
from ..platforms import is_anthropic_host
from ..state.access import Access

Advice = tuple[str, dict[str, object]]  # an event name and its fields


def at_start(
    config: Config, access: Access, modes: Iterable[str], listen_host: str, environ: Mapping[str, str]
) -> list[Advice]:
    return [
        *exposed(access, modes, listen_host),
        *env_key_withheld(config, environ),
        *workers_ignored(config),
    ]


def exposed(access: Access, modes: Iterable[str], listen_host: str) -> list[Advice]:
    """Anyone who can reach a non-loopback address could spend the configured keys."""
    if access.required:
        return []
    hosts = [ProxyMode.parse(spec).listen_host(listen_host) for spec in modes]
    return [
        (
            "exposed",
            {
                "warning": f"listening on {host or 'all interfaces'} without server.accessKey(s): "
                "anyone who reaches this address can use the configured endpoints"
            },
        )
        for host in hosts
        if not is_loopback(host)
    ]


def env_key_withheld(config: Config, environ: Mapping[str, str]) -> list[Advice]:
    """ANTHROPIC_API_KEY goes only to anthropic.com; say where the client's credentials go instead."""
    if not (key := environ.get("ANTHROPIC_API_KEY")):
        return []
    return [
        (
            "env_key_withheld",
            {
                "endpoint": endpoint.name,
                "warning": f"ANTHROPIC_API_KEY ({mask_secret(key)}) is not sent to "
                f"{urlsplit(endpoint.base_url).hostname}, which is not an anthropic.com host; "
                "the client's own credentials pass through",
            },
        )
        for endpoint in config.active_endpoints
        if not endpoint.api_key and not is_anthropic_host(endpoint.base_url)
    ]


def workers_ignored(config: Config) -> list[Advice]:
    warning = workers.unsupervised(config)
    return [("workers_ignored", {"warning": warning})] if warning else []


def config_readable(config: Config) -> list[Advice]:
    """A config file others can read may give away the keys in it."""
    if not (config.source and readable_by_others(config.source)):
        return []
    warning = f"{config.source} is readable by others and may hold API keys; run: chmod 600 {config.source}"
    return [("config_permissions", {"warning": warning})]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def readable_by_others(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & 0o044)
    except OSError:
        return False
