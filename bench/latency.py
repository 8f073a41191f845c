"""Latency and throughput of fresh-container runs: the floor, execbox with and without
the warm pool, and plain docker-py create/start/wait/remove (``docker run
--runtime=...``), per isolation, in one process.

    .venv/bin/python bench/latency.py [--runs 100] [--seconds 20] [--clients 4]
                                      [--isolations container,gvisor]

Prints p50/p95 per isolation, mode and language, the ratios the pool and gVisor issues
ask for, then sustained throughput with N concurrent clients (runc). Not part of the
test suite.
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


# What a plain `docker run --runtime=R` of each isolation uses (default network: the bridge).
PLAIN_RUNTIME = {"container": None, "gvisor": "execbox-gvisor-hostnet"}


def plain_docker_run(api: docker.APIClient, image: str, cmd: list[str], runtime: str | None = None) -> None:
    labels = {"execbox.managed": "1", "execbox.kind": "bench"}
    host_config = api.create_host_config(runtime=runtime)
    cid = api.create_container(image, cmd, labels=labels, host_config=host_config)["Id"]
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


def pooled_runs(warm: Executor, code: str, lang: str, isolation: str, runs: int, floor: float) -> float:
    """Low load: each request comes once the pool has its sandboxes ready again."""
    assert warm.pool is not None
    profile = Profile.of(get_runtime(lang), warm.image, warm.config.default_limits, isolation=isolation)  # type: ignore[arg-type]
    lat: list[float] = []
    before = warm.pool_stats()
    for _ in range(runs):
        deadline = time.monotonic() + 20
        while warm.pool.ready_count(profile) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        t = time.perf_counter()
        r = warm.execute(code, language=lang)
        lat.append((time.perf_counter() - t) * 1000)
        assert r.stdout == "1\n" and r.isolation == isolation, r
    after = warm.pool_stats()
    assert before is not None and after is not None
    p50 = report("execbox, pool on (low load)", lat, floor)
    print(f"  pool hits {after.hits - before.hits}, misses {after.misses - before.misses}")
    return p50


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--isolations", default="container,gvisor", help="comma-separated: container, gvisor")
    args = ap.parse_args()
    api = docker.from_env().api
    image = default_image()

    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="execbox-bench-") as tmp:
        export_rootfs(api, image, Path(tmp))
        floors = {}
        for lang, (_, cmd) in HELLO.items():
            floors[lang] = timed(lambda cmd=cmd: subprocess.run(["chroot", tmp, *cmd], capture_output=True), args.runs)

    isolations = args.isolations.split(",")
    p50s: dict[tuple[str, str, str], float] = {}
    warm: Executor | None = None
    for isolation in isolations:
        cold = Executor(pool=False, isolation=isolation)
        warm = Executor(pool=True, pool_min_ready=2, isolation=isolation)
        runtime = PLAIN_RUNTIME[isolation]
        for lang, (code, cmd) in HELLO.items():
            print(f"{isolation}: {lang} hello world ({args.runs} runs each)")
            floor = report("bare process in the rootfs (chroot)", floors[lang])
            p50s[isolation, lang, "floor"] = floor
            p50s[isolation, lang, "plain"] = report(
                f"plain docker run --runtime={runtime or 'runc'}",
                timed(lambda cmd=cmd, rt=runtime: plain_docker_run(api, image, cmd, rt), args.runs),
                floor,
            )
            p50s[isolation, lang, "off"] = report(
                "execbox, pool off",
                timed(lambda code=code, lang=lang, ex=cold: ex.execute(code, language=lang), args.runs),
                floor,
            )
            p50s[isolation, lang, "on"] = pooled_runs(warm, code, lang, isolation, args.runs, floor)
        cold.close()
        if isolation != isolations[-1] or args.seconds <= 0:
            warm.close()
            warm = None
    print("ratios (pooled p50 / ...):")
    for isolation in isolations:
        for lang, floor_target in {"python": 0.5, "javascript": 0.2}.items():
            on = p50s[isolation, lang, "on"]
            print(
                f"  {isolation:<9} {lang:<10} / floor {on / p50s[isolation, lang, 'floor']:.3f}"
                f" (target <= {floor_target})   / plain docker run {on / p50s[isolation, lang, 'plain']:.3f}"
                f" (target <= {0.1 if isolation == 'gvisor' else 0.05})"
                f"   pool-off / plain {p50s[isolation, lang, 'off'] / p50s[isolation, lang, 'plain']:.2f}"
            )
    if "gvisor" in isolations and "container" in isolations:
        for mode in ("plain", "off", "on"):
            ratios = [p50s["gvisor", lang, mode] / p50s["container", lang, mode] for lang in HELLO]
            print(f"  gvisor / container, {mode:<5}: " + "  ".join(f"{r:.2f}x" for r in ratios))
    if warm is None:
        return
    print(f"sustained: {args.clients} clients, {args.seconds:.0f} s each, python hello world, {isolations[-1]}")
    profile = Profile.of(get_runtime("python"), warm.image, warm.config.default_limits, isolation=warm.config.isolation)
    warm.pool.keep_ready(profile, 4)  # type: ignore[union-attr]
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
    runtime = PLAIN_RUNTIME[isolations[-1]]
    prate, plat = sustained(lambda: plain_docker_run(api, image, cmd, runtime), args.clients, args.seconds)
    print(
        f"  plain docker-py      {prate:6.1f} runs/s   p50 {statistics.median(plat):7.1f} ms"
        f"   p95 {pct(plat, 95):7.1f} ms"
    )
    print(f"  ratio execbox / plain: {rate / prate:.2f}x")


if __name__ == "__main__":
    main()
