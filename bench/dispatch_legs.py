"""Where the time of a dispatched run goes between processes, without an engine: a real `Node` in a
process of its own over a stub executor (an instant result), and a `Dispatcher` in this one, over
a real Redis. Prints the p50 of each leg (wall clocks of one machine):

    API add -> node read      XADD, the node's XREADGROUP wakes
    read -> node task         the entry handed to a task of its own
    task -> run starts        the request parsed, the hop to the run's worker thread
    run -> answer pushed      the result serialized, back on the loop, RPUSH (+ XACK/XDEL)
    answer -> API has it      BLPOP wakes, the result parsed

    .venv/bin/python bench/dispatch_legs.py [--runs 200] [--redis redis://127.0.0.1:6399/12]

Loopback only; bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import signal
import statistics
import sys
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from execbox.models import ExecutionRequest, ExecutionResult, Limits

MARKS: dict[str, float] = {}


class _StubEngine:
    def ping(self) -> None:
        pass


class _StubExecutor:
    pool = None
    engine = _StubEngine()

    def run(self, request: Any, on_output: Any = None, *, tenant: str = "", network_ceiling: Any = None) -> Any:
        MARKS["run"] = time.time()
        return ExecutionResult(id="x", language="python", stdout="1\n", exit_code=0, duration_ms=0.1, node="n0")


def _node(url: str) -> None:
    import execbox.node as nm
    import execbox.queue as qm

    read, run, execute = qm.StreamQueue.read, nm.Node._run, nm.Node._execute

    async def timed_read(self: Any, block: float) -> Any:
        entry = await read(self, block)
        MARKS["read"] = time.time()
        return entry

    async def timed_run(self: Any, entry: Any) -> Any:
        MARKS["task"] = time.time()
        return await run(self, entry)

    async def timed_execute(self: Any, fields: Any, on_output: Any) -> str:
        answer = json.loads(await execute(self, fields, on_output))
        answer["marks"] = dict(MARKS, answered=time.time())  # just before RPUSH
        return json.dumps(answer)

    qm.StreamQueue.read, nm.Node._run, nm.Node._execute = timed_read, timed_run, timed_execute  # type: ignore[method-assign]

    async def main() -> None:
        r = aioredis.from_url(url, decode_responses=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await nm.Node(_StubExecutor(), r, "n0", 4, 10).serve(stop)  # type: ignore[arg-type]
        await r.aclose()

    asyncio.run(main())


async def _api(url: str, runs: int) -> None:
    import execbox.server.dispatch as dm

    got: list[tuple[dict[str, float], float]] = []
    answer = dm.Dispatcher._answer

    def timed_answer(a: dict[str, Any], holder: str | None) -> ExecutionResult:
        got.append((a.pop("marks"), time.time()))
        return answer(a, holder)

    dm.Dispatcher._answer = staticmethod(timed_answer)  # type: ignore[method-assign]
    d = dm.Dispatcher(url)
    await d.start()
    request = ExecutionRequest(language="python", code="print(1)", limits=Limits(timeout=10))
    legs: dict[str, list[float]] = {
        k: [] for k in ("total", "add -> read", "read -> task", "task -> run", "run -> answered", "answered -> API")
    }
    for _ in range(runs):
        await asyncio.sleep(0.02)
        t0, p0 = time.time(), time.perf_counter()
        await d.run("t", request, None)
        legs["total"].append((time.perf_counter() - p0) * 1000)
        m, t5 = got[-1]
        for key, a, b in (
            ("add -> read", t0, m["read"]),
            ("read -> task", m["read"], m["task"]),
            ("task -> run", m["task"], m["run"]),
            ("run -> answered", m["run"], m["answered"]),
            ("answered -> API", m["answered"], t5),
        ):
            legs[key].append((b - a) * 1000)
    await d.close()
    for key, values in legs.items():
        print(f"  {key:18s} p50 {statistics.median(values):6.2f} ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--redis", default="redis://127.0.0.1:6399/12")
    args = p.parse_args()
    redis.Redis.from_url(args.redis).flushdb()
    node = mp.get_context("spawn").Process(target=_node, args=(args.redis,))
    node.start()
    try:
        time.sleep(2.0)
        print(f"dispatch legs, {min(args.runs, 2000)} runs, stub executor")
        asyncio.run(_api(args.redis, min(args.runs, 2000)))
    finally:
        node.terminate()
        node.join(30)
        redis.Redis.from_url(args.redis).flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main())
