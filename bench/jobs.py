"""Dispatch overhead of an async job against ``POST /v1/execute``, through real ``execbox serve`` processes.

    .venv/bin/python bench/jobs.py [--redis redis://127.0.0.1:6399/12] [--runs 60] [--language python]

One client, one request at a time (no queueing behind other work), a one-line program, on:

* a server whose jobs go through the Redis queue (``EXECBOX_QUEUE_URL``; the database is emptied), and
* an embedded server (no Redis: jobs are tasks of the process), for comparison.

Every measured request starts with the warm pool full (the bench waits for the refill), so the
figures compare dispatch paths, not pool misses. Per server: ``/v1/execute`` latency; the async
round trip (``POST /v1/executions`` then ``GET /v1/executions/{id}?wait=30``, i.e. until the
result is in the client's hands); and the server-side dispatch delay (``started_at - created_at``
of the job: queue, slot and record update). Overhead = async p50 - execute p50.
Loopback only, bounded in count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.serverkit import ServeProcess  # noqa: E402  (the tests' process helper)

PROGRAMS = {"python": "print(1)", "javascript": "console.log(1)", "bash": "echo 1"}


def line(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"  {name:<44} p50 {statistics.median(values):8.2f} ms   p95 {p95:8.2f} ms   (n={len(values)})"


def pool_ready(c: httpx.Client) -> float:
    for row in c.get("/metrics").text.splitlines():
        if row.startswith("execbox_pool_ready "):
            return float(row.split()[1])
    return 0.0


def refilled(c: httpx.Client, ready: float) -> None:
    """Wait until the warm pool is back to ``ready``: every measured run starts from a full pool."""
    deadline = time.monotonic() + 30
    while pool_ready(c) < ready and time.monotonic() < deadline:
        time.sleep(0.02)


def measure(c: httpx.Client, language: str, runs: int) -> tuple[list[float], list[float], list[float]]:
    body = {"language": language, "code": PROGRAMS[language]}
    sync, round_trip, dispatch = [], [], []
    time.sleep(2)  # the pool fills after start-up
    full = pool_ready(c)
    for i in range(runs + 5):
        refilled(c, full)
        t = time.perf_counter()
        r = c.post("/v1/execute", json=body)
        sync_ms = (time.perf_counter() - t) * 1000
        assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
        refilled(c, full)
        t = time.perf_counter()
        job_id = c.post("/v1/executions", json=body).json()["id"]
        job = c.get(f"/v1/executions/{job_id}", params={"wait": 30}).json()
        async_ms = (time.perf_counter() - t) * 1000
        assert job["status"] == "completed", job
        if i >= 5:  # warm-up
            sync.append(sync_ms)
            round_trip.append(async_ms)
            dispatch.append((job["started_at"] - job["created_at"]) * 1000)
    return sync, round_trip, dispatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=os.environ.get("EXECBOX_BENCH_REDIS_URL", "redis://127.0.0.1:6399/12"))
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--language", default="python", choices=sorted(PROGRAMS))
    args = parser.parse_args()
    r = redis.Redis.from_url(args.redis)
    r.flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in (("redis-queue", {"EXECBOX_QUEUE_URL": args.redis}), ("embedded", {})):
            env |= {"EXECBOX_LOG_LEVEL": "warning", "EXECBOX_MAX_CONCURRENT": "2"}
            server = ServeProcess(Path(tmp), name, None, **env)
            try:
                server.ready()
                with server.client(None) as c:
                    sync, round_trip, dispatch = measure(c, args.language, args.runs)
            finally:
                server.stop()
            print(f"{name} ({args.language} {PROGRAMS[args.language]!r}):")
            print(line("POST /v1/execute", sync))
            print(line("async: submit + GET ?wait= (round trip)", round_trip))
            print(line("async: dispatch (started_at - created_at)", dispatch))
            s50, a50 = statistics.median(sync), statistics.median(round_trip)
            print(f"  overhead of async (p50): +{a50 - s50:.2f} ms, ratio {a50 / s50:.2f}x")
    r.flushdb()
    r.close()


if __name__ == "__main__":
    main()
