"""Who may use the proxy, and under which name: `server.accessKey` and `server.accessKeys`.

A client presents its key as `x-ccf-access-key`, or as its own `x-api-key` or bearer
token. Every configured key is compared with every offered value in constant time, so
timing tells nothing about how much of a key was right. The key is never forwarded, and
the name it maps to is what logs, metrics (`client` label) and `/health` show.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from ..config import Server

ACCESS_HEADER = "x-ccf-access-key"
AUTH_HEADERS = ("x-api-key", "authorization")
ANONYMOUS = "anonymous"  # the proxy needs no key
UNAUTHENTICATED = "unauthenticated"  # it needs one and got none that fits
DEFAULT_CLIENT = "default"  # the single `server.accessKey`


class Access:
    """The clients' access keys (`server.accessKey`, `server.accessKeys`): which named client a
    request's key belongs to, and the request without that key, for the endpoint."""

    def __init__(self, server: Server) -> None:
        keys = [(client.name, client.key) for client in server.access_keys]
        if server.access_key:
            keys.append((DEFAULT_CLIENT, server.access_key))
        self.keys = [(name, key.encode()) for name, key in keys]

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def names(self) -> list[str]:
        return [name for name, _ in self.keys] or [ANONYMOUS]

    def client(self, headers: Iterable[tuple[str, str]]) -> str | None:
        """The name of the key the client presented: ANONYMOUS when none is needed, None when refused."""
        if not self.keys:
            return ANONYMOUS
        found = None
        for value in _offered(headers):
            name = self._name_of(value)  # every value compared, whatever matched before
            found = found or name
        return found

    def strip(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The client's headers less the proxy's key, wherever the client put it."""
        if not self.keys:
            return headers
        return [
            (name, value)
            for name, value in headers
            if name.lower() != ACCESS_HEADER
            and not (name.lower() in AUTH_HEADERS and self._name_of(_credential(value)))
        ]

    def _name_of(self, value: bytes) -> str | None:
        """The name of the key `value` is, compared with every key whatever matches first."""
        found = None
        for name, key in self.keys:
            if hmac.compare_digest(value, key) and found is None:
                found = name
        return found


def _offered(headers: Iterable[tuple[str, str]]) -> list[bytes]:
    return [
        _credential(value)
        for name, value in headers
        if name.lower() == ACCESS_HEADER or name.lower() in AUTH_HEADERS
    ]


def _credential(value: str) -> bytes:
    return value.removeprefix("Bearer ").strip().encode("utf-8", "replace")
