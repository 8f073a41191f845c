"""Nodes: `execbox serve --queue-url` dispatches runs to `execbox node` workers over a real Redis.

Real processes: one API replica and two nodes, each node with its own data directory
and name, here on this machine's one Docker Engine (the multi-engine test bed is not
built yet). A node killed with SIGKILL mid-run: the caller gets 503 node_lost naming it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from execbox.engine.base import Engine
from execbox.labels import MANAGED_FILTER, OWNER

from .serverkit import ServeProcess
from .support import eventually

pytestmark = pytest.mark.docker


class NodeProcess:
    def __init__(
        self,
        directory: Path,
        name: str,
        queue_url: str,
        engine_url: str | None = None,
        netns: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``netns``: run in that network namespace (as on a host of its own, beside its engine)."""
        self.name = name
        self.log = directory / f"node-{name}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("EXECBOX_")}
        environ |= {"EXECBOX_POOL_MIN_READY": "1", "EXECBOX_NODE_TTL": "3", "EXECBOX_LOG_LEVEL": "info"}
        environ |= env or {}
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [
                    *(["nsenter", f"--net=/run/netns/{netns}"] if netns else []),
                    sys.executable,
                    "-m",
                    "execbox.cli",
                    "node",
                    "--queue-url",
                    queue_url,
                    "--name",
                    name,
                    "--data-dir",
                    str(directory / f"{name}-data"),
                    "--slots",
                    "2",
                    *(["--engine-url", engine_url] if engine_url else []),
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=environ,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cluster(tmp_path: Path, redis_url: str, engine: Engine) -> Iterator[Any]:
    url = redis_url.rsplit("/", 1)[0] + "/8"
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    nodes: dict[str, NodeProcess] = {}
    api = ServeProcess(tmp_path, "api", None, EXECBOX_QUEUE_URL=url)

    class Cluster:
        redis = r

        def node(self, name: str) -> NodeProcess:
            nodes[name] = NodeProcess(tmp_path, name, url)
            return nodes[name]

        def live(self) -> set[str]:
            try:
                with httpx.Client(trust_env=False) as c:
                    return {n["name"] for n in c.get(f"{api.url}/v1/nodes").json()["nodes"]}
            except httpx.TransportError:
                return set()  # the API is not up yet

    try:
        yield api, Cluster()
    finally:
        api.stop()
        pids = {n.proc.pid for n in nodes.values()} | {api.pid}  # a replica killed by a test leaves its pool
        for n in nodes.values():
            n.stop()
        # A killed node leaves its sandboxes behind (the reaper of any later process takes them): remove them.
        for res in engine.list_resources(MANAGED_FILTER):
            owner = res.labels.get(OWNER, "")
            if res.kind == "container" and owner.count(":") == 2 and int(owner.split(":")[1]) in pids:
                engine.remove(res.id)
        r.flushdb()
        r.close()


def _ready(api: ServeProcess) -> int:
    try:
        return httpx.get(f"{api.url}/readyz", trust_env=False).status_code
    except httpx.TransportError:
        return 0  # not up yet


def test_runs_go_to_live_nodes_and_say_which(cluster: Any) -> None:
    api, c = cluster
    eventually(lambda: _ready(api) == 503, what="the API to answer (not ready: no node)")
    a, b = c.node("node-a"), c.node("node-b")
    eventually(lambda: c.live() == {"node-a", "node-b"}, 90, what="both nodes to be live")
    assert _ready(api) == 200
    with httpx.Client(trust_env=False, timeout=60) as client:
        nodes = client.get(f"{api.url}/v1/nodes").json()["nodes"]
        assert {n["name"] for n in nodes} == {"node-a", "node-b"} and all(n["slots"] == 2 for n in nodes)
        seen = []
        for i in range(12):
            r = client.post(f"{api.url}/v1/execute", json={"language": "python", "code": f"print({i})"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["stdout"] == f"{i}\n"
            seen.append(body["node"])
        # Pull-based: whichever node reads first takes it; both took some.
        assert set(seen) == {"node-a", "node-b"}, seen
        # Refused by the node's library (not by the API): still a 422 naming the field.
        bad = client.post(f"{api.url}/v1/execute", json={"language": "python", "code": "1", "volume": True})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "user_id", bad.text
    a.stop()
    b.stop()
    eventually(lambda: _ready(api) == 503, 30, what="not ready once no node is live")


def test_a_run_whose_node_dies_is_node_lost_and_the_next_goes_elsewhere(cluster: Any) -> None:
    api, c = cluster
    a = c.node("node-a")
    eventually(lambda: c.live() == {"node-a"}, 90, what="node-a to be live")
    with httpx.Client(trust_env=False, timeout=120) as client:
        started = time.monotonic()
        result: dict[str, Any] = {}

        def call() -> None:
            result["r"] = client.post(
                f"{api.url}/v1/execute",
                json={"language": "python", "code": "import time; time.sleep(60)", "timeout": 90},
            )

        t = threading.Thread(target=call)
        t.start()
        # The node holds the run (its sandbox runs): then it dies with it.
        rds = c.redis
        eventually(lambda: any(rds.get(k) == "node-a" for k in rds.scan_iter("execbox:run:*")), 60)
        b = c.node("node-b")
        os.kill(a.proc.pid, signal.SIGKILL)
        t.join(120)
        r = result["r"]
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["type"] == "node_lost" and "node-a" in err["message"]
        assert time.monotonic() - started < 90 + 15  # within the run's timeout + the grace (a bound, not a timing)
        eventually(lambda: "node-b" in c.live(), 90)
        ok = client.post(f"{api.url}/v1/execute", json={"language": "python", "code": "print(1)"})
        assert ok.status_code == 200 and ok.json()["node"] == "node-b", ok.text
        b.stop()


def test_an_api_replica_killed_while_another_serves(cluster: Any, tmp_path: Path, redis_url: str) -> None:
    api, c = cluster
    c.node("node-a")
    eventually(lambda: c.live() == {"node-a"}, 90, what="node-a to be live")
    url = redis_url.rsplit("/", 1)[0] + "/8"
    other = ServeProcess(tmp_path, "api-b", None, EXECBOX_QUEUE_URL=url)
    try:
        eventually(lambda: _ready(other) == 200, 90, what="the second replica to be ready")
        os.kill(api.pid, signal.SIGKILL)  # no replica holds anything another needs
        with httpx.Client(trust_env=False, timeout=60) as client:
            for i in range(3):
                r = client.post(f"{other.url}/v1/execute", json={"language": "python", "code": f"print({i})"})
                assert r.status_code == 200 and r.json()["node"] == "node-a", r.text
    finally:
        other.stop()
