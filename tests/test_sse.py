"""Reading SSE as events, whatever the chunking, and the one idle timer a stream reads under."""

from __future__ import annotations

import asyncio
import json

import pytest

from addon import sse
from addon.upstream.client import IdleWatch


def anthropic_stream(words: list[str]) -> bytes:
    def event(name: str, data: dict[str, object]) -> str:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n"

    usage = {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 3}
    parts = [
        event("message_start", {"type": "message_start", "message": {"usage": usage}}),
        event("content_block_start", {"type": "content_block_start", "index": 0}),
        event("ping", {"type": "ping"}),
        *(event("content_block_delta", {"type": "content_block_delta", "delta": {"text": w}}) for w in words),
        event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 7}}),
        event("message_stop", {"type": "message_stop"}),
    ]
    return "".join(parts).encode()


STREAM = anthropic_stream(["message_delta ", "is ", "a word too"])


def read(chunks: list[bytes], only: tuple[bytes, ...] = ()) -> list[sse.Event]:
    reader = sse.EventReader()
    return [event for chunk in chunks for event in reader.feed(chunk, only)]


@pytest.mark.parametrize("size", [1, 7, 64, len(STREAM)])
def test_events_are_the_same_whatever_the_chunking(size):
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    names = [event.name for event in read(chunks)]
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 3 + [
        "message_delta",
        "message_stop",
    ]


@pytest.mark.parametrize("size", [1, 2, 7])
def test_crlf_line_ends_read_as_lf_wherever_a_chunk_ends(size):
    crlf = STREAM.replace(b"\n", b"\r\n")
    chunks = [crlf[i : i + size] for i in range(0, len(crlf), size)]
    assert read(chunks) == read([STREAM])


@pytest.mark.parametrize("size", [1, 5, 100, len(STREAM)])
def test_reading_only_usage_events_finds_all_the_usage(size):
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    events = read(chunks, sse.USAGE_EVENTS)
    # a delta whose text happens to name an event is read too, and found to carry no usage
    assert [e.name for e in events] == ["message_start", "content_block_delta", "message_delta"]
    usage = [u for e in events if (u := sse.usage_of(e)) is not None]
    assert usage == [sse.Usage(input=12, output=1, cache_read=3), sse.Usage(output=7)]


class Feed:
    """The part of aiohttp's StreamReader that IdleWatch uses, fed by the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def readany(self) -> bytes:
        return await self.queue.get()


def test_idle_watch_times_out_a_read_that_waits_too_long():
    async def scenario() -> float:
        watch, feed = IdleWatch(0.05), Feed()
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await watch.read(feed)  # type: ignore[arg-type]
        watch.stop()
        return asyncio.get_running_loop().time() - started

    assert 0.05 <= asyncio.run(scenario()) < 1.0


def test_idle_watch_lets_a_steady_stream_run_longer_than_its_timeout():
    async def scenario() -> list[bytes]:
        watch, feed = IdleWatch(0.3), Feed()

        async def produce() -> None:
            for i in range(12):  # 12 x 50 ms: twice the timeout in all, never idle for long
                await asyncio.sleep(0.05)
                feed.queue.put_nowait(b"%d" % i)

        producer = asyncio.ensure_future(produce())
        got = [await watch.read(feed) for _ in range(12)]  # type: ignore[arg-type]
        watch.stop()
        await producer
        return got

    assert asyncio.run(scenario()) == [b"%d" % i for i in range(12)]


def test_idle_watch_passes_on_a_cancel_from_outside():
    async def scenario() -> None:
        watch, feed = IdleWatch(10.0), Feed()
        reading = asyncio.ensure_future(watch.read(feed))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        watch.stop()

    asyncio.run(scenario())


def test_idle_watch_is_quiet_while_nobody_reads():
    async def scenario() -> bytes:
        watch, feed = IdleWatch(0.05), Feed()
        feed.queue.put_nowait(b"first")
        first = await watch.read(feed)  # type: ignore[arg-type]
        await asyncio.sleep(0.15)  # the consumer is busy: time not spent reading does not count
        feed.queue.put_nowait(b"second")
        second = await watch.read(feed)  # type: ignore[arg-type]
        watch.stop()
        return first + second

    assert asyncio.run(scenario()) == b"firstsecond"
