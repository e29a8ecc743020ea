"""The proxy as one config makes it, swapped whole on reload.

`Runtime` holds what is built from one config: the config itself, the routing, the
client access keys, the failover loop that joins them to the endpoints, and the prices
answers are counted at (the shipped table under the config's `pricing`). A reload
builds a new one and the addon swaps it in with one assignment, so a request reads one
config from start to end and no collaborator keeps a piece of an old one. What outlives
a config is `Lasting`, made once per process and updated in place: the endpoints' health,
the event log, the retry budget's window, the upstream connections, the metrics, the
fleet's shared state, what clients spent against their budgets, the usage store that
keeps what each answer used and cost, and the telemetry (set up by the first config).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .config import Config
from .cost.budgets import Budgets
from .cost.prices import PriceTable, shipped
from .cost.store import RedisBackend, SqliteBackend, UsageStore, usage_path
from .fleet import workers
from .fleet.shared_state import Describe, LocalState, RedisState, shared_state
from .logs import EventLog
from .metrics import Metrics
from .providers import Provider
from .state.access import Access
from .state.endpoints import EndpointPool
from .state.policy import RetryBudget
from .state.routing import Router
from .telemetry.switch import Telemetry
from .upstream.client import UpstreamClient
from .upstream.failover import Failover


@dataclass
class Lasting:
    """What a process keeps across reloads; each piece takes a new config in place."""

    pool: EndpointPool = field(default_factory=EndpointPool)
    events: EventLog = field(default_factory=EventLog)
    budget: RetryBudget = field(default_factory=lambda: RetryBudget(0.2, 10))
    shared: LocalState = field(default_factory=LocalState)
    metrics: Metrics = field(init=False)
    budgets: Budgets = field(init=False)  # the spend caps; `budget` above is the retry budget
    client: UpstreamClient = field(init=False)
    usage: UsageStore = field(default_factory=UsageStore)  # what each answer used and cost, kept
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    telemetry: Telemetry = field(init=False)  # each request's trace, when the config turns it on

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.pool, self.shared)
        self.budgets = self.metrics.budgets = Budgets(self.events)
        self.client = UpstreamClient(Config(endpoints=()), 0, self.metrics.stale_retries)
        self.telemetry = Telemetry(self.metrics, self.events)

    async def share(self, config: Config, describe: Describe) -> None:
        """Starts the shared state `config` names: a fleet's Redis, one proxy's workers' store, or none."""
        probe_ttl = config.timeouts.connect + config.timeouts.first_byte
        workers_store = os.environ.get(workers.ENV_STATE)
        shared = shared_state(config.state.backend, config.state.redis, self.events, probe_ttl, workers_store)
        self.shared = self.metrics.backend = shared
        self.budget.elsewhere = shared.budget_elsewhere
        await shared.start(self.pool, describe)
        if isinstance(shared, RedisState) and shared.name == "redis":  # the fleet's: one total
            await self.usage.start(RedisBackend(shared.redis, config.state.redis.key_prefix), self.events)
        else:  # a file of this machine's, which a proxy's workers share
            await self.usage.start(SqliteBackend(usage_path(config, os.environ)), self.events)
        if isinstance(shared, RedisState):  # a Redis that is away is no reason to wait long
            self.budgets.store = shared
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shared.connected.wait(), 1.0)
            await self.budgets.sync()  # the fleet's spend so far, before the first request
            self.spawn(self.budgets.share())
        else:
            await self.budgets.restore(self.usage)

    def spawn(self, coroutine: Any) -> None:
        """Runs background work that the process cancels when it stops."""
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@dataclass(frozen=True)
class Runtime:
    """The parts built from one config; a reload replaces them together."""

    config: Config
    router: Router
    access: Access
    failover: Failover
    prices: PriceTable  # the shipped prices with the config's `pricing` over them

    @classmethod
    def build(
        cls, config: Config, previous: Runtime | None, lasting: Lasting, log_context: Mapping[str, object]
    ) -> Runtime:
        """The runtime of `config`; endpoint states, sessions and providers carry over from `previous`."""
        lasting.pool.update(config.endpoints)
        # credentials refused or missing may have been fixed: a reload is the sign to look again
        renewed = lasting.pool.forgive("credentials") if previous else []
        lasting.events.configure(
            config.logging.level,
            config.logging.format,
            secrets_of(config),
            log_context,
            config.logging.redact_keys,
        )
        lasting.telemetry.configure(config.telemetry)
        lasting.budget.ratio = config.retry.budget_ratio
        lasting.budget.min_retries = config.retry.budget_min_retries
        lasting.budgets.configure(config.server)
        pricing = config.pricing
        prices = shipped().over(
            dict(pricing.models), {name: dict(models) for name, models in pricing.endpoints}
        )
        router = Router(
            config.routing,
            previous.router.sessions if previous else None,
            previous.router.caches if previous else None,
            prices,  # what a session's turns and its cache rebuilds cost, for the cache rules
            counted=lambda endpoint, rule: lasting.metrics.cache_routed.labels(endpoint, rule).inc(),
        )
        failover = Failover(
            config,
            lasting.pool,
            lasting.client,
            lasting.metrics,
            lasting.events,
            lasting.budget,
            router,
            lasting.shared,
        )
        runtime = cls(config, router, Access(config.server), failover, prices=prices)
        runtime.prepare(lasting.client.configure(config, renewed), lasting)
        return runtime

    def prepare(self, providers: Iterable[Provider], lasting: Lasting) -> None:
        """Each new endpoint's credentials, looked for in the background: the proxy serves meanwhile."""
        if lasting.client.session is None:
            return  # not serving yet: `running` looks for every endpoint's
        for provider in providers:
            lasting.spawn(self.failover.prepare(provider))


def secrets_of(config: Config) -> list[str]:
    """Every key and password of the config, for the log to mask."""
    secrets = [e.api_key or "" for e in config.endpoints] + [config.server.access_key or ""]
    secrets += [client.key for client in config.server.access_keys] + [config.state.redis.url or ""]
    secrets += [value for _, value in config.telemetry.headers]  # a vendor's key, as Honeycomb's
    secrets.append(urlsplit(config.state.redis.url or "").password or "")
    return [s for s in secrets if s]
