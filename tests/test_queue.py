"""``execbox.queue`` against a real Redis: one consumer per entry, orphans claimed once, heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from execbox.queue import Entry, Heartbeat, StreamQueue
from execbox.state.keys import heartbeat_key, stream_key

Body = Callable[[aioredis.Redis], Awaitable[None]]


@pytest.fixture
def run(redis_url: str) -> Iterator[Callable[[Body], None]]:
    """Run an async test body with a client of an emptied database of these tests' own."""
    url = redis_url.rsplit("/", 1)[0] + "/10"

    def runner(body: Body) -> None:
        async def main() -> None:
            r = aioredis.Redis.from_url(url, decode_responses=True)
            await r.flushdb()
            try:
                await body(r)
            finally:
                await r.flushdb()
                await r.aclose()

        asyncio.run(main())

    yield runner


def queues(r: aioredis.Redis, *names: str) -> list[StreamQueue]:
    return [StreamQueue(r, "work", "g", name) for name in names]


def test_an_entry_goes_to_one_consumer_and_is_gone_once_acked(run: Callable[[Body], None]) -> None:
    async def body(r: aioredis.Redis) -> None:
        one, two = queues(r, "one", "two")
        await one.ensure_group()
        await one.ensure_group()  # idempotent
        entry_id = await one.add({"job": "j1"})
        got = await one.read(block=1)
        assert got is not None and got.id == entry_id and got.fields == {"job": "j1"} and got.deliveries == 1
        assert await two.read(block=0.1) is None
        assert await one.pending_count() == 1
        await one.ack(entry_id)
        assert await one.pending_count() == 0 and await r.xlen(stream_key("work")) == 0
        assert 0 < await r.pttl(stream_key("work")) <= 7 * 86400 * 1000  # every key has a TTL

    run(body)


def test_orphans_of_a_dead_consumer_are_claimed_once_and_a_live_ones_are_not(run: Callable[[Body], None]) -> None:
    async def body(r: aioredis.Redis) -> None:
        one, two, three = queues(r, "one", "two", "three")
        hb_one = Heartbeat(r, "one", ttl=30)
        await one.ensure_group()
        await hb_one.beat()
        assert 0 < await r.pttl(heartbeat_key("one")) <= 30_000
        entry_id = await one.add({"job": "j1"})
        assert await one.read(block=1) is not None
        await asyncio.sleep(0.06)  # let the entry's idle time pass the claim threshold below
        observer = Heartbeat(r, "two", ttl=30)
        assert await two.claim_orphans(observer, min_idle=0.05) == []  # "one" is alive: slow, not dead
        await hb_one.stop()
        assert not await r.exists(heartbeat_key("one"))
        both = await asyncio.gather(
            two.claim_orphans(observer, min_idle=0.05), three.claim_orphans(Heartbeat(r, "three", 30), min_idle=0.05)
        )
        claimed = [e for got in both for e in got]
        assert len(claimed) == 1, both  # never two owners
        entry = claimed[0]
        assert (entry.id, entry.fields, entry.previous, entry.deliveries) == (entry_id, {"job": "j1"}, "one", 2)
        owner = "two" if both[0] else "three"
        pending: Any = await r.xpending_range(stream_key("work"), "g", "-", "+", 10)
        assert [p["consumer"] for p in pending] == [owner]
        # Handing it back (claimed from a live consumer by mistake) moves it without a delivery.
        await two.give_back(entry_id, "one")
        pending = await r.xpending_range(stream_key("work"), "g", "-", "+", 10)
        assert [p["consumer"] for p in pending] == ["one"]

    run(body)


def test_dead_consumers_holding_nothing_are_pruned(run: Callable[[Body], None]) -> None:
    async def body(r: aioredis.Redis) -> None:
        one, two = queues(r, "one", "two")
        await one.ensure_group()
        for q in (one, two):
            await q.add({"n": "1"})
            got = await q.read(block=1)
            assert got is not None
            await q.ack(got.id)
        alive = Heartbeat(r, "two", ttl=30)
        await alive.beat()
        assert await one.prune_consumers(alive) == 0  # a consumer never prunes itself; "two" is alive
        assert await two.prune_consumers(alive) == 1
        names = [c["name"] for c in await r.xinfo_consumers(stream_key("work"), "g")]
        assert names == ["two"]

    run(body)


def test_a_stream_that_expired_gets_its_group_back(run: Callable[[Body], None]) -> None:
    async def body(r: aioredis.Redis) -> None:
        (one,) = queues(r, "one")
        await one.ensure_group()
        await r.delete(stream_key("work"))  # what its TTL does after a week without work
        assert await one.read(block=0.1) is None
        await one.add({"n": "2"})
        got = await one.read(block=1)
        assert got is not None and got.fields == {"n": "2"}

    run(body)


def test_pull_takes_work_only_while_a_slot_is_free(run: Callable[[Body], None]) -> None:
    async def body(r: aioredis.Redis) -> None:
        busy, idle = queues(r, "busy", "idle")
        await busy.ensure_group()
        for n in ("a", "b", "c"):
            await busy.add({"n": n})
        slots = asyncio.Semaphore(1)
        got: asyncio.Queue[Entry] = asyncio.Queue()
        task = asyncio.create_task(busy.pull(slots, got.put_nowait, block=0.1))
        try:
            assert (await asyncio.wait_for(got.get(), 5)).fields == {"n": "a"}
            # Its only slot is held: the next entry stays queued for a consumer with room.
            other = await idle.read(block=1)
            assert other is not None and other.fields == {"n": "b"}
            slots.release()  # the handler of "a" is done
            assert (await asyncio.wait_for(got.get(), 5)).fields == {"n": "c"}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(body)
