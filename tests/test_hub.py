"""The workers' own store (hub.py), spoken to by the real redis-py client a fleet uses and by
the workers' own client (resp_client.py), which must give what redis-py gives, here and against a
real redis-server."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from redis import asyncio as aioredis
from redis.exceptions import ResponseError

from addon.config import Endpoint, RedisSettings
from addon.fleet import resp_client as resp
from addon.fleet.hub import Hub, listening_socket, parse
from addon.fleet.shared_state import shared_state
from addon.logs import EventLog
from addon.state.endpoints import COOLING, EndpointPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def served(tmp_path: Path, clock: Clock | None = None) -> tuple[Hub, str]:
    hub = Hub(clock or Clock())
    path = str(tmp_path / "state.sock")
    await hub.serve(listening_socket(path))
    return hub, f"unix://{path}"


CLIENTS = ["redis-py", "resp"]


def client(url: str, kind: str = "redis-py") -> Any:
    if kind == "resp":
        return resp.Client.from_url(url)
    return aioredis.Redis.from_url(url, decode_responses=True, protocol=2)


def test_parse_takes_whole_commands_only():
    buffer = bytearray(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPI")
    args, used = parse(buffer)
    assert args == [b"GET", b"k"] and buffer[used:] == b"*1\r\n$4\r\nPI"
    assert parse(bytearray(buffer[used:])) is None
    with pytest.raises(ValueError):
        parse(bytearray(b"GET k\r\n"))


@pytest.mark.parametrize("kind", CLIENTS)
def test_keys_expire_and_nx_holds_a_lock_until_then(tmp_path, kind):
    async def run() -> None:
        clock = Clock()
        hub, url = await served(tmp_path, clock)
        redis = client(url, kind)
        assert await redis.ping()
        assert await redis.set("probe:a", "me", nx=True, px=2000)
        assert await redis.set("probe:a", "you", nx=True, px=2000) is None
        assert await redis.get("probe:a") == "me"
        clock.now += 2.5
        assert await redis.get("probe:a") is None
        assert await redis.set("probe:a", "you", nx=True, px=2000)
        await redis.set("session:1", "backup", ex=3600)
        assert await redis.mget(["probe:a", "nothing", "session:1"]) == ["you", None, "backup"]
        assert await redis.delete("probe:a", "nothing") == 1
        await redis.aclose()
        await hub.stop()

    asyncio.run(run())


@pytest.mark.parametrize("kind", CLIENTS)
def test_sets_pipelines_and_errors(tmp_path, kind):
    async def run() -> None:
        hub, url = await served(tmp_path)
        redis = client(url, kind)
        pipe = redis.pipeline(transaction=False)
        pipe.set("instance:a", "{}", ex=3)
        pipe.sadd("instances", "a", "b")
        pipe.smembers("instances")
        assert await pipe.execute() == [True, 2, {"a", "b"}]
        assert await redis.srem("instances", "a") == 1
        assert await redis.smembers("instances") == {"b"}
        with pytest.raises((ResponseError, resp.ResponseError), match="unknown command"):
            await redis.execute_command("FLUSHALL")
        with pytest.raises((ResponseError, resp.ResponseError), match="WRONGTYPE"):
            await redis.get("instances")
        await redis.aclose()
        await hub.stop()

    asyncio.run(run())


@pytest.mark.parametrize("kind", CLIENTS)
def test_spend_adds_up_keeps_its_expiry_and_refuses_what_is_not_a_number(tmp_path, kind):
    async def run() -> None:
        clock = Clock()
        hub, url = await served(tmp_path, clock)
        redis = client(url, kind)
        assert await redis.incrbyfloat("spend:alice", 0.25) == 0.25
        assert await redis.expire("spend:alice", 60) is True
        assert await redis.incrbyfloat("spend:alice", 1.5) == 1.75
        assert await redis.expire("spend:nobody", 60) is False
        clock.now += 59
        assert await redis.get("spend:alice") == "1.75"  # an addition keeps the key's expiry
        clock.now += 2
        assert await redis.get("spend:alice") is None
        await redis.set("word", "abc")
        await redis.sadd("set", "a")
        with pytest.raises((ResponseError, resp.ResponseError), match="not a valid float"):
            await redis.incrbyfloat("word", 1.0)
        with pytest.raises((ResponseError, resp.ResponseError), match="WRONGTYPE"):
            await redis.incrbyfloat("set", 1.0)
        await redis.aclose()
        await hub.stop()

    asyncio.run(run())


@pytest.mark.parametrize("kind", CLIENTS)
def test_published_messages_reach_subscribers_only(tmp_path, kind):
    async def run() -> None:
        hub, url = await served(tmp_path)
        redis, listener = client(url, kind), client(url, kind)
        async with listener.pubsub() as pubsub:
            await pubsub.subscribe("events")
            assert await redis.publish("events", "cool primary") == 1
            assert await redis.publish("elsewhere", "nobody") == 0
            message = None
            for _ in range(5):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message:
                    break
            assert message and message["channel"] == "events" and message["data"] == "cool primary"
        await asyncio.sleep(0.05)
        assert await redis.publish("events", "after") == 0  # the listener left
        await redis.aclose()
        await listener.aclose()
        await hub.stop()

    asyncio.run(run())


def test_a_garbled_client_is_answered_and_closed(tmp_path):
    async def run() -> None:
        hub, url = await served(tmp_path)
        reader, writer = await asyncio.open_unix_connection(url.removeprefix("unix://"))
        writer.write(b"GET k\r\n")
        assert (await reader.readline()).startswith(b"-ERR Protocol error")
        assert await reader.read() == b""
        writer.close()
        await hub.stop()

    asyncio.run(run())


def test_two_workers_share_a_cooldown_through_the_hub(tmp_path):
    """The fleet's own code (RedisState), between two workers, over the hub."""

    async def run() -> None:
        hub, url = await served(tmp_path, Clock())
        endpoints = (Endpoint(name="primary", base_url="http://127.0.0.1:9"),)
        pools = [EndpointPool.build(endpoints), EndpointPool.build(endpoints)]
        states = [shared_state("memory", RedisSettings(), EventLog(), 1.0, workers_store=url) for _ in pools]
        for state, pool in zip(states, pools, strict=True):
            await state.start(pool, dict)
            await asyncio.wait_for(state.connected.wait(), 5)
        assert [state.mode for state in states] == ["workers", "workers"]
        first = pools[0].get("primary")
        first.cool(first.clock() + 60, "status")
        states[0].cooled(first)
        for _ in range(100):
            if pools[1].get("primary").status == COOLING:
                break
            await asyncio.sleep(0.02)
        assert pools[1].get("primary").status == COOLING
        assert await states[0].claim_probe("primary")
        assert not await states[1].claim_probe("primary")
        assert await states[0].claim_probe("primary")  # its own lock, not yet released
        for state in states:
            await state.stop()
        await hub.stop()

    asyncio.run(run())


def test_the_socket_listens_before_anyone_serves_it(tmp_path):
    path = str(tmp_path / "s.sock")
    sock = listening_socket(path)
    early = socket.socket(socket.AF_UNIX)
    early.connect(path)  # waits in the backlog until the supervisor's loop serves it
    early.close()
    sock.close()
    assert listening_socket(path).fileno() > 0  # a stale path is replaced


def test_the_workers_client_answers_as_redis_py_does_from_a_real_redis(redis_server):
    """Every call shared_state.py makes, through both clients, against redis-server itself."""

    async def calls(redis: Any, other: Any, tag: str) -> list[Any]:
        key = f"{tag}:"
        results = [
            await redis.ping(),
            await redis.set(key + "probe", "me", nx=True, px=2000),
            await redis.set(key + "probe", "you", nx=True, px=2000),
            await redis.set(key + "session", "backup", ex=3600),
            await redis.get(key + "probe"),
            await redis.get(key + "nothing"),
            await redis.mget([key + "probe", key + "nothing", key + "session"]),
            await redis.delete(key + "probe", key + "nothing"),
            await redis.sadd(key + "instances", "a", "b"),
            await redis.srem(key + "instances", "a", "c"),
            await redis.smembers(key + "instances"),
            await redis.smembers(key + "empty"),
            await redis.incrbyfloat(key + "spend", 0.25),
            await redis.incrbyfloat(key + "spend", 1.5),
            await redis.expire(key + "spend", 60),
            await redis.expire(key + "nothing", 60),
        ]
        pipe = redis.pipeline(transaction=False)
        pipe.incrbyfloat(key + "spend", 0.125)
        pipe.expire(key + "spend", 60)
        pipe.mget([key + "spend", key + "nothing"])
        pipe.publish(key + "events", "nobody listens")
        pipe.set(key + "instance:a", "{}", ex=3)
        pipe.sadd(key + "instances", "a")
        pipe.smembers(key + "instances")
        pipe.delete(key + "instance:a")
        results.append(await pipe.execute())
        for wrong in (redis.get(key + "instances"), redis.execute_command("NOSUCHCOMMAND")):
            try:
                await wrong
            except Exception as e:
                results.append((type(e).__name__, str(e)))
        async with other.pubsub() as pubsub:
            await pubsub.subscribe(key + "events")
            results.append(await pubsub.get_message(timeout=1.0))
            results.append(await redis.publish(key + "events", "cool primary"))
            results.append(await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0))
            results.append(await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05))
        return results

    async def run() -> None:
        url = redis_server.unix_url
        clients = {kind: (client(url, kind), client(url, kind)) for kind in CLIENTS}
        seen = {kind: await calls(*clients[kind], tag=kind) for kind in CLIENTS}
        for redis, listener in clients.values():
            await redis.aclose()
            await listener.aclose()
        ours, theirs = (
            [repr(r).replace("resp:", "redis-py:") for r in seen[kind]] for kind in ("resp", "redis-py")
        )
        assert ours == theirs
        assert seen["resp"][1] is True and seen["resp"][2] is None  # the probe lock

    asyncio.run(run())
