"""API overhead over the library, and sustained executions/s through the HTTP service.

    .venv/bin/python bench/api.py [--runs 40] [--throughput-runs 80] [--duration 60] [--language python]

0. Side by side (the headline): the library and the API alternate, each call paced so that
   both warm pools are full and idle when it starts (no container creation competing with it);
   the API's p50 and p95 over the library's, from the same minutes of the same machine.
1. Library: ``Executor.execute`` of a one-line program, ``--runs`` times in a row (latency per call).
2. API, one client: the same program through ``execbox serve`` (a real process on 127.0.0.1) with
   ``execbox.Client``. Overhead per request = latency seen by the client - the executor's own
   ``duration_ms`` of that very run (HTTP, JSON, admission, thread hand-off).
3. Throughput at 4 and 16 concurrent clients: ``--throughput-runs`` executions or ``--duration`` seconds,
   whichever comes first; executions/s counts 200 answers only, 503s (queue full) are reported.

Bounded in count and time, loopback only. Figures depend on the machine: this one has 2 cores.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from execbox import Client, Executor, ServerBusyError

PROGRAMS = {"python": "print(1)", "javascript": "console.log(1)", "bash": "echo 1"}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def line(name: str, values: list[float]) -> str:
    return f"{name:<34} p50 {pct(values, 50):8.1f} ms   p95 {pct(values, 95):8.1f} ms   (n={len(values)})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def library(language: str, runs: int) -> list[float]:
    code = PROGRAMS[language]
    out = []
    with Executor() as ex:
        ex.execute(code, language=language)  # warm-up
        for _ in range(runs):
            t = time.perf_counter()
            r = ex.execute(code, language=language)
            out.append((time.perf_counter() - t) * 1000)
            assert r.exit_code == 0, r
    return out


def _pool_full(ready: Callable[[], float], want: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while ready() < want and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the last creation's engine work settles


def side_by_side(url: str, language: str, runs: int) -> tuple[list[float], list[float]]:
    """Alternating library and API calls, each with both pools full: (library ms, API ms)."""
    code = PROGRAMS[language]
    lib: list[float] = []
    api: list[float] = []
    with Executor() as ex, Client(url, trust_env=False) as c, httpx.Client(trust_env=False) as probe:
        want = ex.config.pool_min_ready * len(ex.config.pool_languages)

        def server_ready() -> float:
            for row in probe.get(f"{url}/metrics").text.splitlines():
                if row.startswith("execbox_pool_ready "):
                    return float(row.split()[1])
            return 0.0

        def lib_ready() -> float:
            stats = ex.pool_stats()
            return float(stats.ready) if stats is not None else 0.0

        def both_full() -> None:
            _pool_full(lib_ready, want)
            _pool_full(server_ready, want)

        ex.execute(code, language=language)
        c.execute(code, language=language)
        for i in range(runs):
            order = ("lib", "api") if i % 2 == 0 else ("api", "lib")
            for kind in order:
                both_full()
                t = time.perf_counter()
                r = ex.execute(code, language=language) if kind == "lib" else c.execute(code, language=language)
                (lib if kind == "lib" else api).append((time.perf_counter() - t) * 1000)
                assert r.exit_code == 0, r
    return lib, api


def start_server(concurrency: int, queue: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = os.environ | {
        "EXECBOX_MAX_CONCURRENT": str(concurrency),
        "EXECBOX_MAX_QUEUE": str(queue),
        "EXECBOX_LOG_LEVEL": "warning",
    }
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "execbox.cli", "serve", "--no-auth", "--port", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", trust_env=False).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not start; see {log}")


def sequential(url: str, language: str, runs: int) -> tuple[list[float], list[float]]:
    code = PROGRAMS[language]
    latency, overhead = [], []
    with Client(url, trust_env=False) as c:
        c.execute(code, language=language)
        for _ in range(runs):
            t = time.perf_counter()
            r = c.execute(code, language=language)
            ms = (time.perf_counter() - t) * 1000
            latency.append(ms)
            overhead.append(ms - r.duration_ms)
    return latency, overhead


def throughput(url: str, language: str, clients: int, total: int, duration: float) -> dict[str, float]:
    code = PROGRAMS[language]
    lock = threading.Lock()
    counts = {"ok": 0, "busy": 0, "error": 0, "issued": 0}
    latencies: list[float] = []
    deadline = time.monotonic() + duration

    def worker() -> None:
        with Client(url, trust_env=False) as c:
            while time.monotonic() < deadline:
                with lock:
                    if counts["issued"] >= total:
                        return
                    counts["issued"] += 1
                t = time.perf_counter()
                try:
                    r = c.execute(code, language=language)
                    kind = "ok" if r.exit_code == 0 else "error"
                except ServerBusyError:
                    kind = "busy"
                except Exception:
                    kind = "error"
                with lock:
                    counts[kind] += 1
                    if kind == "ok":
                        latencies.append((time.perf_counter() - t) * 1000)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "ok": counts["ok"],
        "busy": counts["busy"],
        "error": counts["error"],
        "seconds": elapsed,
        "per_second": counts["ok"] / elapsed,
        "p50": pct(latencies, 50) if latencies else float("nan"),
        "p95": pct(latencies, 95) if latencies else float("nan"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=40, help="sequential runs for the latency figures")
    p.add_argument("--throughput-runs", type=int, default=80, help="executions per concurrency level")
    p.add_argument("--duration", type=float, default=60.0, help="time cap (s) per concurrency level")
    p.add_argument("--language", choices=sorted(PROGRAMS), default="python")
    p.add_argument("--server-concurrency", type=int, default=4, help="EXECBOX_MAX_CONCURRENT of the server")
    p.add_argument("--side-by-side-only", action="store_true", help="only the paced library/API comparison")
    args = p.parse_args()

    print(f"program: {PROGRAMS[args.language]!r} ({args.language}); {os.cpu_count()} CPUs")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "execbox-bench-serve.log"
    proc, url = start_server(args.server_concurrency, 256, log)
    try:
        a, b = side_by_side(url, args.language, args.runs)
        print("side by side, paced (both warm pools full before each call):")
        print(line("  library Executor.execute", a))
        print(line("  API Client.execute", b))
        print(
            f"  API over library: p50 {pct(b, 50) - pct(a, 50):+.2f} ms, p95 {pct(b, 95) - pct(a, 95):+.2f} ms"
            f"  (ratio of p50s {pct(b, 50) / pct(a, 50):.2f}x)\n"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    if args.side_by_side_only:
        return 0

    lib = library(args.language, args.runs)
    print(line("library Executor.execute", lib))
    proc, url = start_server(args.server_concurrency, 256, log)
    try:
        latency, overhead = sequential(url, args.language, args.runs)
        print(line("API Client.execute (1 client)", latency))
        print(line("API overhead (client - executor)", overhead))
        # Unpaired and noisy: it mostly shows how often each phase found a warm pooled sandbox.
        print(f"{'medians API - library (unpaired)':<34} {pct(latency, 50) - pct(lib, 50):8.1f} ms")
        print(f"\nthroughput (server max_concurrent={args.server_concurrency}):")
        for clients in (4, 16):
            r = throughput(url, args.language, clients, args.throughput_runs, args.duration)
            print(
                f"  {clients:>2} clients: {r['per_second']:6.1f} executions/s  "
                f"({r['ok']:.0f} ok, {r['busy']:.0f} busy 503, {r['error']:.0f} errors in {r['seconds']:.1f} s; "
                f"latency p50 {r['p50']:.0f} ms, p95 {r['p95']:.0f} ms)"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
        print(f"\nserver stopped (exit {code}); mean library latency {statistics.fmean(lib):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
