"""The users endpoints (state and volume) through a real server, real store, real volumes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from execbox.engine.base import Engine
from execbox.state import open_store

from .serverkit import KEY_A, KEY_B, live_server, settings, write_tenants

pytestmark = pytest.mark.docker

COUNTER = (
    "import json, os\ns = json.loads(os.environ.get('EXECBOX_STATE') or '{\"n\": 0}')\n"
    "s['n'] += 1\nprint('OUTPUT_STATE:' + json.dumps(s))"
)


def test_state_endpoints(engine: Engine, tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with live_server(engine, settings(write_tenants(tmp_path)), state_store=store) as srv:
            with srv.client(KEY_A) as a, srv.client(KEY_B) as b:
                assert a.get("/v1/users/u1/state").status_code == 404
                r = a.put("/v1/users/u1/state", json={"value": {"n": 41}})
                assert r.status_code == 200 and r.json()["version"] == 1
                body = {"language": "python", "code": COUNTER, "user_id": "u1", "persist_state": True}
                assert a.post("/v1/execute", json=body).json()["state"] == {"n": 42}
                got = a.get("/v1/users/u1/state").json()
                assert got["value"] == {"n": 42} and got["version"] == 2
                assert b.get("/v1/users/u1/state").status_code == 404  # another tenant's user
                assert a.delete("/v1/users/u1/state").status_code == 204
                assert a.get("/v1/users/u1/state").status_code == 404
                r = a.get("/v1/users/..%2Fx/state")
                assert r.status_code in (404, 422)
                r = a.put("/v1/users/bad:id/state", json={"value": 1})
                assert r.status_code == 422 and r.json()["error"]["field"] == "user_id"
    finally:
        store.close()


def test_volume_endpoints(engine: Engine, tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    with live_server(engine, settings(write_tenants(tmp_path)), data_dir=data_dir, pool=False) as srv:
        with srv.client(KEY_A) as a, srv.client(KEY_B) as b:
            run = {"language": "bash", "user_id": "u1", "volume": True}
            assert a.post("/v1/execute", json={**run, "code": "echo kept > /data/f.txt"}).json()["exit_code"] == 0
            exported = a.get("/v1/users/u1/volume/export")
            assert exported.status_code == 200 and exported.headers["content-type"] == "application/x-tar"
            assert tarfile.open(fileobj=io.BytesIO(exported.content)).getnames() == ["f.txt"]
            # Tenant B's u1 is another user: empty, and restoring into it does not touch A's.
            assert b.post("/v1/execute", json={**run, "code": "ls -A /data"}).json()["stdout"] == ""
            r = b.put("/v1/users/u1/volume/import", content=exported.content)
            assert r.status_code == 200 and r.json() == {"entries": 1}
            assert b.post("/v1/execute", json={**run, "code": "cat /data/f.txt"}).json()["stdout"] == "kept\n"
            r = b.put("/v1/users/u1/volume/import", content=b"not a tar")
            assert r.status_code == 422
            assert a.delete("/v1/users/u1/volume").status_code == 204
            assert a.post("/v1/execute", json={**run, "code": "ls -A /data"}).json()["stdout"] == ""
            for client in (a, b):
                assert client.delete("/v1/users/u1/volume").status_code == 204


def test_pool_metrics_are_exported(engine: Engine, tmp_path: Path) -> None:
    with live_server(engine, settings(write_tenants(tmp_path)), pool_min_ready=1) as srv, srv.client(KEY_A) as a:
        assert a.post("/v1/execute", json={"code": "print(1)", "language": "python"}).json()["stdout"] == "1\n"
        text = a.get("/metrics").text
        hits = float(text.split("\nexecbox_pool_hits ")[1].split()[0])
        misses = float(text.split("\nexecbox_pool_misses ")[1].split()[0])
        assert hits + misses == 1 and "execbox_pool_ready " in text
