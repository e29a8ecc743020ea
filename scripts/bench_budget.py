"""What the budget check costs a request: in-process, against the same steps without it.

The steps are what the proxy does with every request before it goes upstream: find the
client's name from its key (`Access.client`), parse the request once (`ClientRequest.parse`,
here a 70 KB body as Claude Code sends), and, with budgets, ask whether the client may go
on (`Budgets.refusal`) and what header its answer carries (`Budgets.headers`). Budgets are
set for 50 clients and the proxy, some of them near or over their caps, so that the check
takes its slowest path (the clock read, then the lookups). Prints each figure and the ratio:

    .venv/bin/python scripts/bench_budget.py
"""

from __future__ import annotations

import json
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the repository's addon, as the tests import it
    sys.path.insert(0, str(ROOT))

from addon.config import Budget, ClientKey, Server  # noqa: E402
from addon.cost.budgets import Budgets  # noqa: E402
from addon.logs import EventLog  # noqa: E402
from addon.request import ClientRequest  # noqa: E402
from addon.state.access import Access  # noqa: E402

CLIENTS = 50
ROUNDS, NUMBER = 15, 2000


def setup() -> tuple[Access, Budgets, list[tuple[str, str]], bytes]:
    keys = tuple(
        ClientKey(f"client{i}", f"ccf-bench-key-{i:04d}-0000000000", Budget(daily=10.0, monthly=200.0))
        for i in range(CLIENTS)
    )
    server = Server(access_keys=keys, budget=Budget(monthly=5000.0))
    budgets = Budgets(EventLog(level="error"))  # the warnings of the setup are no figure
    budgets.configure(server)
    for i in range(CLIENTS):
        budgets.spend(f"client{i}", 8.5 if i % 5 == 0 else 11.0 if i % 7 == 0 else 2.0)
    client = "client48"  # under its caps, beside clients near and over theirs
    headers = [
        ("anthropic-version", "2023-06-01"),
        ("content-type", "application/json"),
        ("x-api-key", keys[48].key),
        ("x-app", "cli"),
    ]
    body = json.dumps(
        {
            "model": "claude-opus-4-8",
            "max_tokens": 32000,
            "stream": True,
            "system": [{"type": "text", "text": "You are Claude Code. " * 3500}],
            "messages": [{"role": "user", "content": "say hi"}],
        }
    ).encode()
    assert budgets.refusal(client) is None and Access(server).client(headers) == client
    return Access(server), budgets, headers, body


def best(step: Callable[[], object]) -> float:
    """The fastest of the rounds, in nanoseconds per call (the others met other work)."""
    return min(timeit.repeat(step, repeat=ROUNDS, number=NUMBER)) / NUMBER * 1e9


def main() -> None:
    access, budgets, headers, body = setup()

    def without() -> None:
        client = access.client(headers) or ""
        ClientRequest.parse("POST", "/v1/messages?beta=true", headers, body)
        assert client

    def with_budgets() -> None:
        client = access.client(headers) or ""
        ClientRequest.parse("POST", "/v1/messages?beta=true", headers, body)
        if budgets.refusal(client) is None:
            budgets.headers(client)

    def check_only() -> None:
        if budgets.refusal("client5") is None:  # near its cap: the slowest path
            budgets.headers("client5")

    calm = Budgets(EventLog())
    calm.configure(Server(budget=Budget(monthly=5000.0)))

    def check_calm() -> None:
        if calm.refusal("client5") is None:  # nobody near a cap: the common path
            calm.headers("client5")

    base = statistics.median(best(without) for _ in range(3))
    checked = statistics.median(best(with_budgets) for _ in range(3))
    check = statistics.median(best(check_only) for _ in range(3))
    common = statistics.median(best(check_calm) for _ in range(3))
    print(f"without budgets  {base / 1000:9.1f} µs a request (key lookup + parse of {len(body) // 1024} KB)")
    print(f"with budgets     {checked / 1000:9.1f} µs a request")
    print(f"the check alone  {check:9.0f} ns (refusal + header, a client near its cap)")
    print(f"                 {common:9.0f} ns (the same, no client near a cap)")
    print(f"ratio            {checked / base:9.4f} (check / baseline: {check / base:.2%})")


if __name__ == "__main__":
    main()
