"""The documentation's references, rendered from the code: configuration, metrics, commands.

An mkdocs hook (`hooks:` in mkdocs.yml): a page that says ``<!-- reference: configuration -->``
(or ``metrics``, ``commands``, ``options``) gets that reference in its place. The
configuration comes from addon/config.py's schema (each field's key, check, default and
one-line meaning), the metrics from a `Metrics` registry as /metrics serves it, the commands
from `ccf`'s own argument parser, and the mitmproxy options from the addon's `load` hooks,
so none of them is kept by hand. Run alone, it prints one:

    python scripts/reference.py configuration
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the repository's addon, as the tests import it
    sys.path.insert(0, str(ROOT))

from addon import config, metrics  # noqa: E402
from addon.cli import commands as cli  # noqa: E402
from addon.cost.budgets import Budgets  # noqa: E402
from addon.logs import EventLog  # noqa: E402
from addon.state.endpoints import EndpointPool, EndpointState  # noqa: E402
from addon.state.limits import Window  # noqa: E402

MARKER = re.compile(r"<!-- reference: ([a-z]+) -->")
# What a section's table opens with; links are relative to docs/reference/configuration.md
SECTIONS = {
    "endpoints": "Each entry of `endpoints` (an endpoint given as a plain URL is its `baseUrl`). "
    "The platforms' keys are explained in [Claude on the clouds](../clouds.md) and "
    "[OpenAI-format endpoints](../openai.md).",
    "server": "Access keys and workers: [Running it for a team](../team.md); budgets: "
    "[Cost](../cost.md#budgets).",
    "retry": "What fails over, cooldowns and the retry budget: [How failover works](../failover.md).",
    "logging": "",
    "timeouts": "Durations in milliseconds.",
    "streaming": "The preamble hold, resume and rate-limit headers: [Streams](../failover.md#streams).",
    "routing": "Usage windows and sessions: [Claude subscriptions](../subscriptions.md); prompt "
    "caches: [Failover that keeps the cache](../cost.md#failover-that-keeps-the-cache).",
    "state": "A fleet sharing state through Redis: [Running it for a team](../team.md); where spend "
    "is kept: [Cost](../cost.md#where-counts-are-kept).",
    "pricing": "Prices in US dollars per million tokens, over the shipped ones: [Cost](../cost.md).",
    "telemetry": "Traces and metrics over OTLP, and the `OTEL_*` variables: [Telemetry](../telemetry.md). "
    "Durations in milliseconds.",
}


# -- configuration --------------------------------------------------------------------------


def configuration(keys: Iterable[config.KeyDoc] | None = None) -> str:
    """One table per section: each key, its default, and what it means, takes and is set by."""
    keys = list(config.reference() if keys is None else keys)
    sections: dict[str, list[config.KeyDoc]] = {}
    for key in keys:
        sections.setdefault(re.split(r"[.\[]", key.path, maxsplit=1)[0], []).append(key)
    out = []
    for name, rows in sections.items():
        out += [f"### `{name}`", ""]
        if intro := SECTIONS.get(name, ""):
            out += [intro, ""]
        out += ["| key | default | meaning |", "|---|---|---|"]
        for key in rows:
            meaning = f"{key.doc}. Takes {key.accepts}."
            if key.variables:
                meaning += " Set by " + ", ".join(f"`{v}`" for v in key.variables) + "."
            out.append(f"| `{key.path}` | {default(key)} | {cell(meaning)} |")
        out.append("")
    return "\n".join(out)


def default(key: config.KeyDoc) -> str:
    value = key.default
    if key.shown:
        return cell(key.shown)
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, frozenset):
        return f"`[{', '.join(str(v) for v in sorted(value))}]`"
    if isinstance(value, str):
        return f'`"{value}"`' if value.endswith(":") else f"`{value}`"
    return f"`{value}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


# -- metrics --------------------------------------------------------------------------------


def registry_families() -> list[tuple[str, str, list[str], str]]:
    """Each metric family /metrics serves: (series, type, labels, help), in registry order.

    The endpoint gauges are read from the pool at scrape time, so the pool holds one endpoint
    with a usage window, and the budgets one budget: their families then carry their labels
    as a real scrape does.
    """
    endpoint = config.Endpoint(name="primary", base_url=config.DEFAULT_BASE_URL)
    state = EndpointState(endpoint, windows={"5h": Window(0.5, "allowed", time.time() + 3600)})
    registry = metrics.Metrics(EndpointPool([state]))
    registry.budgets = Budgets(EventLog())
    registry.budgets.configure(config.Server(budget=config.Budget(daily=1.0)))
    declared = {
        wrapper._name: list(wrapper._labelnames)
        for wrapper in vars(registry).values()
        if isinstance(wrapper, metrics.MetricWrapperBase)
    }
    families = []
    for family in registry.exposition.collect():
        labels = declared.get(family.name)
        if labels is None:  # a collector's family: its samples say which labels it has
            labels = list(dict.fromkeys(label for sample in family.samples for label in sample.labels))
        series = family.name + ("_total" if family.type == "counter" else "")
        families.append((series, family.type, labels, family.documentation))
    return families


def metrics_table() -> str:
    rows = ["| series | type | labels | meaning |", "|---|---|---|---|"]
    for series, kind, labels, documentation in registry_families():
        if kind == "histogram":
            kind = "histogram (`_bucket`, `_sum`, `_count`)"
        names = ", ".join(f"`{label}`" for label in labels) or "none"
        rows.append(f"| `{series}` | {kind} | {names} | {cell(documentation)} |")
    buckets = ", ".join(f"{bound:g}" for bound in metrics.LATENCY_BUCKETS)
    return "\n".join([*rows, "", f"Histogram buckets, in seconds: {buckets}.", ""])


# -- mitmproxy options ----------------------------------------------------------------------


class _Options:
    """A stand-in for mitmproxy's loader: keeps each option an addon declares."""

    def __init__(self) -> None:
        self.declared: list[tuple[str, Any, str]] = []

    def add_option(
        self, name: str, typespec: object, default: Any, help: str, choices: object = None
    ) -> None:
        self.declared.append((name, default, " ".join(help.split())))


def options() -> str:
    """The mitmproxy options and commands the addon declares, as its `load` hooks declare them."""
    from addon.proxy import Fallback

    fallback, loader = Fallback(), _Options()
    for addon in [fallback, *fallback.addons]:
        addon.load(loader)
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for name, value, help in loader.declared:
        shown = "empty" if value == "" else f"`{str(value).lower() if isinstance(value, bool) else value}`"
        rows.append(f"| `{name}` | {shown} | {cell(help)} |")
    rows += ["", "| command | what it does |", "|---|---|"]
    members = [member for addon in [fallback, *fallback.addons] for member in vars(type(addon)).values()]
    for member in members:
        if name := getattr(member, "command_name", None):
            rows.append(f"| `{name}` | {cell(' '.join((member.__doc__ or '').split()))} |")
    return "\n".join([*rows, ""])


# -- commands -------------------------------------------------------------------------------


def commands() -> str:
    """`ccf --help` and each command's help, as the installed command prints them."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the same page everywhere
    try:
        parser = cli.build_parser()
        (actions,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        helps = [("ccf", parser.format_help())]
        helps += [(f"ccf {name}", sub.format_help()) for name, sub in actions.choices.items()]
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    out = []
    for title, text in helps:
        out += [f"### `{title}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(out)


# -- the hook -------------------------------------------------------------------------------

RENDER: dict[str, Callable[[], str]] = {
    "configuration": configuration,
    "metrics": metrics_table,
    "commands": commands,
    "options": options,
}


def render(markdown: str) -> str:
    """The page with each reference marker replaced by that reference."""

    def one(match: re.Match[str]) -> str:
        name = match[1]
        if name not in RENDER:
            raise ValueError(f"unknown reference {name!r}; known: {', '.join(RENDER)}")
        return RENDER[name]()

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, **_: object) -> str:
    return render(markdown)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in RENDER:
        sys.exit(f"usage: python scripts/reference.py {{{','.join(RENDER)}}}")
    print(RENDER[sys.argv[1]]())
