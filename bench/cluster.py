"""What dispatching runs to nodes costs: one API replica in-process vs the same API with runs on
`execbox node` workers over Redis, side by side; and how runs spread over the nodes.

    .venv/bin/python bench/cluster.py [--runs 40] [--nodes 2] [--sessions 5] [--throughput 120]
                                      [--redis redis://127.0.0.1:6399/7]

Real processes on this machine: `execbox serve` (in-process runs), `execbox serve --queue-url`
and N `execbox node` on the same Docker Engine, one Redis. Each call is paced: the warm pools
are full before it starts. Prints p50/p95 of both and the dispatch overhead; with ``--sessions N``
also N sessions on each side (create, 10 calls each, delete: sessions live on the nodes). On 2 cores more
nodes cannot add throughput (they share the CPU): what a node costs per run here, and the
Redis operations per run, give the model in the README. Loopback only; bounded in count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import redis

CODE = {"language": "python", "code": "print(1)"}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXECBOX_")}
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "execbox.cli", *args], env=base | env, stdout=fh, stderr=fh)


def wait_ready(url: str, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not become ready")


def pool_ready(client: httpx.Client, url: str) -> float:
    for row in client.get(f"{url}/metrics").text.splitlines():
        if row.startswith("execbox_pool_ready "):
            return float(row.split()[1])
    return 0.0


def sessions(c: httpx.Client, url: str, n: int, name: str) -> None:
    """Create n python sessions one after another, 10 paced calls in each, delete them; p50s."""
    created, calls, deleted, where = [], [], [], Counter[str]()
    ids: list[str] = []
    try:
        for i in range(n):
            t = time.perf_counter()
            resp = c.post(f"{url}/v1/sessions", json={"user_id": f"bench{i}", "language": "python"})
            created.append((time.perf_counter() - t) * 1000)
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["id"])
            where[resp.json().get("node") or "-"] += 1
            for j in range(10):
                time.sleep(0.02)
                t = time.perf_counter()
                resp = c.post(f"{url}/v1/sessions/{ids[-1]}/execute", json={"code": f"print({j})"})
                calls.append((time.perf_counter() - t) * 1000)
                assert resp.status_code == 200, resp.text
    finally:
        for sid in ids:
            t = time.perf_counter()
            c.delete(f"{url}/v1/sessions/{sid}")
            deleted.append((time.perf_counter() - t) * 1000)
    print(
        f"  sessions, {name:11}: create p50 {pct(created, 50):6.1f} ms, call p50 {pct(calls, 50):5.1f} ms"
        f" (p95 {pct(calls, 95):5.1f}), delete p50 {pct(deleted, 50):5.1f} ms; by node {dict(where)}"
    )


def throughput(url: str, clients: int, total: int, seconds: float) -> tuple[float, int, int]:
    """``total`` executions from ``clients`` threads (or ``seconds``, whichever first): (runs/s, ok, other)."""
    lock = threading.Lock()
    counts = {"issued": 0, "ok": 0, "other": 0}
    deadline = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(trust_env=False, timeout=60) as c:
            while time.monotonic() < deadline:
                with lock:
                    if counts["issued"] >= total:
                        return
                    counts["issued"] += 1
                try:
                    ok = c.post(f"{url}/v1/execute", json=CODE).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    counts["ok" if ok else "other"] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts["ok"] / (time.perf_counter() - started), counts["ok"], counts["other"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--sessions", type=int, default=0, help="also time N sessions (create, 10 calls, delete)")
    p.add_argument("--redis", default="redis://127.0.0.1:6399/7")
    p.add_argument(
        "--throughput", type=int, default=0, help="also N executions from 8 clients, at every node count down to 1"
    )
    args = p.parse_args()
    runs, n_nodes = min(args.runs, 500), min(args.nodes, 4)
    r = redis.Redis.from_url(args.redis)
    r.flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="execbox-bench-cluster-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        single_url, cluster_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        procs.append(
            spawn(
                ["serve", "--no-auth", "--port", single_url.rsplit(":", 1)[1]],
                {"EXECBOX_DATA_DIR": str(tmp / "single"), "EXECBOX_LOG_LEVEL": "warning"},
                tmp / "single.log",
            )
        )
        procs.append(
            spawn(
                ["serve", "--no-auth", "--port", cluster_url.rsplit(":", 1)[1], "--queue-url", args.redis],
                {"EXECBOX_DATA_DIR": str(tmp / "api"), "EXECBOX_LOG_LEVEL": "warning", "EXECBOX_POOL_MIN_READY": "0"},
                tmp / "api.log",
            )
        )
        for i in range(n_nodes):
            procs.append(
                spawn(
                    ["node", "--queue-url", args.redis, "--name", f"n{i}", "--data-dir", str(tmp / f"n{i}")],
                    {"EXECBOX_LOG_LEVEL": "warning"},
                    tmp / f"n{i}.log",
                )
            )
        wait_ready(single_url)
        wait_ready(cluster_url)
        single, cluster, nodes = [], [], Counter[str]()
        inner: dict[str, list[float]] = {single_url: [], cluster_url: []}  # the executor's own duration_ms
        last: dict[str, object] = {"node": None, "end": 0.0}  # the node of the last call, when it ended
        with httpx.Client(trust_env=False, timeout=60) as c:
            want_single = 4.0  # 2 languages x pool_min_ready 2

            def paced(url: str) -> float:
                deadline = time.monotonic() + 30
                # Both services' pools full (and so no sandbox being created on any core) before each call;
                # the status of the node that ran the last call counts once published after that call
                # ended (nodes publish their status as it changes).
                while time.monotonic() < deadline:
                    infos = [json.loads(v) for v in r.mget(r.keys("execbox:node:*")) if v]
                    full = len(infos) == n_nodes and all(
                        sum(i["ready"].values()) >= 4 and (i["name"] != last["node"] or i["last_seen"] > last["end"])
                        for i in infos
                    )
                    if full and pool_ready(c, single_url) >= want_single:
                        break
                    time.sleep(0.01)
                time.sleep(0.05)
                t = time.perf_counter()
                resp = c.post(f"{url}/v1/execute", json=CODE)
                ms = (time.perf_counter() - t) * 1000
                assert resp.status_code == 200, resp.text
                if url == cluster_url:
                    last.update(node=resp.json()["node"], end=time.time())
                nodes[resp.json()["node"]] += url == cluster_url
                inner[url].append(float(resp.json()["duration_ms"]))
                return ms

            paced(single_url)
            paced(cluster_url)
            for i in range(runs):
                for url in (single_url, cluster_url) if i % 2 == 0 else (cluster_url, single_url):
                    (single if url == single_url else cluster).append(paced(url))
        print(f"python print(1), paced, {runs} each; {n_nodes} nodes on this machine's engine; {os.cpu_count()} CPUs")
        print(f"  single host (runs in the API)  p50 {pct(single, 50):7.2f} ms   p95 {pct(single, 95):7.2f} ms")
        print(f"  API -> node over Redis         p50 {pct(cluster, 50):7.2f} ms   p95 {pct(cluster, 95):7.2f} ms")
        print(
            f"  dispatch overhead: p50 {pct(cluster, 50) - pct(single, 50):+.2f} ms, "
            f"p95 {pct(cluster, 95) - pct(single, 95):+.2f} ms"
        )
        print(f"  spread over nodes: {dict(sorted((k, v) for k, v in nodes.items() if v))}")
        si, ci = inner[single_url][1:], inner[cluster_url][1:]  # the first call of each was a warm-up
        print(f"  the run itself (duration_ms)   p50 {pct(si, 50):7.2f} ms in the API, {pct(ci, 50):7.2f} ms on a node")
        around_s = [a - b for a, b in zip(single, si, strict=True)]
        around_c = [a - b for a, b in zip(cluster, ci, strict=True)]
        print(
            f"  around the run (HTTP, API, dispatch) p50 {pct(around_s, 50):7.2f} ms single, "
            f"{pct(around_c, 50):7.2f} ms via a node ({pct(around_c, 50) - pct(around_s, 50):+.2f} ms)"
        )
        if args.sessions:
            with httpx.Client(trust_env=False, timeout=60) as c:
                for name, url in (("single host", single_url), ("on nodes", cluster_url)):
                    sessions(c, url, min(args.sessions, 10), name)
        if args.throughput:
            total = min(args.throughput, 1000)
            print(f"throughput, {total} executions from 8 clients (at most 60 s each):")
            rate, ok, other = throughput(single_url, 8, total, 60)
            label = "single host (runs in the API):"
            print(f"  {label:<31}{rate:6.1f} executions/s ({ok} ok, {other} refused or failed)")
            node_procs = procs[2:]
            for live in range(n_nodes, 0, -1):
                rate, ok, other = throughput(cluster_url, 8, total, 60)
                label = f"{live} node(s):"
                print(f"  {label:<31}{rate:6.1f} executions/s ({ok} ok, {other} refused or failed)")
                if live > 1:  # one node fewer: stopped, and gone from the live set
                    gone = node_procs[live - 1]
                    gone.send_signal(signal.SIGTERM)
                    gone.wait(60)
                    while len(r.keys("execbox:node:*")) > live - 1:
                        time.sleep(0.1)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        r.flushdb()
        shutil.rmtree(tmp, ignore_errors=True)  # logs and data dirs of the processes it started
    return 0


if __name__ == "__main__":
    sys.exit(main())
