"""`ccf usage`: what clients spent, read from the usage store, as a table or as JSON.

The store keeps totals by the hour (cost/store.py), so a period starts on an hour: `--since
24h` counts from the start of the hour that was 24 hours ago. `--json` prints
`{"since": <Unix time of that hour>, "rows": [...]}`, each row with the same keys whatever
`--by` says: the names it groups away are null. A row's `cost_usd` is null when none of its
answers has a price (a model the price table does not know).
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from ..cost.spend import Totals
from ..cost.store import HOUR, Rows, grouped, hour_of

PERIOD = re.compile(r"(\d+)([hdw])")
UNITS = {"h": HOUR, "d": 24 * HOUR, "w": 7 * 24 * HOUR}
GROUPS = ("client", "endpoint", "model")


def since(text: str, now: float | None = None) -> int:
    """The start of the hour `text` (`24h`, `7d`, `30d`, `2w`) ago."""
    found = PERIOD.fullmatch(text.strip().lower())
    if found is None or int(found[1]) == 0:
        raise argparse.ArgumentTypeError(
            f"expected hours, days or weeks such as 24h, 7d, 30d or 2w, not {text!r}"
        )
    return hour_of((time.time() if now is None else now) - int(found[1]) * UNITS[found[2]])


def document(rows: Rows, start: int, by: str | None) -> dict[str, Any]:
    """What `--json` prints."""
    return {
        "since": start,
        "rows": [
            {
                "client": client,
                "endpoint": endpoint,
                "model": model,
                "requests": totals.requests,
                "input_tokens": totals.input_tokens,
                "output_tokens": totals.output_tokens,
                "cache_read_tokens": totals.cache_read_tokens,
                "cache_write_tokens": totals.cache_write_tokens,
                "cost_usd": None if totals.cost is None else round(totals.cost, 8),
            }
            for client, endpoint, model, totals in grouped(rows, by)
        ],
    }


def table(rows: Rows, by: str | None) -> list[list[str]]:
    """The rows of the readable table, the totals last."""
    names = [group for group in GROUPS if by in (None, group)]
    counts = ["REQUESTS", "INPUT", "OUTPUT", "CACHE READ", "CACHE WRITE", "COST"]
    out = [[*(name.upper() for name in names), *counts]]
    total = Totals()
    for client, endpoint, model, totals in grouped(rows, by):
        named = dict(zip(GROUPS, (client, endpoint, model), strict=True))
        out.append([*(named[name] or "-" for name in names), *_counts(totals)])
        total.add(totals)
    out.append(["TOTAL", *("" for _ in names[1:]), *_counts(total)])
    return out


def footer(rows: Rows, start: int, where: str) -> list[str]:
    """What the table's figures mean: since when, from where, how much is billed."""
    total = Totals()
    for totals in rows.values():
        total.add(totals)
    lines = [f"since {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(start))}, from {where}"]
    if total.cost_usd:
        lines.append(
            f"billed {_money(total.billed_usd)}; subscriptions' answers at API prices, not billed: "
            f"{_money(total.cost_usd - total.billed_usd)}"
        )
    if unpriced := total.requests - total.priced:
        lines.append(f"{unpriced} answers of models without a price are counted, not costed (see `pricing:`)")
    return lines


def _counts(totals: Totals) -> list[str]:
    return [
        f"{totals.requests:,}",
        f"{totals.input_tokens:,}",
        f"{totals.output_tokens:,}",
        f"{totals.cache_read_tokens:,}",
        f"{totals.cache_write_tokens:,}",
        "-" if totals.cost is None else _money(totals.cost),
    ]


def _money(usd: float) -> str:
    """Cents once there are dollars; below a cent, enough digits to tell one request's cost."""
    if usd >= 1 or usd == 0:
        return f"${usd:,.2f}"
    return f"${usd:.4f}" if usd >= 0.01 else f"${usd:.6f}"
