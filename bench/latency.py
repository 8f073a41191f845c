"""Latency and throughput of fresh-container runs: the floor, execbox with and without
the warm pool, and plain docker-py create/start/wait/remove, in one process.

    .venv/bin/python bench/latency.py [--runs 100] [--seconds 20] [--clients 4]

Prints p50/p95 per mode and language, the ratios the pool issue asks for, then
sustained throughput with N concurrent clients. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker

from execbox import Executor
from execbox.images import default_image
from execbox.pool import Profile
from execbox.runtimes import get_runtime

HELLO = {
    "python": ("print(1)", ["python3", "-c", "print(1)"]),
    "javascript": ("console.log(1)", ["node", "-e", "console.log(1)"]),
}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def export_rootfs(api: docker.APIClient, image: str, dest: Path) -> None:
    cid = api.create_container(image, ["true"], labels={"execbox.managed": "1", "execbox.kind": "bench"})["Id"]
    try:
        stream = api.export(cid)
        proc = subprocess.Popen(["tar", "-C", str(dest), "-xf", "-"], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        for chunk in stream:
            proc.stdin.write(chunk)
        proc.stdin.close()
        proc.wait()
    finally:
        api.remove_container(cid, force=True)


def plain_docker_run(api: docker.APIClient, image: str, cmd: list[str]) -> None:
    cid = api.create_container(image, cmd, labels={"execbox.managed": "1", "execbox.kind": "bench"})["Id"]
    try:
        api.start(cid)
        api.wait(cid)
        api.logs(cid)
    finally:
        api.remove_container(cid, force=True)


def report(name: str, xs: list[float], floor: float | None = None) -> float:
    p50 = statistics.median(xs)
    extra = f"  ({p50 / floor:.2f}x floor)" if floor else ""
    print(f"  {name:<34} p50 {p50:8.1f} ms   p95 {pct(xs, 95):8.1f} ms   n={len(xs)}{extra}")
    return p50


def sustained(fn: Callable[[], object], clients: int, seconds: float) -> tuple[float, list[float]]:
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < stop:
            t = time.perf_counter()
            fn()
            with lock:
                lat.append((time.perf_counter() - t) * 1000)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(lat) / (time.monotonic() - t0), lat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    api = docker.from_env().api
    image = default_image()

    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="execbox-bench-") as tmp:
        export_rootfs(api, image, Path(tmp))
        floors = {}
        for lang, (_, cmd) in HELLO.items():
            floors[lang] = timed(lambda cmd=cmd: subprocess.run(["chroot", tmp, *cmd], capture_output=True), args.runs)

    cold = Executor(pool=False)
    warm = Executor(pool=True, pool_min_ready=2)
    p50s: dict[tuple[str, str], float] = {}
    for lang, (code, cmd) in HELLO.items():
        print(f"{lang} hello world ({args.runs} runs each)")
        floor = report("bare process in the rootfs (chroot)", floors[lang])
        p50s[lang, "floor"] = floor
        p50s[lang, "plain"] = report(
            "plain docker-py create/start/wait/rm",
            timed(lambda cmd=cmd: plain_docker_run(api, image, cmd), args.runs),
            floor,
        )
        p50s[lang, "off"] = report(
            "execbox, pool off", timed(lambda code=code, lang=lang: cold.execute(code, language=lang), args.runs), floor
        )

        profile = Profile.of(get_runtime(lang), warm.image, warm.config.default_limits)

        pooled_lat: list[float] = []

        def pooled(
            code: str = code, lang: str = lang, profile: Profile = profile, pooled_lat: list[float] = pooled_lat
        ) -> None:
            # Low load: the next request comes once the pool has its sandboxes ready again.
            deadline = time.monotonic() + 10
            while warm.pool.ready_count(profile) < 2 and time.monotonic() < deadline:  # type: ignore[union-attr]
                time.sleep(0.01)
            t = time.perf_counter()
            r = warm.execute(code, language=lang)
            pooled_lat.append((time.perf_counter() - t) * 1000)
            assert r.stdout == "1\n", r

        before = warm.pool_stats()
        for _ in range(args.runs):
            pooled()
        after = warm.pool_stats()
        assert before is not None and after is not None
        p50s[lang, "on"] = report("execbox, pool on (low load)", pooled_lat, floor)
        print(f"  pool hits {after.hits - before.hits}, misses {after.misses - before.misses}")
    print("ratios (pooled p50 / ...):")
    for lang, (floor_target, _) in {"python": (0.5, 0), "javascript": (0.2, 0)}.items():
        on = p50s[lang, "on"]
        print(
            f"  {lang:<10} / floor {on / p50s[lang, 'floor']:.3f} (target <= {floor_target})"
            f"   / plain docker-py {on / p50s[lang, 'plain']:.3f} (target <= 0.05)"
            f"   pool-off / plain {p50s[lang, 'off'] / p50s[lang, 'plain']:.2f}"
        )
    cold.close()
    if args.seconds <= 0:
        warm.close()
        return

    print(f"sustained: {args.clients} clients, {args.seconds:.0f} s each, python hello world")
    warm.pool.keep_ready(Profile.of(get_runtime("python"), warm.image, warm.config.default_limits), 4)  # type: ignore[union-attr]
    before = warm.pool_stats()
    rate, lat = sustained(lambda: warm.execute("print(1)", language="python"), args.clients, args.seconds)
    after = warm.pool_stats()
    assert before is not None and after is not None
    hits, misses = after.hits - before.hits, after.misses - before.misses
    print(
        f"  execbox pool on      {rate:6.1f} runs/s   p50 {statistics.median(lat):7.1f} ms   p95 {pct(lat, 95):7.1f} ms"
        f"   pool empty {misses / max(hits + misses, 1):.0%}"
    )
    warm.close()
    cmd = HELLO["python"][1]
    prate, plat = sustained(lambda: plain_docker_run(api, image, cmd), args.clients, args.seconds)
    print(
        f"  plain docker-py      {prate:6.1f} runs/s   p50 {statistics.median(plat):7.1f} ms"
        f"   p95 {pct(plat, 95):7.1f} ms"
    )
    print(f"  ratio execbox / plain: {rate / prate:.2f}x")


if __name__ == "__main__":
    main()
