"""Service behaviour under particular settings: quotas (429), the bounded queue (503), result expiry,
SSRF defaults, readiness. Each test runs its own real uvicorn server over the real Docker Engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from execbox.engine.base import Engine
from execbox.server.auth import hash_key

from .serverkit import KEY_A, KEY_B, LiveServer, Receiver, live_server, metric, settings, write_tenants

pytestmark = pytest.mark.docker

KEY_SOLO = "test-key-solo-0123456789"
KEY_RATE = "test-key-rate-0123456789"
KEY_FREE = "test-key-free-0123456789"

QUOTA_TENANTS = f"""
[tenants.solo]
api_keys = ["{hash_key(KEY_SOLO)}"]
max_concurrent = 1
executions_per_minute = 1000

[tenants.rate]
api_keys = ["{hash_key(KEY_RATE)}"]
max_concurrent = 4
executions_per_minute = 2

[tenants.free]
api_keys = ["{hash_key(KEY_FREE)}"]
max_concurrent = 8
executions_per_minute = 1000
"""

LONG = {"language": "python", "code": "import time; time.sleep(4); print('done')", "timeout": 15}


def error_of(r: httpx.Response) -> dict[str, str]:
    return r.json()["error"]  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def gauge(srv: LiveServer, name: str) -> float:
    with srv.client(None) as c:
        return metric(c.get("/metrics").text, name)


class Background:
    """One request sent from a thread; ``response`` once it returns."""

    def __init__(self, srv: LiveServer, key: str, body: dict[str, object]) -> None:
        self.response: httpx.Response | None = None

        def go() -> None:
            with srv.client(key) as c:
                self.response = c.post("/v1/execute", json=body)

        self.thread = threading.Thread(target=go)
        self.thread.start()

    def result(self) -> httpx.Response:
        self.thread.join(120)
        assert self.response is not None
        return self.response


def test_rate_limit_gives_429_with_retry_after(engine: Engine, tmp_path: Path) -> None:
    with live_server(engine, settings(write_tenants(tmp_path, QUOTA_TENANTS))) as srv, srv.client(KEY_RATE) as c:
        for _ in range(2):
            assert c.post("/v1/execute", json={"language": "bash", "code": "true"}).status_code == 200
        for r in (
            c.post("/v1/execute", json={"language": "bash", "code": "true"}),
            c.post("/execute", json={"code": "1"}),
            c.post("/v1/executions", json={"code": "1"}),
        ):
            assert r.status_code == 429, r.text
            retry = int(r.headers["retry-after"])
            assert 1 <= retry <= 60 and error_of(r)["retry_after"] == retry
            assert error_of(r)["type"] == "quota_exceeded"
        # Other tenants are not affected.
        with srv.client(KEY_FREE) as other:
            assert other.post("/v1/execute", json={"language": "bash", "code": "true"}).status_code == 200
        assert metric(c.get("/metrics").text, 'execbox_rejections_total{reason="rate_limited"}') == 3


def test_tenant_concurrency_gives_429_while_its_execution_runs(engine: Engine, tmp_path: Path) -> None:
    with live_server(engine, settings(write_tenants(tmp_path, QUOTA_TENANTS))) as srv:
        first = Background(srv, KEY_SOLO, LONG)
        wait_for(lambda: gauge(srv, "execbox_executions_in_flight") == 1, "the first execution to start")
        with srv.client(KEY_SOLO) as c:
            r = c.post("/v1/execute", json={"language": "bash", "code": "true"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert first.result().status_code == 200 and first.result().json()["stdout"] == "done\n"
            assert c.post("/v1/execute", json={"language": "bash", "code": "true"}).status_code == 200
        assert gauge(srv, 'execbox_rejections_total{reason="tenant_concurrency"}') == 1


def test_full_queue_gives_503_with_retry_after_and_queued_requests_complete(engine: Engine, tmp_path: Path) -> None:
    s = settings(write_tenants(tmp_path, QUOTA_TENANTS), max_concurrent=1, max_queue=1, retry_after=3)
    with live_server(engine, s) as srv:
        running = Background(srv, KEY_FREE, LONG)
        wait_for(lambda: gauge(srv, "execbox_executions_in_flight") == 1, "the first execution to start")
        queued = Background(srv, KEY_FREE, {"language": "bash", "code": "echo queued"})
        wait_for(lambda: gauge(srv, "execbox_queue_waiting") == 1, "the second request to queue")
        with srv.client(KEY_FREE) as c:
            r = c.post("/v1/execute", json={"language": "bash", "code": "true"})
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert error_of(r)["type"] == "server_busy"
        assert running.result().status_code == 200
        assert queued.result().status_code == 200 and queued.result().json()["stdout"] == "queued\n"
        assert gauge(srv, 'execbox_rejections_total{reason="queue_full"}') == 1
        assert gauge(srv, "execbox_queue_waiting") == 0


def test_waiting_too_long_in_the_queue_gives_503(engine: Engine, tmp_path: Path) -> None:
    s = settings(write_tenants(tmp_path, QUOTA_TENANTS), max_concurrent=1, queue_timeout=0.3)
    with live_server(engine, s) as srv:
        running = Background(srv, KEY_FREE, LONG)
        wait_for(lambda: gauge(srv, "execbox_executions_in_flight") == 1, "the first execution to start")
        with srv.client(KEY_FREE) as c:
            r = c.post("/v1/execute", json={"language": "bash", "code": "true"})
            assert r.status_code == 503 and "retry-after" in r.headers
        assert running.result().status_code == 200
        assert gauge(srv, 'execbox_rejections_total{reason="queue_timeout"}') == 1


def test_results_expire_and_private_callbacks_are_refused_by_default(engine: Engine, tmp_path: Path) -> None:
    s = settings(write_tenants(tmp_path), job_ttl=0.5, allow_private_callbacks=False)
    with live_server(engine, s) as srv, srv.client(KEY_A) as c:
        r = c.post("/v1/executions", json={"code": "1", "callback_url": "http://127.0.0.1:9/hook"})
        assert r.status_code == 422 and error_of(r)["field"] == "callback_url"
        job_id = c.post("/v1/executions", json={"language": "bash", "code": "true"}).json()["id"]
        assert c.get(f"/v1/executions/{job_id}", params={"wait": 30}).json()["status"] == "completed"
        wait_for(lambda: c.get(f"/v1/executions/{job_id}").status_code == 404, "expiry")


def test_readyz_fails_when_the_image_is_missing(engine: Engine, tmp_path: Path) -> None:
    with live_server(engine, settings(write_tenants(tmp_path)), image="execbox-no-such-image:0") as srv:
        with srv.client() as c:
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["image"].startswith("missing")
            r = c.post("/v1/execute", json={"code": "1"})
            assert r.status_code == 503 and error_of(r)["type"] == "image_not_found" and "retry-after" in r.headers


def test_shutdown_finishes_running_jobs_and_fails_queued_ones(engine: Engine, tmp_path: Path) -> None:
    s = settings(write_tenants(tmp_path), max_concurrent=1)
    with Receiver() as hook:
        with live_server(engine, s) as srv, srv.client(KEY_A) as c:
            running = c.post("/v1/executions", json={**LONG, "callback_url": hook.url}).json()["id"]
            wait_for(lambda: c.get(f"/v1/executions/{running}").json()["status"] == "running", "the job to start")
            queued = c.post("/v1/executions", json={"code": "1", "callback_url": hook.url}).json()["id"]
            assert c.get(f"/v1/executions/{queued}").json()["status"] == "queued"
            srv.server.should_exit = True  # what uvicorn's SIGTERM handler does
            srv.thread.join(60)
        by_id = {json.loads(body)["id"]: json.loads(body) for _, body in hook.received}
    assert by_id[running]["status"] == "completed" and by_id[running]["result"]["stdout"] == "done\n"
    assert by_id[queued]["status"] == "failed" and by_id[queued]["error"]["type"] == "shutting_down"


STATEFUL = (
    "import os, json\n"
    "s = json.loads(os.environ.get('EXECBOX_STATE') or 'null')\n"
    "print(json.dumps(s))\n"
    "print('OUTPUT_STATE:' + json.dumps({'n': (s or {}).get('n', 0) + 1}))\n"
)


def test_stored_state_is_namespaced_by_tenant(engine: Engine, tmp_path: Path) -> None:
    from execbox.state import open_store

    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    body = {"language": "python", "code": STATEFUL, "user_id": "user-1", "persist_state": True}
    try:
        with live_server(engine, settings(write_tenants(tmp_path)), state_store=store) as srv:
            with srv.client(KEY_A) as a, srv.client(KEY_B) as b:
                first = a.post("/v1/execute", json=body).json()
                assert first["stdout"].startswith("null") and first["state_saved"] is True, first
                assert a.post("/v1/execute", json=body).json()["stdout"].startswith('{"n": 1}')
                # The same user id under another tenant is another user.
                assert b.post("/v1/execute", json=body).json()["stdout"].startswith("null")
                assert a.post("/v1/execute", json=body).json()["stdout"].startswith('{"n": 2}')
    finally:
        store.close()


def test_network_needs_the_tenants_permission(engine: Engine, tmp_path: Path) -> None:
    with live_server(engine, settings(write_tenants(tmp_path))) as srv, srv.client(KEY_A) as c:
        body = {"code": "1", "network": {"mode": "proxy", "allow": []}}
        for path in ("/v1/execute", "/v1/executions"):
            r = c.post(path, json=body)
            assert r.status_code == 403 and error_of(r)["field"] == "network.mode", r.text
        r = c.post("/v1/execute", json={"code": "1", "user_id": "u1", "persist_state": True})
        assert r.status_code == 422 and error_of(r)["field"] == "persist_state"  # this server has no store
