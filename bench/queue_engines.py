"""Dispatch latency of candidate queue engines on one Redis: the figure the job queue was chosen by.

    .venv/bin/python bench/queue_engines.py [--redis redis://127.0.0.1:6399/11] [--runs 200]
    # arq pins redis<6 (execbox uses redis 8): measure it from a venv of its own, e.g.
    python3 -m venv /tmp/arq && /tmp/arq/bin/pip install arq && /tmp/arq/bin/python bench/queue_engines.py

Dispatch latency = enqueue by a producer -> the consumer holds the entry, both on loopback,
one at a time (an idle consumer waiting for work: the latency an async job adds at low load).

* Redis Streams: ``XADD`` -> a consumer blocked in ``XREADGROUP ... BLOCK`` (what execbox uses).
* arq (if importable): ``enqueue_job`` -> the job function starts in a worker; arq polls its queue
  every ``poll_delay`` (0.5 s by default), so it is measured at the default and at 10 ms.

The database given is emptied first. Loopback only, bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from typing import Any

import redis.asyncio as aioredis


def line(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{name:<44} p50 {statistics.median(values):8.2f} ms   p95 {p95:8.2f} ms   (n={len(values)})"


async def streams(url: str, runs: int) -> list[float]:
    producer = aioredis.Redis.from_url(url)
    consumer = aioredis.Redis.from_url(url)
    await producer.flushdb()
    await producer.xgroup_create("bench:q", "g", id="0", mkstream=True)
    got: asyncio.Queue[float] = asyncio.Queue()

    async def consume() -> None:
        while True:
            answer: Any = await consumer.xreadgroup("g", "c1", {"bench:q": ">"}, count=1, block=0)
            for _, entries in answer:
                for entry_id, fields in entries:
                    got.put_nowait(time.perf_counter() - float(fields[b"t"]))
                    await consumer.xack("bench:q", "g", entry_id)

    task = asyncio.create_task(consume())
    out = []
    for _ in range(runs + 5):
        await producer.xadd("bench:q", {"t": repr(time.perf_counter())})
        out.append(await asyncio.wait_for(got.get(), 10) * 1000)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await producer.flushdb()
    await producer.aclose()
    await consumer.aclose()
    return out[5:]


async def arq_dispatch(url: str, runs: int, poll_delay: float) -> list[float]:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    got: asyncio.Queue[float] = asyncio.Queue()

    async def job(ctx: dict[str, Any], t0: float) -> None:
        got.put_nowait(time.perf_counter() - t0)

    settings = RedisSettings.from_dsn(url)
    pool = await create_pool(settings)
    await pool.flushdb()
    worker = Worker(
        functions=[func(job, name="job")], redis_settings=settings, poll_delay=poll_delay, handle_signals=False
    )
    task = asyncio.create_task(worker.async_run())
    out = []
    for _ in range(runs + 2):
        await pool.enqueue_job("job", time.perf_counter())
        out.append(await asyncio.wait_for(got.get(), 10) * 1000)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    with contextlib.suppress(asyncio.CancelledError):
        await worker.close()
    await pool.flushdb()
    await pool.aclose()
    return out[2:]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=os.environ.get("EXECBOX_BENCH_REDIS_URL", "redis://127.0.0.1:6399/11"))
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    s = await streams(args.redis, args.runs)
    print(line("Redis Streams XADD -> XREADGROUP BLOCK", s))
    try:
        import arq  # noqa: F401
    except ImportError:
        print("arq: not installed in this interpreter (see the docstring)")
        return
    a_default = await arq_dispatch(args.redis, min(args.runs, 40), 0.5)
    print(line("arq enqueue_job -> job starts (poll 0.5 s)", a_default))
    a_fast = await arq_dispatch(args.redis, args.runs, 0.01)
    print(line("arq enqueue_job -> job starts (poll 10 ms)", a_fast))
    base = statistics.median(s)
    print(
        f"arq/Streams, p50: {statistics.median(a_default) / base:.0f}x (default poll), "
        f"{statistics.median(a_fast) / base:.0f}x (10 ms poll)"
    )


if __name__ == "__main__":
    asyncio.run(main())
