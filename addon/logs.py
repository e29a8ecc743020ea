"""Structured event logs through mitmproxy's logging, as JSON lines or readable text.

One line per request outcome and per failover or cooldown change, never per chunk. Every
line passes through `redact`, which masks each configured key wherever it appears.
Listeners (the status page's timeline) hear every event, whatever the log level.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping

from .config import mask_secret

log = logging.getLogger("claude_code_fallback")

LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Anything shaped like an Anthropic key is masked even if no config names it.
KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9]+-[A-Za-z0-9_\-]{8,}")

Listener = Callable[[str, Mapping[str, object]], None]


class EventLog:
    """The proxy's structured log: one line per event (JSON or `key=value`), secrets masked;
    listeners (the status page's timeline) hear of every event, whatever the level."""

    def __init__(
        self,
        level: str = "info",
        fmt: str = "json",
        secrets: Iterable[str] = (),
        context: Mapping[str, object] | None = None,
    ) -> None:
        self.format = fmt
        self.context = dict(context or {})  # on every line, after the event's name (a worker's number)
        self.level = LEVELS.get(level, logging.INFO)
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.mask = True
        self.listeners: list[Listener] = []

    def configure(
        self, level: str, fmt: str, secrets: Iterable[str], context: Mapping[str, object], mask: bool
    ) -> None:
        """Takes a new config's logging in place: listeners stay, and so does every holder."""
        self.level = LEVELS.get(level, logging.INFO)
        self.format = fmt
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.context = dict(context)
        self.mask = mask

    def redact(self, text: str) -> str:
        if not self.mask:
            return text
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, mask_secret(secret))
        return KEY_PATTERN.sub(lambda m: mask_secret(m.group(0)), text)

    def event(self, event: str, level: int = logging.INFO, **fields: object) -> None:
        for listener in self.listeners:
            listener(event, fields)
        if level < self.level or not log.isEnabledFor(level):
            return
        fields = {**self.context, **{k: v for k, v in fields.items() if v is not None}}
        if self.format == "pretty":
            details = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{event} {details}".rstrip()
        else:
            record = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                + f".{int(time.time() % 1 * 1000):03d}Z",
                "level": logging.getLevelName(level).lower(),
                "event": event,
                **fields,
            }
            line = json.dumps(record, default=str)
        log.log(level, self.redact(line))
