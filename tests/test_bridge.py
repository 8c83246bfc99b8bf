"""chat.web.bridge: a blocking iterator in its own thread, read from asyncio as its newest item."""

from __future__ import annotations

import asyncio
import threading

import pytest

from chat.web.bridge import UpdatePacer, newest_in_thread


async def collect(make, **kwargs) -> list:
    return [item async for item in newest_in_thread(make, **kwargs)]


def test_a_reader_that_keeps_up_gets_every_item_in_order():
    def items(cancelled):
        for n in range(50):
            yield n
            handed.wait(5)  # the next item only once this one was read: the reader keeps up
            handed.clear()

    handed = threading.Event()

    async def read():
        seen = []
        async for item in newest_in_thread(items):
            seen.append(item)
            handed.set()
        return seen

    assert asyncio.run(read()) == list(range(50))


def test_a_slow_reader_gets_the_newest_item_and_always_the_last():
    produced = threading.Event()

    def items(cancelled):
        yield from range(1000)
        produced.set()

    async def read():
        seen = []
        async for item in newest_in_thread(items):
            seen.append(item)
            if len(seen) == 1:
                await asyncio.to_thread(produced.wait, 5)  # everything is produced meanwhile
        return seen

    seen = asyncio.run(read())
    assert seen[-1] == 999
    assert len(seen) <= 3  # the first, perhaps one in flight, the last: not a backlog of 1,000
    assert seen == sorted(seen)


def test_an_error_in_the_producer_reaches_the_reader_after_the_items_before_it():
    def items(cancelled):
        yield "partial"
        raise ValueError("server went away")

    async def read():
        seen = []
        with pytest.raises(ValueError, match="server went away"):
            async for item in newest_in_thread(items):
                seen.append(item)
        return seen

    assert asyncio.run(read()) == ["partial"]


def test_closing_the_reader_cancels_and_closes_the_producer_in_its_own_thread():
    closed_in: list[str] = []
    closed = threading.Event()
    next_token = threading.Event()

    def items(cancelled):
        try:
            n = 0
            while True:
                yield n
                n += 1
                next_token.wait(5)  # a model producing a token whenever the test says so
                next_token.clear()
        finally:
            closed_in.append(threading.current_thread().name)
            closed.set()

    async def read():
        reader = newest_in_thread(items, name="producer-under-test")
        assert await anext(reader) == 0
        await reader.aclose()  # what Gradio does on Stop
        next_token.set()  # the producer notices at its next token

    asyncio.run(read())
    assert closed.wait(5)
    assert closed_in == ["producer-under-test"]


def test_the_cancelled_flag_is_what_the_producer_sees():
    seen_flag = threading.Event()

    def items(cancelled):
        yield 1
        assert cancelled.wait(5)
        seen_flag.set()
        yield 2

    async def read():
        reader = newest_in_thread(items)
        await anext(reader)
        await reader.aclose()

    asyncio.run(read())
    assert seen_flag.wait(5)


def test_a_paced_reader_skips_to_the_end_without_waiting_out_the_interval():
    pacer = UpdatePacer(updates_per_s=0.1)  # one reply streaming: 10 s between its updates
    finish = threading.Event()

    def items(cancelled):
        yield from range(100)
        finish.wait(5)
        yield "last"

    async def read():
        seen = []
        async for item in newest_in_thread(items, pacer=pacer):
            seen.append(item)
            finish.set()
        return seen

    seen = asyncio.run(asyncio.wait_for(read(), 5))  # the final item is not held for 10 s
    assert seen[-1] == "last"
    assert len(seen) == 2  # the first update, then nothing until the end
    assert pacer.streaming == 0


def test_the_pacer_shares_its_budget_among_the_replies_streaming_now():
    pacer = UpdatePacer(updates_per_s=200, min_interval_s=0.02)
    assert pacer.interval_s() == 0.02
    pacer.streaming = 1
    assert pacer.interval_s() == 0.02  # one reply alone: every 20 ms
    pacer.streaming = 64
    assert pacer.interval_s() == pytest.approx(0.32)
