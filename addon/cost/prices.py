"""What a request cost: Claude's price table (prices.yaml) with the config's `pricing:` over it.

A request's tokens come from its answer's `usage`: input, output, cache reads, and cache
writes split by lifetime (`usage.cache_creation`: 5 minutes or 1 hour). Each kind has its
price per million tokens; a cache price is a multiple of the model's input price unless the
table names its own. A model with long-context rates bills a request whose prompt (input
and cache tokens together) is over its threshold at those rates, on all its tokens.

Claude on Bedrock, Bedrock Mantle and Vertex AI is priced as on Anthropic's API; an
OpenAI-format endpoint's models are priced only from the config. A model the table does
not know has no price: its requests are counted, their cost is not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import yaml

TABLE_FILE = Path(__file__).with_name("prices.yaml")
PER_TOKENS = 1_000_000
ANY_MODEL = "*"
# The parts of a platform's model id that are not the model: Bedrock's region and vendor
# prefix and version suffix, Vertex's `@date`, a dated id's date.
_PLATFORM_ID = re.compile(r"^(?:[a-z]{2,4}\.)?(?:anthropic\.)?(?P<model>.+?)(?:-v\d+(?::\d+)?)?(?:@\d+)?$")
_DATED = re.compile(r"-\d{8}$")
_MINOR = re.compile(r"\d{1,2}(?:-|$)")


@dataclass(frozen=True)
class Tokens:
    """One request's tokens by kind."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0

    @property
    def prompt(self) -> int:
        return self.input + self.cache_read + self.cache_write_5m + self.cache_write_1h

    @property
    def cache_write(self) -> int:
        return self.cache_write_5m + self.cache_write_1h


@dataclass(frozen=True)
class Rates:
    """USD per million tokens of each kind."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float

    def cost(self, tokens: Tokens) -> float:
        return (
            tokens.input * self.input
            + tokens.output * self.output
            + tokens.cache_write_5m * self.cache_write_5m
            + tokens.cache_write_1h * self.cache_write_1h
            + tokens.cache_read * self.cache_read
        ) / PER_TOKENS


@dataclass(frozen=True)
class Price:
    """A model's rates, and its long-context rates above a prompt size, if it has them."""

    rates: Rates
    long_context: Rates | None = None
    long_above: int = 0

    def for_prompt(self, prompt_tokens: int) -> Rates:
        if self.long_context is not None and prompt_tokens > self.long_above:
            return self.long_context
        return self.rates

    def cost(self, tokens: Tokens) -> float:
        return self.for_prompt(tokens.prompt).cost(tokens)


@dataclass(frozen=True)
class PriceTable:
    """Claude's prices by model, and any endpoint's own prices by model (`*`: every model)."""

    models: Mapping[str, Price]
    endpoints: Mapping[str, Mapping[str, Price]]
    source: str = ""
    checked: str = ""

    def price(self, endpoint: str, provider: str, model: str | None) -> Price | None:
        """The price of `model` on `endpoint`: the endpoint's own, else Claude's (not for
        an OpenAI-format endpoint, whose models are priced only from the config)."""
        found = self.resolve(endpoint, provider, model)
        return None if found is None else found[1]

    def resolve(self, endpoint: str, provider: str, model: str | None) -> tuple[str, Price] | None:
        """The table's name for `model` on `endpoint` (an endpoint's `*` entry is `*`) and its price."""
        own = self.endpoints.get(endpoint, {})
        if model is not None and model in own:
            return model, own[model]
        if ANY_MODEL in own:
            return ANY_MODEL, own[ANY_MODEL]
        if provider == "openai" or model is None:
            return None
        name = self.claude_name(model)
        return None if name is None else (name, self.models[name])

    def claude(self, model: str) -> Price | None:
        """Claude's price of a model id of any platform; the longest known name it starts with."""
        name = self.claude_name(model)
        return None if name is None else self.models[name]

    def claude_name(self, model: str) -> str | None:
        """The table's name for a Claude model id of any platform, if it has one."""
        found = _PLATFORM_ID.match(model.lower())
        name = _DATED.sub("", found["model"] if found else model.lower())
        if name in self.models:
            return name
        known = [key for key in self.models if _extends(name, key)]
        return max(known, key=len) if known else None

    def cost(self, endpoint: str, provider: str, model: str | None, tokens: Tokens) -> float | None:
        """What `tokens` cost on `endpoint` (USD); None when the model has no price."""
        price = self.price(endpoint, provider, model)
        return None if price is None else price.cost(tokens)

    def over(self, models: Mapping[str, Any], endpoints: Mapping[str, Mapping[str, Any]]) -> PriceTable:
        """This table with the config's `pricing.models` and `pricing.endpoints` over it."""
        multiples = _table()["cache"]
        return replace(
            self,
            models={**self.models, **{name: price_of(spec, multiples) for name, spec in models.items()}},
            endpoints={
                endpoint: {name: price_of(spec, multiples) for name, spec in prices.items()}
                for endpoint, prices in endpoints.items()
            },
        )


def _extends(name: str, key: str) -> bool:
    """Whether model id `name` is `key` with a suffix; not when the suffix is a newer minor
    version (`claude-opus-4-9` is no `claude-opus-4`), which may cost something else."""
    return name.startswith(key + "-") and not _MINOR.match(name[len(key) + 1 :])


def price_of(spec: Mapping[str, Any], multiples: Mapping[str, float]) -> Price:
    """A `{input, output, cacheWrite5m?, cacheWrite1h?, cacheRead?, longContext?}` entry as a Price."""
    rates = rates_of(spec, multiples)
    long = spec.get("longContext")
    if not long:
        return Price(rates)
    return Price(rates, rates_of(long, multiples), int(long["above"]))


def rates_of(spec: Mapping[str, Any], multiples: Mapping[str, float]) -> Rates:
    base = float(spec["input"])
    return Rates(
        input=base,
        output=float(spec["output"]),
        cache_write_5m=float(spec.get("cacheWrite5m", base * multiples["write5m"])),
        cache_write_1h=float(spec.get("cacheWrite1h", base * multiples["write1h"])),
        cache_read=float(spec.get("cacheRead", base * multiples["read"])),
    )


@cache
def _table() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(TABLE_FILE.read_text(encoding="utf-8"))
    return document


@cache
def shipped() -> PriceTable:
    """The table this version ships (prices.yaml)."""
    document = _table()
    multiples = document["cache"]
    models = {name: price_of(spec, multiples) for name, spec in document["models"].items()}
    return PriceTable(models, {}, str(document["source"]), str(document["checked"]))
