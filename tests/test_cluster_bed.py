"""A cluster on three Docker Engines, each in a network namespace of its own (scripts/cluster-bed.sh):
one API replica and three nodes over a real Redis. Run last, alone (scripts/test.sh does), marked
``cluster``: the bed starts three more dockerd and is torn down afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from .serverkit import ServeProcess
from .support import eventually
from .test_nodes import NodeProcess

pytestmark = [pytest.mark.docker, pytest.mark.cluster, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
BED = ROOT / "scripts" / "cluster-bed.sh"


@pytest.fixture(scope="module")
def bed() -> Iterator[list[str]]:
    up = subprocess.run([str(BED), "up", "3"], capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        yield up.stdout.split()
    finally:
        down = subprocess.run([str(BED), "down"], capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not [
            n
            for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if n.startswith("execbox-bed")
        ]


@pytest.fixture
def cluster(bed: list[str], tmp_path: Path, redis_url: str) -> Iterator[Any]:
    url = redis_url.rsplit("/", 1)[0] + "/5"
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    api = ServeProcess(tmp_path, "api", None, EXECBOX_QUEUE_URL=url)
    nodes = [NodeProcess(tmp_path, f"n{i + 1}", url, engine_url=sock) for i, sock in enumerate(bed)]
    try:
        eventually(lambda: _live(api) == {"n1", "n2", "n3"}, 120, what="three live nodes")
        yield api, nodes
    finally:
        api.stop()
        for n in nodes:
            n.stop()
        r.flushdb()
        r.close()


def _live(api: ServeProcess) -> set[str]:
    try:
        return {n["name"] for n in httpx.get(f"{api.url}/v1/nodes", trust_env=False).json()["nodes"]}
    except (httpx.TransportError, ValueError, KeyError):
        return set()


def _running(api: ServeProcess) -> int:
    return sum(n["running"] for n in httpx.get(f"{api.url}/v1/nodes", trust_env=False).json()["nodes"])


def _burst(api: ServeProcess, n: int, clients: int, code: str, timeout: float = 30) -> list[httpx.Response]:
    out: list[httpx.Response] = []
    lock = threading.Lock()
    todo = list(range(n))

    def worker() -> None:
        with httpx.Client(trust_env=False, timeout=timeout + 30) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    todo.pop()
                r = c.post(f"{api.url}/v1/execute", json={"language": "python", "code": code, "timeout": timeout})
                with lock:
                    out.append(r)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
    return out


def test_load_spreads_over_three_engines(cluster: Any) -> None:
    api, _ = cluster
    answers = _burst(api, 36, 6, "import time; time.sleep(0.2); print('ok')")
    assert len(answers) == 36 and all(r.status_code == 200 for r in answers), [r.text for r in answers][:3]
    share = Counter(r.json()["node"] for r in answers)
    # Pulled by free slots: every node takes a fair part (here each has 2 slots of the 6 busy at once).
    assert set(share) == {"n1", "n2", "n3"} and min(share.values()) >= 6, share


def test_an_engine_killed_mid_burst(cluster: Any, bed: list[str]) -> None:
    api, nodes = cluster
    results: list[httpx.Response] = []
    t = threading.Thread(target=lambda: results.extend(_burst(api, 24, 6, "import time; time.sleep(1); print('ok')")))
    t.start()
    eventually(lambda: _running(api) >= 3, 60, what="the burst to be under way")
    pid = int(Path(bed[1].removeprefix("unix://")).with_name("docker.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # n2's engine (its node lives on, and must stop taking work)
    t.join(180)
    assert len(results) == 24, "a request hung"
    statuses = Counter(r.status_code for r in results)
    assert statuses[200] >= 12, statuses  # n1 and n3 kept serving
    assert set(statuses) <= {200, 502, 503}, [r.text for r in results if r.status_code not in (200, 502, 503)]
    # n2 stops taking work: what follows runs on the others.
    eventually(
        lambda: any(not n["healthy"] for n in httpx.get(f"{api.url}/v1/nodes", trust_env=False).json()["nodes"]), 30
    )
    after = _burst(api, 12, 4, "print('after')")
    assert all(r.status_code == 200 for r in after) and {r.json()["node"] for r in after} <= {"n1", "n3"}
