"""What mitmproxy's options say: where the proxy listens, the URL its reverse mode names,
and the config the addon's options name."""

from __future__ import annotations

import os
from collections.abc import Iterable

from mitmproxy.proxy.mode_specs import ProxyMode

from .config import Config, load_config


def listen_on(modes: Iterable[str] | None, listen_host: str) -> tuple[str, int] | None:
    """(host, port) of the first listener; an empty host means every interface."""
    for spec in modes or ():
        mode = ProxyMode.parse(spec)
        port = mode.listen_port()
        return (mode.listen_host(listen_host), port) if port is not None else None
    return None


def listen_address(modes: Iterable[str] | None, listen_host: str) -> str:
    """host:port of the first listener, as the fleet view shows it."""
    if (where := listen_on(modes, listen_host)) is None:
        return ""
    host, port = where
    return f"{host or '0.0.0.0'}:{port}"


def reverse_target(modes: Iterable[str] | None) -> str:
    """The URL of the first reverse mode (`reverse:https://host@8765`), else Anthropic's API."""
    for spec in modes or ():
        if spec.startswith("reverse:"):
            target = spec.removeprefix("reverse:")
            if "@" in target.split("//", 1)[-1]:
                target = target.rsplit("@", 1)[0]
            return target.rstrip("/")
    return "https://api.anthropic.com"


def named_config(path: str | None, log_level: str | None, modes: Iterable[str] | None) -> Config:
    """The config `fallback_config` and `fallback_log_level` name, for the proxy as its modes
    describe it (the reverse target is the default endpoint); ConfigError when it is bad."""
    overrides: dict[str, object] = {"logging.level": log_level} if log_level else {}
    return load_config(path or None, os.environ, overrides, default_base_url=reverse_target(modes))
