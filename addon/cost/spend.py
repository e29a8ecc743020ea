"""What one answer used and cost, and the totals the usage store adds such answers into.

A `Spend` is one endpoint's answer to one client: who asked (the name of the client's
access key), which endpoint answered, the model it was asked for, the tokens by kind and
what they cost at the price table's rates (None when the model has no price). A
subscription's answer (`auth: oauth`) is counted at what Anthropic's API would charge for
it and marked not billed: the subscription pays for it. Unless the account served it as
overage (`anthropic-ratelimit-unified-overage-in-use: true`): that answer is billed as
extra usage. `Totals` are what the store keeps per hour, client, endpoint and model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

from ..config import Endpoint
from ..sse import Usage
from .prices import ANY_MODEL, PriceTable, Tokens

OTHER = "other"  # the metric label of a model the price table has no name of its own for
OVERAGE = b"anthropic-ratelimit-unified-overage-in-use"
MODEL_CHARACTERS = 200  # a model name kept in the store, at most: the client chose it


@dataclass(frozen=True)
class Spend:
    """One answer: who, where, which model, its tokens, its cost and whether it is billed."""

    client: str
    endpoint: str
    model: str  # as the endpoint was asked for it; "" when the request named none
    label: str  # the price table's name for the model, or `other`: the metric's bounded label
    tokens: Tokens
    cost: float | None
    billed: bool


def spend_of(
    client: str,
    endpoint: Endpoint,
    model: str | None,
    usage: Usage,
    headers: Iterable[tuple[bytes, bytes]],
    prices: PriceTable,
) -> Spend:
    """What `endpoint`'s answer with `usage` and response `headers` cost, priced by `prices`."""
    tokens = Tokens(usage.input, usage.output, usage.cache_read, usage.cache_write_5m, usage.cache_write_1h)
    found = prices.resolve(endpoint.name, endpoint.provider, model)
    label, cost = OTHER, None
    if found is not None:
        name, price = found
        label, cost = (OTHER if name == ANY_MODEL else name), price.cost(tokens)
    billed = endpoint.auth != "oauth" or overage(headers)
    return Spend(client, endpoint.name, (model or "")[:MODEL_CHARACTERS], label, tokens, cost, billed)


def overage(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a subscription served the answer past its usage windows, as billed extra usage."""
    return any(k.lower() == OVERAGE and v.strip().lower() == b"true" for k, v in headers)


@dataclass
class Totals:
    """Answers added up: their count, tokens by kind and cost (USD), billed or not."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cost_usd: float = 0.0  # of the answers that have a price
    billed_usd: float = 0.0  # of those, what is billed
    priced: int = 0  # answers that have a price

    @classmethod
    def of(cls, spend: Spend) -> Totals:
        tokens, cost = spend.tokens, spend.cost
        return cls(
            requests=1,
            input_tokens=tokens.input,
            output_tokens=tokens.output,
            cache_read_tokens=tokens.cache_read,
            cache_write_5m_tokens=tokens.cache_write_5m,
            cache_write_1h_tokens=tokens.cache_write_1h,
            cost_usd=cost or 0.0,
            billed_usd=(cost or 0.0) if spend.billed else 0.0,
            priced=0 if cost is None else 1,
        )

    def add(self, other: Totals) -> None:
        for name in FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def cost(self) -> float | None:
        """The cost, or None when none of the answers has a price."""
        return self.cost_usd if self.priced else None


FIELDS = tuple(f.name for f in fields(Totals))
