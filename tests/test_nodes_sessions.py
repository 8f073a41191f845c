"""Sessions and volumes on nodes: `execbox serve --queue-url` holds no session; `execbox node` workers do.

Real processes over a real Redis and this machine's Docker Engine: one API replica (with
tenants) and two nodes with data dirs of their own. Sessions created through the API land
on a node and every later call goes to that node (``node`` on every answer); files move
through it; another tenant cannot reach them, not even by writing to the node's stream;
a user's volume runs stick to one node; a node killed with SIGKILL makes its sessions 410
``node_lost`` naming it (a call in flight: 503), its volume's runs 503 ``node_lost``, and
the other node's sessions keep working.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from execbox import Client, NodeLostError, NotFoundError
from execbox.engine.base import Engine
from execbox.labels import MANAGED_FILTER, OWNER
from execbox.sessions import SESSION_LABEL
from execbox.state.keys import node_stream, reply_key, stream_key, volume_node_key
from execbox.volumes import VolumeManager

from .serverkit import KEY_A, KEY_B, ServeProcess, write_tenants
from .support import eventually
from .test_nodes import NodeProcess

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]

DB = 9


class Cluster:
    def __init__(self, api: ServeProcess, nodes: dict[str, NodeProcess], r: redis.Redis, data: Path, url: str) -> None:
        self.api, self.nodes, self.redis, self.data, self.url = api, nodes, r, data, url
        self.created: set[str] = set()
        self.pids = {n.proc.pid for n in nodes.values()}  # every node process started

    def restart(self, name: str) -> None:
        """The node again, under the same name and data dir (the old process is dead: reaped here)."""
        self.nodes[name].proc.wait(30)
        self.nodes[name] = NodeProcess(self.data, name, self.url)
        self.pids.add(self.nodes[name].proc.pid)

    def client(self, key: str = KEY_A) -> httpx.Client:
        return self.api.client(key)

    def live(self) -> set[str]:
        try:
            with self.client() as c:
                return {n["name"] for n in c.get("/v1/nodes").json()["nodes"]}
        except (httpx.TransportError, ValueError, KeyError):
            return set()

    def create(self, client: httpx.Client, user: str, **fields: Any) -> dict[str, Any]:
        r = client.post("/v1/sessions", json={"user_id": user, "language": "python", **fields})
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        self.created.add(body["id"])
        return body


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_url: str, engine: Engine) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("nodes-sessions")
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    # A per-user cap of 2 on the API, 3 (the default) on the nodes: a third session is refused by the API's count.
    env = {"EXECBOX_QUEUE_URL": url, "EXECBOX_SESSIONS": "true", "EXECBOX_SESSION_MAX_PER_USER": "2"}
    # The API needs no engine of its own with nodes: give it none that answers.
    env["EXECBOX_ENGINE_URL"] = f"unix://{tmp}/no-engine.sock"
    api = ServeProcess(tmp, "api", write_tenants(tmp), **env)
    nodes = {name: NodeProcess(tmp, name, url) for name in ("node-a", "node-b")}
    c = Cluster(api, nodes, r, tmp, url)
    try:
        eventually(lambda: c.live() == set(nodes), 90, 0.2, what="both nodes to be live")
        api.ready()
        yield c
    finally:
        api.stop()
        pids = c.pids
        for n in c.nodes.values():
            n.stop()
        # Sessions outlive their node's process by design (a restarted node adopts them): remove ours, and
        # the sandboxes and volumes a killed node left.
        for res in engine.list_resources(MANAGED_FILTER):
            owner = res.labels.get(OWNER, "")
            mine = res.labels.get(SESSION_LABEL) in c.created
            killed = owner.count(":") == 2 and int(owner.split(":")[1]) in pids
            if res.kind == "container" and (mine or killed):
                engine.remove(res.id)
        for name in nodes:
            volumes = Path(tmp / f"{name}-data" / "volumes")
            if volumes.exists():
                manager = VolumeManager(engine, volumes)
                for user in ("vol-user",):
                    manager.delete("alpha", user)
        r.flushdb()
        r.close()


SLOW = "import time\nprint('early', flush=True)\ntime.sleep(2)\nprint('late')"


def sse(client: httpx.Client, path: str, body: dict[str, Any]) -> list[tuple[float, str, Any]]:
    """(arrival time, event, data) of a streamed POST."""
    out = []
    with client.stream("POST", path, json=body, headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((time.monotonic(), event, json.loads(line[6:])))
    return out


def test_sessions_live_on_nodes_and_every_call_goes_to_their_node(cluster: Cluster) -> None:
    c = cluster
    with c.client() as a:
        seen: dict[str, str] = {}
        for i in range(8):  # pull-based: whichever node reads first takes a creation; both soon hold one
            s = c.create(a, f"user-{i % 4}")
            assert s["node"] in c.nodes and s["status"] == "ready", s
            seen[s["id"]] = s["node"]
            if len(set(seen.values())) == 2 and i >= 3:
                break
        assert set(seen.values()) == set(c.nodes), seen
        for sid, node in seen.items():
            first = a.post(f"/v1/sessions/{sid}/execute", json={"code": f"x = {len(sid)}\nimport math"})
            assert first.status_code == 200 and first.json()["node"] == node, first.text
        for sid, node in seen.items():
            for n in range(2):
                r = a.post(f"/v1/sessions/{sid}/execute", json={"code": f"x += 1\nprint(x, math.floor({n}.5))"})
                body = r.json()
                assert r.status_code == 200 and body["node"] == node, r.text
                assert body["stdout"] == f"{len(sid) + n + 1} {n}\n" and body["call"] == n + 2
            got = a.get(f"/v1/sessions/{sid}").json()
            assert got["node"] == node and got["calls"] == 3, got

        # Files in and out, through the node.
        sid, node = next(iter(seen.items()))
        r = a.post(
            f"/v1/sessions/{sid}/execute",
            json={
                "code": "open('out.txt', 'w').write(open('in.txt').read().upper())",
                "files": {"in.txt": base64.b64encode(b"through a node").decode()},
                "collect": ["*.txt"],
            },
        )
        body = r.json()
        assert r.status_code == 200 and body["node"] == node, r.text
        assert base64.b64decode(body["files"]["out.txt"]) == b"THROUGH A NODE"
        assert base64.b64decode(body["files"]["in.txt"]) == b"through a node"
        # Streamed from the node as it comes: the first line well before the end (the code pauses 2 s).
        events = list(sse(a, f"/v1/sessions/{sid}/execute", {"code": SLOW}))
        assert [e for _, e, _ in events][-1] == "result", events
        result = events[-1][2]
        assert result["node"] == node and result["stdout"] == "early\nlate\n"
        assert "".join(d["data"] for _, e, d in events if e == "stdout") == "early\nlate\n"
        first = next(t for t, e, _ in events if e == "stdout")
        assert events[-1][0] - first > 1.5, events

        # Listing comes from the store: every node's sessions of this tenant, each naming its node.
        listed = {s["id"]: s["node"] for s in a.get("/v1/sessions").json()["sessions"]}
        assert listed == seen
        held = {n: list(seen.values()).count(n) for n in c.nodes}
        eventually(
            lambda: {n["name"]: n["sessions"] for n in a.get("/v1/nodes").json()["nodes"]} == held,
            30,
            0.2,
            what="each node to say how many sessions it holds",
        )

        # The cap per user holds across nodes: counted by the API from the store (each node alone would take
        # one more: their own cap is 3).
        capped = [c.create(a, "capped") for _ in range(2)]
        over = a.post("/v1/sessions", json={"user_id": "capped", "language": "bash"})
        assert over.status_code == 429 and over.headers.get("retry-after"), over.text
        assert over.json()["error"]["type"] == "quota_exceeded" and "at most 2" in over.json()["error"]["message"]
        for s in capped:
            assert a.delete(f"/v1/sessions/{s['id']}").status_code == 204

        # Deleting goes to the node, and the session is gone everywhere.
        gone = a.delete(f"/v1/sessions/{sid}")
        assert gone.status_code == 204, gone.text
        assert a.get(f"/v1/sessions/{sid}").status_code == 404
        assert sid not in {s["id"] for s in a.get("/v1/sessions").json()["sessions"]}
        del seen[sid]

    # Another tenant: its list is empty and alpha's ids are unknown to it, through the API...
    with c.client(KEY_B) as b:
        assert b.get("/v1/sessions").json()["sessions"] == []
        for sid in seen:
            for r in (
                b.get(f"/v1/sessions/{sid}"),
                b.post(f"/v1/sessions/{sid}/execute", json={"code": "print(x)"}),
                b.delete(f"/v1/sessions/{sid}"),
            ):
                assert r.status_code == 404 and r.json()["error"]["field"] == "session_id", r.text
    # ... and through the node itself: an operation as bravo on alpha's session, written onto its node's stream.
    sid, node = next(iter(seen.items()))
    call_id = uuid.uuid4().hex
    c.redis.xadd(
        stream_key(node_stream(node)),
        {
            "id": call_id,
            "op": "execute",
            "tenant": "bravo",
            "session_id": sid,
            "body": json.dumps({"code": "x"}),
            "deadline": str(time.time() + 30),
        },
    )
    got = c.redis.blpop([reply_key(call_id)], timeout=30)
    assert got is not None
    answer = json.loads(got[1])
    assert answer["node"] == node and answer["error"]["type"] == "SessionNotFoundError", answer
    with c.client() as a:  # alpha's session is untouched
        r = a.post(f"/v1/sessions/{sid}/execute", json={"code": "print(type(x).__name__)"})
        assert r.status_code == 200 and r.json()["stdout"] == "int\n", r.text


def test_volume_runs_stick_to_one_node(cluster: Cluster) -> None:
    c = cluster
    run = {"language": "bash", "user_id": "vol-user", "volume": True}
    with c.client() as a:
        r = a.post("/v1/execute", json={**run, "code": "echo kept > /data/f; cat /data/f"})
        assert r.status_code == 200 and r.json()["stdout"] == "kept\n", r.text
        holder = r.json()["node"]
        assert c.redis.get(volume_node_key("alpha", "vol-user")) == holder
        for i in range(6):
            r = a.post("/v1/execute", json={**run, "code": f"echo {i} >> /data/f; wc -l < /data/f"})
            assert r.status_code == 200 and r.json()["node"] == holder, r.text
            assert r.json()["stdout"] == f"{i + 2}\n"
        # Backup and restore go to the holder too: export, delete (the affinity goes with the volume), import
        # (taken by whichever node pulls it, which holds the volume from then on), and the data is back.
        exported = a.get("/v1/users/vol-user/volume/export")
        assert exported.status_code == 200, exported.text
        assert any(n.endswith("f") for n in tarfile.open(fileobj=io.BytesIO(exported.content)).getnames())
        assert a.delete("/v1/users/vol-user/volume").status_code == 204
        assert c.redis.get(volume_node_key("alpha", "vol-user")) is None
        gone = a.post("/v1/execute", json={**run, "code": "cat /data/f 2>&1 || true"})
        assert gone.status_code == 200 and "No such file" in gone.json()["stdout"], gone.text
        assert a.delete("/v1/users/vol-user/volume").status_code == 204
        restored = a.put("/v1/users/vol-user/volume/import", content=exported.content)
        assert restored.status_code == 200 and restored.json()["entries"] >= 1, restored.text
        holder = c.redis.get(volume_node_key("alpha", "vol-user"))
        assert holder in c.nodes
        for _ in range(3):
            r = a.post("/v1/execute", json={**run, "code": "wc -l < /data/f"})
            assert r.status_code == 200 and r.json()["node"] == holder and r.json()["stdout"] == "7\n", r.text
        with c.client(KEY_B) as b:  # another tenant's same user id: its own (empty) volume
            theirs = b.get("/v1/users/vol-user/volume/export")
            assert theirs.status_code == 200 and tarfile.open(fileobj=io.BytesIO(theirs.content)).getnames() == []

        # Runs without a volume still go to both nodes.
        others = {a.post("/v1/execute", json={"language": "bash", "code": "true"}).json()["node"] for _ in range(10)}
        assert others == set(c.nodes), others


def test_pause_and_resume_go_to_the_node(cluster: Cluster) -> None:
    c = cluster
    with c.client() as a:
        # Refused by the node's library, mapped by the API as in-process: 409 naming the field.
        runc = c.create(a, "pauser")
        refused = a.post(f"/v1/sessions/{runc['id']}/pause")
        assert refused.status_code == 409 and refused.json()["error"]["field"] == "isolation", refused.text
        assert a.delete(f"/v1/sessions/{runc['id']}").status_code == 204
        s = c.create(a, "pauser", isolation="gvisor", pause_after=300)
        assert s["pause_after"] == 300, s  # carried to the node that holds it
        try:
            assert a.post(f"/v1/sessions/{s['id']}/execute", json={"code": "x = 41"}).status_code == 200
            paused = a.post(f"/v1/sessions/{s['id']}/pause")
            assert paused.status_code == 200 and paused.json()["paused"] and paused.json()["node"] == s["node"]
            assert a.get(f"/v1/sessions/{s['id']}").json()["paused"]
            r = a.post(f"/v1/sessions/{s['id']}/execute", json={"code": "print(x + 1)"})
            if r.status_code == 404 and "could not be resumed from its checkpoint" in r.text:
                # The engine's limit described under "Pausing a session to disk": the node said so, as in-process.
                pytest.xfail("runsc 20221219 under load: the restored sandbox exited at once")
            body = r.json()
            assert r.status_code == 200 and body["resumed"] and body["stdout"] == "42\n", r.text
            assert body["node"] == s["node"]
        finally:
            a.delete(f"/v1/sessions/{s['id']}")


def test_a_killed_node_loses_its_sessions_and_volume_and_the_other_serves(cluster: Cluster) -> None:
    c = cluster
    holder = c.redis.get(volume_node_key("alpha", "vol-user"))
    assert holder in c.nodes, "needs the volume test first"
    other = next(n for n in c.nodes if n != holder)
    with c.client() as a:
        by_node: dict[str, list[str]] = {name: [] for name in c.nodes}
        for s in a.get("/v1/sessions").json()["sessions"]:
            by_node[s["node"]].append(s["id"])
        for i in range(12):  # two on the node to kill, one on the other
            if len(by_node[holder]) >= 2 and by_node[other]:
                break
            s = c.create(a, f"kill-{i}")
            by_node[s["node"]].append(s["id"])
        assert len(by_node[holder]) >= 2 and by_node[other], by_node
        (doomed, back), survivor = by_node[holder][:2], by_node[other][0]
        for sid in (survivor, back):
            assert a.post(f"/v1/sessions/{sid}/execute", json={"code": "y = 7"}).status_code == 200

        # A call in flight on the doomed node's session.
        started = time.monotonic()
        result: dict[str, Any] = {}

        def call() -> None:
            with c.client() as own:
                result["r"] = own.post(
                    f"/v1/sessions/{doomed}/execute", json={"code": "import time; time.sleep(40)", "timeout": 20}
                )

        t = threading.Thread(target=call)
        t.start()
        own_stream = stream_key(node_stream(holder))
        eventually(lambda: c.redis.xpending(own_stream, "node")["pending"] >= 1, 30, what="the node to take the call")
        os.kill(c.nodes[holder].proc.pid, signal.SIGKILL)
        t.join(60)
        r = result["r"]
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["type"] == "node_lost" and holder in err["message"], err
        assert time.monotonic() - started < 20 + 15

        # Later: 410 naming the node, for every operation on that session.
        for r in (
            a.post(f"/v1/sessions/{doomed}/execute", json={"code": "print(1)"}),
            a.get(f"/v1/sessions/{doomed}"),
            a.delete(f"/v1/sessions/{doomed}"),
        ):
            assert r.status_code == 410, r.text
            err = r.json()["error"]
            assert err["type"] == "node_lost" and holder in err["message"] and err["field"] == "session_id", err
        # Its volume's runs: 503 node_lost naming it, never a fresh volume on the other node.
        r = a.post("/v1/execute", json={"language": "bash", "user_id": "vol-user", "volume": True, "code": "ls /data"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "node_lost", r.text
        assert holder in r.json()["error"]["message"]

        # The other node's session keeps its variables; new sessions and runs go there.
        r = a.post(f"/v1/sessions/{survivor}/execute", json={"code": "print(y * 6)"})
        assert r.status_code == 200 and r.json()["node"] == other and r.json()["stdout"] == "42\n", r.text
        listed = {s["id"] for s in a.get("/v1/sessions").json()["sessions"]}
        assert survivor in listed and doomed not in listed
        assert c.create(a, "after-kill")["node"] == other

    # The client maps it: NodeLostError naming the node (410); NotFoundError for an unknown id.
    with Client(c.api.url, api_key=KEY_A, trust_env=False) as client:
        with pytest.raises(NodeLostError) as lost:
            client.session_execute(doomed, "print(1)")
        assert lost.value.status_code == 410 and lost.value.node == holder
        with pytest.raises(NotFoundError):
            client.get_session("ses_" + "0" * 24)

    # The node back under its name and data dir: its other session answers where it was, its volume too.
    c.restart(holder)
    eventually(lambda: holder in c.live(), 90, 0.2, what="the node to be back")
    with c.client() as a:
        r = a.post(f"/v1/sessions/{back}/execute", json={"code": "print(y + 35)"})
        assert r.status_code == 200 and r.json()["node"] == holder and r.json()["stdout"] == "42\n", r.text
        r = a.post(
            "/v1/execute", json={"language": "bash", "user_id": "vol-user", "volume": True, "code": "wc -l < /data/f"}
        )
        assert r.status_code == 200 and r.json()["node"] == holder and r.json()["stdout"] == "7\n", r.text
        assert back in {s["id"] for s in a.get("/v1/sessions").json()["sessions"]}
