"""A dispatched run's output, streamed through Redis: the node's pump and the API's relay.

When the caller streams (server-sent events), the node hands the library an
``on_output`` callback (it runs on the run's worker thread) that passes each kept
chunk to the node's event loop; a pump task there decodes it (UTF-8, incrementally,
as the in-process stream does), merges what came meanwhile, and appends it to
``execbox:out:<run>`` (a stream with a TTL). The node's answer goes last on the same
stream, so the relay sees every chunk before the result. Output limits apply on the
node before the callback (the same caps and truncation as in-process).

The stream is bounded: each entry holds the chunks of one batch in order (JSON
pairs of stream and text), at most ``ENTRY_CHARS`` characters (a bigger batch takes
``characters / ENTRY_CHARS + 1`` entries, however its streams interleave); the first
``FAST_ENTRIES`` entries go at once and later batches at most every
``SLOW_INTERVAL`` s. A run within the service's maximum limits (300 s + the 15 s
grace, 64 MiB per stream) thus adds at most about 1000 + 6300 + 2048 entries, fewer
than ``MAXLEN``, the length every ``XADD`` trims to (a hard bound never reached).
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

__all__ = ["ENTRY_CHARS", "MAXLEN", "OutputPump", "Receive", "list_receiver", "pack", "stream_receiver"]

log = logging.getLogger("execbox.node")

ENTRY_CHARS = 64 << 10  # characters of output in one stream entry at most
FAST_ENTRIES = 1000  # entries added as soon as output comes
SLOW_INTERVAL = 0.05  # beyond those, one batch per this many seconds (output merges meanwhile)
MAXLEN = 10_000  # every XADD trims the stream to this length (never reached within the maximum limits)
END = "end"  # the field of the last entry: the node's answer (JSON); others have "c", the chunks

# One step of waiting for a run's answer: block up to the given seconds (None: do not block);
# the answer, or None if it has not come yet.
Receive = Callable[[float | None], Awaitable[dict[str, Any] | None]]


def pack(chunks: list[tuple[str, str]], limit: int = ENTRY_CHARS) -> list[list[tuple[str, str]]]:
    """``(stream, text)`` chunks in order as groups of at most ``limit`` characters (all but the last
    exactly that), neighbours of one stream merged: one group per stream entry, so a batch of any
    interleaving adds at most ``characters / limit + 1`` entries."""
    groups: list[list[tuple[str, str]]] = []
    group: list[tuple[str, str]] = []
    size = 0
    for name, text in chunks:
        while text:
            part, text = text[: limit - size], text[limit - size :]
            if group and group[-1][0] == name:
                group[-1] = (name, group[-1][1] + part)
            else:
                group.append((name, part))
            size += len(part)
            if size >= limit:
                groups.append(group)
                group, size = [], 0
    if group:
        groups.append(group)
    return groups


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
        await self._add([{END: answer}])

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
            groups = pack([(n, t) for n, t in texts if t])
            if groups:
                try:
                    await self._add([{"c": json.dumps(g, separators=(",", ":"))} for g in groups])
                except redis.exceptions.RedisError as exc:  # the result still carries all of it
                    log.warning("output of a run not streamed: %s", exc)
            if self.entries >= FAST_ENTRIES and not done:
                await asyncio.sleep(SLOW_INTERVAL)

    async def _add(self, entries: list[dict[str, str]]) -> None:
        async with self.r.pipeline(transaction=False) as p:
            for fields in entries:
                p.xadd(self.key, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
            p.pexpire(self.key, self.ttl_ms)
            await p.execute()
        self.entries += len(entries)


def stream_receiver(
    r: aioredis.Redis, run_id: str, on_output: Callable[[str, bytes], None], batch: int = 64
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
                    if END in fields:
                        answer: dict[str, Any] = json.loads(fields[END])
                        return answer
                    for name, text in json.loads(fields.get("c", "[]")):
                        on_output(str(name), str(text).encode())
            if block is not None and time.monotonic() - started >= block:
                return None  # output came but no answer yet: the caller looks at the node's liveness
            # Not blocking (the last look): read on until the stream has nothing more.

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
