"""A dispatched run's output, streamed through Redis: the node's pump and the API's relay.

When the caller streams (server-sent events), the node hands the library an
``on_output`` callback (it runs on the run's worker thread) that passes each kept
chunk to the node's event loop; a pump task there decodes it (UTF-8, incrementally,
as the in-process stream does), merges what came meanwhile, and appends it to
``execbox:out:<run>`` (a stream with a TTL). The node's answer goes last on the same
stream, so the relay sees every chunk before the result. Output limits apply on the
node before the callback (the same caps and truncation as in-process).

The stream is bounded: entries are at most ``ENTRY_CHARS`` characters, the first
``FAST_ENTRIES`` batches go at once and later ones at most every ``SLOW_INTERVAL``
s, so a run within the service's maximum limits (300 s, 64 MiB per stream) adds
fewer than ``MAXLEN`` entries, the length every ``XADD`` trims to (a hard bound).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from .state.keys import output_key

__all__ = ["ENTRY_CHARS", "MAXLEN", "OutputPump", "Receive", "coalesce", "list_receiver", "stream_receiver"]

log = logging.getLogger("execbox.node")

ENTRY_CHARS = 64 << 10  # characters of output in one stream entry at most
FAST_ENTRIES = 1000  # entries added as soon as output comes
SLOW_INTERVAL = 0.05  # beyond those, one batch per this many seconds (output merges meanwhile)
MAXLEN = 10_000  # every XADD trims the stream to this length (never reached within the maximum limits)
END = "end"  # the kind of the last entry: the node's answer (JSON)

# One step of waiting for a run's answer: block up to the given seconds (None: do not block);
# the answer, or None if it has not come yet.
Receive = Callable[[float | None], Awaitable[dict[str, Any] | None]]


def coalesce(chunks: list[tuple[str, str]], limit: int = ENTRY_CHARS) -> list[tuple[str, str]]:
    """Consecutive chunks of one stream merged, in order; none longer than ``limit`` characters."""
    out: list[tuple[str, str]] = []
    for name, text in chunks:
        if out and out[-1][0] == name and len(out[-1][1]) < limit:
            room = limit - len(out[-1][1])
            out[-1] = (name, out[-1][1] + text[:room])
            text = text[room:]
        while text:
            out.append((name, text[:limit]))
            text = text[limit:]
    return out


class OutputPump:
    """The node's end: ``on_output`` (any thread) -> the run's output stream; ``finish`` adds the answer.

    Created on the node's event loop. ``ttl`` (s) is how long the stream outlives its last entry.
    """

    def __init__(self, r: aioredis.Redis, run_id: str, ttl: float) -> None:
        self.r, self.key, self.ttl_ms = r, output_key(run_id), max(1, int(ttl * 1000))
        self.entries = 0
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
        self._task = self._loop.create_task(self._pump())

    def on_output(self, stream: str, chunk: bytes) -> None:
        """The library's output callback: called on the run's worker thread."""
        # Bounded by the run's output caps: the library calls this with kept chunks only.
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): the result still completes
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (stream, chunk))

    async def finish(self, answer: str) -> None:
        """After the run: the output still queued, then the answer (JSON) as the last entry."""
        self._queue.put_nowait(None)
        await self._task
        await self._add([(END, answer)])

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _pump(self) -> None:
        done = False
        while not done:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            texts: list[tuple[str, str]] = []
            for item in items:
                if item is None:
                    done = True
                    texts.extend((n, d.decode(b"", final=True)) for n, d in self._decoders.items())
                else:
                    texts.append((item[0], self._decoders[item[0]].decode(item[1])))
            batch = coalesce([(n, t) for n, t in texts if t])
            if batch:
                try:
                    await self._add(batch)
                except redis.exceptions.RedisError as exc:  # the result still carries all of it
                    log.warning("output of a run not streamed: %s", exc)
            if self.entries >= FAST_ENTRIES and not done:
                await asyncio.sleep(SLOW_INTERVAL)

    async def _add(self, batch: list[tuple[str, str]]) -> None:
        async with self.r.pipeline(transaction=False) as p:
            for name, text in batch:
                p.xadd(self.key, {"s": name, "d": text}, maxlen=MAXLEN, approximate=True)
            p.pexpire(self.key, self.ttl_ms)
            await p.execute()
        self.entries += len(batch)


def stream_receiver(
    r: aioredis.Redis, run_id: str, on_output: Callable[[str, bytes], None], batch: int = 256
) -> tuple[Receive, Callable[[], Awaitable[None]]]:
    """The API's end: a ``Receive`` that relays output entries to ``on_output`` and returns the answer
    once its entry comes; and a clean-up that drops the stream."""
    key = output_key(run_id)
    last = "0-0"

    async def receive(block: float | None) -> dict[str, Any] | None:
        nonlocal last
        started = time.monotonic()
        while True:
            wait = None if block is None else max(1, int((block - (time.monotonic() - started)) * 1000))
            got: Any = await r.xread({key: last}, count=batch, block=wait)
            if not got:
                return None
            for _, entries in got:
                for entry_id, fields in entries:
                    last = entry_id
                    if fields.get("s") == END:
                        answer: dict[str, Any] = json.loads(fields["d"])
                        return answer
                    on_output(fields["s"], fields["d"].encode())
            if block is None or time.monotonic() - started >= block:
                return None  # output came but no answer yet: the caller looks at the node's liveness

    async def drop() -> None:
        with contextlib.suppress(redis.exceptions.RedisError):
            await r.unlink(key)

    return receive, drop


def list_receiver(r: aioredis.Redis, key: str) -> Receive:
    """The answer pushed to a list (runs that do not stream): BLPOP, or LPOP when not blocking."""

    async def receive(block: float | None) -> dict[str, Any] | None:
        got: Any
        if block is None:
            got = await r.lpop(key)
            return json.loads(got) if got is not None else None
        got = await r.blpop([key], timeout=block)
        return json.loads(got[1]) if got is not None else None

    return receive
