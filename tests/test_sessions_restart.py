"""Real processes killed with SIGKILL: the service (``execbox serve``) with live sessions and a
creation in flight, and a creator stopped between making a container and registering it.
After the next start every session container is registered and works, every record has
its container, and nothing of the killed process is left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from execbox.engine.base import Engine
from execbox.labels import OWNER
from execbox.sessions import RECORD_KIND, Sessions
from execbox.state.sqlite import SQLiteStateStore

from .support import eventually
from .test_sessions import container_gone, end_all, registry_containers

pytestmark = pytest.mark.docker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def service(tmp_path: Path, name: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``execbox serve`` in a process of its own, on loopback, with the test's session registry."""
    port = _free_port()
    env = {
        **os.environ,
        "EXECBOX_SESSION_STORE_URL": f"sqlite:///{tmp_path}/registry.db",
        "EXECBOX_DATA_DIR": str(tmp_path / "data"),
        "EXECBOX_SESSION_REAP_INTERVAL": "0.2",
        "EXECBOX_LOG_LEVEL": "warning",
        "EXECBOX_SHUTDOWN_GRACE": "1",
    }
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "execbox.cli", "serve", "--no-auth", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/healthz", timeout=1, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        eventually(ready, timeout=60, interval=0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _owner_prefix(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}:"


def _containers_of(engine: Engine, pid: int) -> list[str]:
    return [
        r.id
        for r in engine.list_resources("execbox.managed=1")
        if r.kind == "container" and r.labels.get(OWNER, "").startswith(_owner_prefix(pid))
    ]


def _consistent(engine: Engine, store: SQLiteStateStore, registry_id: str) -> bool:
    """Every registry container has a ready record and every record a container: nothing unowned."""
    records = store.list_records(RECORD_KIND)
    if any(r["status"] != "ready" for r in records.values()):
        return False
    recorded = {r["container_id"] for r in records.values()}
    return set(registry_containers(engine, registry_id)) == recorded


def test_kill_9_of_the_service_then_start_adopts_and_leaves_nothing_unowned(engine: Engine, tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "registry.db")
    try:
        with service(tmp_path, "first") as (first, url):
            http = httpx.Client(base_url=url, timeout=60, trust_env=False)
            py = http.post("/v1/sessions", json={"user_id": "u1", "language": "python"}).json()
            js = http.post("/v1/sessions", json={"user_id": "u2", "language": "javascript"}).json()
            assert http.post(f"/v1/sessions/{py['id']}/execute", json={"code": "x = 41"}).status_code == 200
            assert http.post(f"/v1/sessions/{js['id']}/execute", json={"code": "var y = 'js'"}).status_code == 200
            # One more creation in flight when the service dies (wherever it is by then).
            in_flight = threading.Thread(
                target=lambda: _ignore_errors(http.post, "/v1/sessions", json={"user_id": "u3"}), daemon=True
            )
            in_flight.start()
            time.sleep(0.15)
            first.send_signal(signal.SIGKILL)
            first.wait()
            in_flight.join(30)
            http.close()
            killed_pid = first.pid
        with service(tmp_path, "second") as (_, url):
            with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
                r = http.post(f"/v1/sessions/{py['id']}/execute", json={"code": "print(x + 1)"}).json()
                assert (r["stdout"], r["repl_reset"]) == ("42\n", False)
                r = http.post(f"/v1/sessions/{js['id']}/execute", json={"code": "console.log(y)"}).json()
                assert r["stdout"] == "js\n"
                registry_id = Sessions(engine, store, start_reaper=False).registry_id
                # The killed process's pool containers (the new executor's sweep) and a half-made session
                # (the session reaper: its creator is dead) go; the sessions made before stay.
                eventually(lambda: not _containers_of(engine, killed_pid), timeout=60)
                eventually(lambda: _consistent(engine, store, registry_id), timeout=60)
                ids = {s["id"] for s in http.get("/v1/sessions").json()["sessions"]}
                assert {py["id"], js["id"]} <= ids
    finally:
        left = end_all(engine, store)
        store.close()
        assert not left


def _ignore_errors(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except httpx.HTTPError:
        pass


STALLING_CREATOR = """
import sys, time
from execbox.engine.docker import DockerEngine
from execbox.sessions import Sessions
from execbox.state.sqlite import SQLiteStateStore

class Stalling(SQLiteStateStore):
    # Stops the creator after the container exists and before the session is registered as ready.
    def put_record(self, kind, key, value, ttl, mode="any"):
        if kind == "session" and mode == "update" and value.get("status") == "ready":
            print("CONTAINER", value["container_id"], flush=True)
            time.sleep(3600)
        return super().put_record(kind, key, value, ttl, mode)

Sessions(DockerEngine.from_env(), Stalling(sys.argv[1]), start_reaper=False).create("victim", "python")
"""


def test_a_creator_killed_between_container_and_registration_leaves_nothing(engine: Engine, tmp_path: Path) -> None:
    script = tmp_path / "creator.py"
    script.write_text(STALLING_CREATOR)
    db = tmp_path / "registry.db"
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE)
    store = SQLiteStateStore(db)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("CONTAINER "), line
        cid = line.split()[1]
        assert engine.state(cid).running
        (record,) = store.list_records(RECORD_KIND).values()
        assert record["status"] == "creating"
        proc.send_signal(signal.SIGKILL)
        proc.wait()  # reaped: its PID is gone, so its owner id is dead
        restarted = Sessions(engine, store, start_reaper=False)  # the next start reconciles
        try:
            assert container_gone(engine, cid)
            assert store.list_records(RECORD_KIND) == {}
            assert registry_containers(engine, restarted.registry_id) == []
        finally:
            restarted.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        left = end_all(engine, store)
        store.close()
        assert not left
