"""Work queues on Redis Streams consumer groups, and consumer heartbeats.

A small layer over what Redis itself gives, shared by everything that hands work
between processes (async jobs and their webhooks today, runs for nodes next):

* ``StreamQueue.add`` appends an entry (``XADD``, trimmed, the key's TTL refreshed);
  ``read`` blocks until one is delivered to this consumer alone (``XREADGROUP``);
  ``pull`` reads only while a slot of the caller's is free;
  ``ack`` removes it once handled (``XACK`` + ``XDEL``). An entry delivered and not
  acked stays in the group's pending list under its consumer's name.
* ``Heartbeat`` keeps ``execbox:hb:<consumer>`` alive (a TTL, refreshed at a third of
  it) while the process is. A pending entry whose consumer has no heartbeat was held
  by a dead process: ``claim_orphans`` takes it over (``XPENDING`` + ``XCLAIM`` with a
  minimum idle time, so two claimers cannot both win). A slow consumer keeps its
  heartbeat and its entries.

What an orphaned entry means (run it again, fail it, finish it) is the caller's
business: this module only moves entries between consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from .state.keys import heartbeat_key, stream_key

__all__ = ["Entry", "Heartbeat", "StreamQueue"]

log = logging.getLogger("execbox.queue")


@dataclass(frozen=True)
class Entry:
    """One queue entry as delivered to this consumer."""

    id: str
    fields: dict[str, str]
    deliveries: int = 1  # how many times Redis delivered it (claims included)
    previous: str | None = None  # the consumer it was claimed from


class Heartbeat:
    """This consumer's liveness key, and the liveness of others."""

    def __init__(self, r: aioredis.Redis, consumer: str, ttl: float) -> None:
        self.r, self.consumer, self.ttl = r, consumer, ttl
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        await self.r.set(heartbeat_key(self.consumer), "1", px=max(1, int(self.ttl * 1000)))

    def start(self) -> None:
        async def loop() -> None:
            while True:
                try:
                    await self.beat()
                except redis.exceptions.RedisError as exc:
                    log.warning("heartbeat not refreshed: %s", exc)
                await asyncio.sleep(self.ttl / 3)

        self._task = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        """Stop beating and drop the key: what this consumer still holds is orphaned at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(redis.exceptions.RedisError):
            await self.r.delete(heartbeat_key(self.consumer))

    async def alive(self, consumers: set[str]) -> set[str]:
        names = sorted(consumers)
        if not names:
            return set()
        async with self.r.pipeline(transaction=False) as p:
            for name in names:
                p.exists(heartbeat_key(name))
            found = await p.execute()
        return {name for name, n in zip(names, found, strict=True) if n}


class StreamQueue:
    """One stream and one consumer group, seen by one consumer."""

    def __init__(
        self,
        r: aioredis.Redis,
        name: str,
        group: str,
        consumer: str,
        maxlen: int = 100_000,
        ttl: float = 7 * 86400,
    ) -> None:
        self.r, self.key, self.group, self.consumer = r, stream_key(name), group, consumer
        self.maxlen, self.ttl_ms = maxlen, int(ttl * 1000)

    async def ensure_group(self) -> None:
        """Create the group (and the stream) if missing; it starts at the stream's first entry."""
        try:
            await self.r.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self.r.pexpire(self.key, self.ttl_ms)

    async def add(self, fields: dict[str, str]) -> str:
        async with self.r.pipeline(transaction=True) as p:
            p.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            p.pexpire(self.key, self.ttl_ms)
            entry_id, _ = await p.execute()
        return str(entry_id)

    async def read(self, block: float) -> Entry | None:
        """The next new entry, waiting up to ``block`` seconds; None if none came."""
        try:
            answer: Any = await self.r.xreadgroup(
                self.group, self.consumer, {self.key: ">"}, count=1, block=max(1, int(block * 1000))
            )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream expired (nothing added for its TTL) and took the group with it.
            await self.ensure_group()
            return None
        for _, entries in answer or []:
            for entry_id, fields in entries:
                return Entry(entry_id, fields)
        return None

    async def pull(self, slots: asyncio.Semaphore, start: Callable[[Entry], None], block: float = 5.0) -> None:
        """Read entries for ever, one per free slot: ``start`` hands each one on, and its handler releases
        the slot. Work is pulled only when there is capacity for it; the rest stays queued for others."""
        while True:
            await slots.acquire()
            try:
                entry = await self.read(block)
            except redis.exceptions.RedisError as exc:
                slots.release()
                log.warning("reading %s failed: %s", self.key, exc)
                await asyncio.sleep(1.0)
                continue
            except BaseException:
                slots.release()
                raise
            if entry is None:
                slots.release()
            else:
                start(entry)

    async def ack(self, entry_id: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.xack(self.key, self.group, entry_id)
            p.xdel(self.key, entry_id)
            await p.execute()

    async def claim_orphans(self, heartbeat: Heartbeat, min_idle: float, count: int = 100) -> list[Entry]:
        """Take over pending entries whose consumer has no heartbeat (idle at least ``min_idle`` s)."""
        idle_ms = max(1, int(min_idle * 1000))
        pending = await self.r.xpending_range(self.key, self.group, "-", "+", count, idle=idle_ms)
        holders = {str(p["consumer"]) for p in pending} - {self.consumer}
        dead = holders - await heartbeat.alive(holders)
        claimed: list[Entry] = []
        for p in pending:
            previous = str(p["consumer"])
            if previous not in dead:
                continue
            # XCLAIM with a minimum idle time: a concurrent claimer's success resets the idle time, so ours fails.
            got: Any = await self.r.xclaim(self.key, self.group, self.consumer, idle_ms, [p["message_id"]])
            for entry_id, fields in got:
                if fields is not None:
                    claimed.append(Entry(entry_id, fields, int(p["times_delivered"]) + 1, previous))
        return claimed

    async def give_back(self, entry_id: str, consumer: str) -> None:
        """Hand an entry claimed by mistake back to its (live) consumer."""
        await self.r.xclaim(self.key, self.group, consumer, 0, [entry_id], justid=True)

    async def prune_consumers(self, heartbeat: Heartbeat) -> int:
        """Forget consumers of the group that are dead and hold nothing."""
        consumers = await self.r.xinfo_consumers(self.key, self.group)
        idle = {str(c["name"]) for c in consumers if int(c["pending"]) == 0} - {self.consumer}
        dead = idle - await heartbeat.alive(idle)
        for name in dead:
            await self.r.xgroup_delconsumer(self.key, self.group, name)
        return len(dead)

    async def pending_count(self) -> int:
        info = await self.r.xpending(self.key, self.group)
        return int(info["pending"])
