"""A cluster on three Docker Engines, each in a network namespace of its own (scripts/cluster-bed.sh):
one API replica and three nodes over a real Redis. Each node runs in its engine's namespace, as on a
host of its own (its egress proxy and firewall there too); Redis, the API and the tests' upstream
server are in the root namespace, which the engines reach at 198.18.0.254 over the bed's link.
Run last, alone (scripts/test.sh does), marked ``cluster``: the bed starts three more dockerd and is
torn down afterwards."""

from __future__ import annotations

import json
import os
import secrets
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

from .egress_support import Upstream, start_upstream
from .serverkit import ServeProcess, free_port, hash_key, write_tenants
from .support import eventually
from .test_nodes import NodeProcess

pytestmark = [pytest.mark.docker, pytest.mark.cluster, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
BED = ROOT / "scripts" / "cluster-bed.sh"


HUB_ADDRESS = "198.18.0.254"  # the root namespace, as the engines' namespaces reach it
BED_HOST = "bed.example.test"  # the upstream of the egress test, mapped by every node's proxy
KEY = "test-key-bed-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TENANTS = f"""
[tenants.bed]
api_keys = ["{hash_key(KEY)}"]
max_concurrent = 16
executions_per_minute = 10000
network = true

[tenants.bed.egress]
mode = "proxy"
allow = ["{BED_HOST}"]
"""


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


@pytest.fixture(scope="module")
def bed_redis(bed: list[str]) -> Iterator[str]:
    """A Redis of the bed's own on its link, reachable from every engine's namespace."""
    port, password = free_port(), secrets.token_hex(16)  # not on loopback: Redis wants a password there
    args = ["--bind", HUB_ADDRESS, "--port", str(port), "--requirepass", password, "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL)
    url = f"redis://:{password}@{HUB_ADDRESS}:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        eventually(lambda: _pings(client), 20, what="the bed's redis-server to answer")
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def bed_upstream(bed: list[str]) -> Iterator[Upstream]:
    upstream = start_upstream(HUB_ADDRESS)
    try:
        yield upstream
    finally:
        upstream.close()


@pytest.fixture
def cluster(bed: list[str], tmp_path: Path, bed_redis: str, bed_upstream: Upstream) -> Iterator[Any]:
    url = bed_redis
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    env = {"EXECBOX_QUEUE_URL": url, "EXECBOX_SESSIONS": "true", "EXECBOX_SESSION_MAX_PER_USER": "8"}
    env["EXECBOX_ENGINE_URL"] = f"unix://{tmp_path}/no-engine.sock"  # the API needs none: the nodes hold them
    api = ServeProcess(tmp_path, "api", write_tenants(tmp_path, TENANTS), **env)
    host_map = json.dumps({BED_HOST: f"{HUB_ADDRESS}:{bed_upstream.port}"})
    nodes = [
        NodeProcess(
            tmp_path,
            f"n{i + 1}",
            url,
            engine_url=sock,
            netns=f"execbox-bed-n{i + 1}",
            env={"EXECBOX_PROXY_HOST_MAP": host_map},
        )
        for i, sock in enumerate(bed)
    ]
    try:
        eventually(lambda: _live(api) == {"n1", "n2", "n3"}, 120, what="three live nodes")
        yield api, nodes
    finally:
        api.stop()
        for n in nodes:
            n.stop()
        r.flushdb()
        r.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def _live(api: ServeProcess) -> set[str]:
    try:
        return {n["name"] for n in _nodes(api)}
    except (httpx.TransportError, ValueError, KeyError):
        return set()


def _nodes(api: ServeProcess) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = httpx.get(f"{api.url}/v1/nodes", headers=AUTH, trust_env=False).json()["nodes"]
    return nodes


def _running(api: ServeProcess) -> int:
    return sum(n["running"] for n in _nodes(api))


def _burst(
    api: ServeProcess, n: int, clients: int, code: str, timeout: float = 30, **fields: Any
) -> list[httpx.Response]:
    out: list[httpx.Response] = []
    lock = threading.Lock()
    todo = list(range(n))

    def worker() -> None:
        with httpx.Client(headers=AUTH, trust_env=False, timeout=timeout + 30) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    todo.pop()
                body = {"language": "python", "code": code, "timeout": timeout, **fields}
                r = c.post(f"{api.url}/v1/execute", json=body)
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


EGRESS = f"""
import _socket, json, urllib.request
got = urllib.request.urlopen("http://{BED_HOST}/hello", timeout=10)
try:  # straight to the upstream's address, past the proxy and its preload: the node's firewall refuses it
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(("{HUB_ADDRESS}", PORT))
    direct = "connected"
except OSError as exc:
    direct = type(exc).__name__
print(json.dumps([got.status, got.read().decode(), direct]))
"""


def test_egress_through_every_node(cluster: Any, bed_upstream: Upstream) -> None:
    """Each node's own proxy and firewall, in its own namespace: allowed hosts answer through
    the proxy (logged), the upstream's address cannot be reached directly."""
    api, _ = cluster
    code = EGRESS.replace("PORT", str(bed_upstream.port))
    network = {"mode": "proxy", "allow": [BED_HOST]}
    answers = _burst(api, 15, 5, code, network=network)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:2]
    bodies = [r.json() for r in answers]
    for body in bodies:
        assert body["exit_code"] == 0, body["stderr"][-2000:]
        status, _, direct = json.loads(body["stdout"])
        assert status == 200 and direct != "connected", body["stdout"]
        assert [e["decision"] for e in body["network_log"]] == ["allowed"], body["network_log"]
    assert {b["node"] for b in bodies} == {"n1", "n2", "n3"}, Counter(b["node"] for b in bodies)
    assert len(bed_upstream.hits) >= 15


def test_sessions_live_on_the_nodes_and_every_call_goes_to_its_node(cluster: Any) -> None:
    """Sessions made through the API land on the three engines (each node in its namespace);
    every call of a session is answered by the node that holds it, its variables intact."""
    api, _ = cluster
    with httpx.Client(base_url=api.url, headers=AUTH, trust_env=False, timeout=120) as c:
        made = []
        for i in range(6):
            r = c.post("/v1/sessions", json={"user_id": f"u{i % 2}", "language": "python"})
            assert r.status_code == 201, r.text
            made.append(r.json())
        try:
            for i, s in enumerate(made):
                assert c.post(f"/v1/sessions/{s['id']}/execute", json={"code": f"x = {i}"}).json()["node"] == s["node"]
            for i, s in enumerate(made):
                r = c.post(f"/v1/sessions/{s['id']}/execute", json={"code": "print(x * 10)"})
                assert r.status_code == 200 and r.json()["stdout"] == f"{i * 10}\n", r.text
                assert r.json()["node"] == s["node"]
            listed = {s["id"]: s["node"] for s in c.get("/v1/sessions").json()["sessions"]}
            assert listed == {s["id"]: s["node"] for s in made}
            assert len({s["node"] for s in made}) >= 2, made  # pulled by free slots: spread, not all on one
        finally:
            for s in made:
                assert c.delete(f"/v1/sessions/{s['id']}").status_code == 204


def test_a_session_with_egress_on_a_node(cluster: Any, bed_upstream: Upstream) -> None:
    """A session's egress goes through its node's proxy, in that node's namespace, call after call."""
    api, _ = cluster
    fetch = f"import urllib.request\nprint(urllib.request.urlopen('http://{BED_HOST}/s', timeout=10).status)"
    with httpx.Client(base_url=api.url, headers=AUTH, trust_env=False, timeout=120) as c:
        body = {"user_id": "egress", "language": "python", "network": {"mode": "proxy", "allow": [BED_HOST]}}
        r = c.post("/v1/sessions", json=body)
        assert r.status_code == 201, r.text
        s = r.json()
        try:
            before = len(bed_upstream.hits)
            for _ in range(2):
                r = c.post(f"/v1/sessions/{s['id']}/execute", json={"code": fetch})
                out = r.json()
                assert r.status_code == 200 and out["stdout"] == "200\n", r.text
                assert out["node"] == s["node"] and [e["decision"] for e in out["network_log"]] == ["allowed"]
            assert len(bed_upstream.hits) == before + 2
        finally:
            assert c.delete(f"/v1/sessions/{s['id']}").status_code == 204


def test_an_engine_killed_mid_burst(cluster: Any, bed: list[str]) -> None:
    """Last in this module: the engine it kills stays dead."""
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
    eventually(lambda: any(not n["healthy"] for n in _nodes(api)), 30)
    after = _burst(api, 12, 4, "print('after')")
    assert all(r.status_code == 200 for r in after) and {r.json()["node"] for r in after} <= {"n1", "n3"}
