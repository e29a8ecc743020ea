"""What mitmproxy's `mode` and `listen_host` options say: where the proxy listens, and
the URL its reverse mode names."""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy.proxy.mode_specs import ProxyMode


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
