"""Async jobs shared by replicas: two real ``execbox serve`` processes over one real Redis and Docker."""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from execbox.engine.base import Engine
from execbox.labels import MANAGED_FILTER, OWNER
from execbox.server.auth import hash_key
from execbox.state.keys import heartbeat_key, pending_key, stream_key

from .serverkit import KEY_A, KEY_B, SECRET_A, Receiver, ServeProcess, free_port, metric, write_tenants

pytestmark = pytest.mark.docker

TENANTS = f"""
[tenants.alpha]
api_keys = ["{hash_key(KEY_A)}"]
max_concurrent = 2
executions_per_minute = 1000
webhook_secret = "{SECRET_A}"

[tenants.bravo]
api_keys = ["{hash_key(KEY_B)}"]
max_concurrent = 2
executions_per_minute = 1000
"""

FINAL = ("completed", "failed")


@pytest.fixture
def queue(redis_url: str) -> Iterator[tuple[str, redis.Redis]]:
    """A Redis database of these tests' own (emptied), as a URL and a client."""
    url = redis_url.rsplit("/", 1)[0] + "/9"
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    yield url, r
    r.close()


@pytest.fixture
def replicas(tmp_path: Path, queue: tuple[str, redis.Redis], engine: Engine) -> Iterator[Any]:
    """A factory of ``execbox serve`` processes sharing the queue; all stopped, their containers removed."""
    tenants = write_tenants(tmp_path, TENANTS)
    started: list[ServeProcess] = []

    def start(name: str, **env: str) -> ServeProcess:
        base = {
            "EXECBOX_STATE_URL": queue[0],  # shared jobs; runs in the replicas (a queue URL would send them to nodes)
            "EXECBOX_JOB_HEARTBEAT_TTL": "3",
            "EXECBOX_ALLOW_PRIVATE_CALLBACKS": "1",
            "EXECBOX_WEBHOOK_TIMEOUT": "5",
        }
        proc = ServeProcess(tmp_path, name, tenants, **(base | env))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
        # A killed replica leaves its sandboxes: remove them (any replica's reaper would, later).
        for cid in containers_of(engine, proc.pid):
            engine.remove(cid)


def containers_of(engine: Engine, pid: int) -> list[str]:
    return [
        r.id
        for r in engine.list_resources(MANAGED_FILTER)
        if r.kind == "container" and r.labels.get(OWNER, "").split(":")[1:2] == [str(pid)]
    ]


def until(predicate: Any, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def finished(c: httpx.Client, job_id: str, limit: float = 90.0) -> dict[str, Any]:
    """The job once finished, through ``?wait=`` (a blocking read on the server)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        body: dict[str, Any] = c.get(f"/v1/executions/{job_id}", params={"wait": 30}).json()
        if body["status"] in FINAL:
            return body
    raise AssertionError(f"job {job_id} did not finish")


def status(c: httpx.Client, job_id: str) -> str:
    return str(c.get(f"/v1/executions/{job_id}").json()["status"])


def submit(c: httpx.Client, code: str, **extra: Any) -> str:
    r = c.post("/v1/executions", json={"language": "python", "code": code, **extra})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_any_replica_answers_waits_and_counts_pending_jobs(replicas: Any) -> None:
    a = replicas("a", EXECBOX_MAX_PENDING_JOBS_PER_TENANT="3")
    b = replicas("b", EXECBOX_MAX_PENDING_JOBS_PER_TENANT="3")
    a.ready(), b.ready()
    with a.client() as ca, b.client() as cb, b.client(KEY_B) as other:
        job = submit(ca, "import time; time.sleep(1); print('hello from a job')")
        assert status(cb, job) in ("queued", "running")
        # The wait is woken by the job's end (a blocking read), well before the 20 s it allows.
        t0 = time.monotonic()
        body = cb.get(f"/v1/executions/{job}", params={"wait": 20}).json()
        assert body["status"] == "completed" and body["result"]["stdout"] == "hello from a job\n", body
        assert time.monotonic() - t0 < 15
        assert ca.get(f"/v1/executions/{job}").json() == body
        # Tenant isolation holds on every replica: another tenant's id is an unknown id.
        for c in (a, b):
            with c.client(KEY_B) as o:
                r = o.get(f"/v1/executions/{job}")
                assert r.status_code == 404 and r.json() == o.get("/v1/executions/ex_unknown").json()

        # The per-tenant limit of unfinished jobs (3) counts the jobs accepted by every replica.
        slow = "import time; time.sleep(4)"
        held = [submit(ca, slow), submit(cb, slow), submit(ca, slow)]
        for c in (ca, cb):
            r = c.post("/v1/executions", json={"language": "python", "code": "print(1)"})
            assert r.status_code == 429 and r.json()["error"]["type"] == "quota_exceeded", r.text
            assert r.headers["retry-after"]
        assert other.post("/v1/executions", json={"language": "python", "code": "print(1)"}).status_code == 202
        for j in held:
            assert finished(cb, j)["status"] == "completed"
        # Finished jobs no longer count.
        assert cb.post("/v1/executions", json={"language": "python", "code": "print(1)"}).status_code == 202
        r = ca.post("/v1/executions", json={"code": "1", "retries": 9})
        assert r.status_code == 422 and r.json()["error"]["field"] == "retries", r.text


def test_sigkill_of_a_replica_loses_no_job_and_reruns_only_with_retries(
    replicas: Any, queue: tuple[str, redis.Redis]
) -> None:
    _, r = queue
    b = replicas("b", EXECBOX_MAX_CONCURRENT="1").ready()
    with b.client(KEY_B) as cb:
        # B alone takes this one: its only job slot is busy for a while.
        blocker = submit(cb, "import time; time.sleep(20); print('blocker')", timeout=60)
        until(lambda: status(cb, blocker) == "running", "B to run the blocker")
    a = replicas("a", EXECBOX_MAX_CONCURRENT="3").ready()
    with a.client() as ca:
        # Alpha may run 2 at once: A starts these two, and reads a third that waits for alpha's slot.
        no_retry = submit(ca, "import time; time.sleep(60)", timeout=90)
        with_retry = submit(ca, "import time; time.sleep(2); print('ran')", retries=1)
        until(lambda: status(ca, no_retry) == status(ca, with_retry) == "running", "two running jobs on A")
        waiting = submit(ca, "print('three')")
        until(lambda: r.xpending(stream_key("jobs"), "execbox")["pending"] == 4, "A to hold a third job")
        assert status(ca, waiting) == "queued"
        later = [submit(ca, f"print({i})") for i in range(4)]  # no replica has a free slot: these stay queued
        assert [status(ca, j) for j in later] == ["queued"] * 4
    a.kill()
    with b.client() as cb:
        body = finished(cb, no_retry)
        assert body["status"] == "failed" and body["error"]["type"] == "interrupted", body
        assert body["attempts"] == 1 and "not started again" in body["error"]["message"]
        body = finished(cb, with_retry)
        assert body["status"] == "completed" and body["attempts"] == 2, body
        assert body["result"]["stdout"] == "ran\n"
        assert finished(cb, waiting)["result"]["stdout"] == "three\n"
        for i, job in enumerate(later):
            assert finished(cb, job)["result"]["stdout"] == f"{i}\n"
    with b.client(KEY_B) as cb:
        assert finished(cb, blocker)["result"]["stdout"] == "blocker\n"
    assert r.zcard(pending_key("alpha")) == 0 and r.zcard(pending_key(None)) == 0
    assert r.xpending(stream_key("jobs"), "execbox")["pending"] == 0
    assert not r.exists(heartbeat_key_of(r, a.pid))


def heartbeat_key_of(r: redis.Redis, pid: int) -> str:
    """The heartbeat key a process of this host with ``pid`` would use (any one, if several)."""
    keys = [k for k in r.scan_iter(heartbeat_key("*")) if f":{pid}:" in k]
    return keys[0] if keys else heartbeat_key(f"none:{pid}")


def test_webhook_retries_with_backoff_survive_a_replica_kill(replicas: Any, queue: tuple[str, redis.Redis]) -> None:
    a = replicas("a", EXECBOX_WEBHOOK_BACKOFF="2").ready()
    with Receiver([500, 503, 200]) as hook:
        with a.client() as ca:
            job = submit(ca, "print(6 * 7)", callback_url=hook.url)
            until(lambda: len(hook.received) >= 1, "the first delivery attempt")
            body = ca.get(f"/v1/executions/{job}").json()
            assert body["callback_status"] == "pending" and body["callback_attempts"] == 1, body
        a.kill()  # during the backoff before the second attempt
        b = replicas("b", EXECBOX_WEBHOOK_BACKOFF="2").ready()
        with b.client() as cb:
            until(lambda: cb.get(f"/v1/executions/{job}").json()["callback_status"] != "pending", "the delivery")
            body = cb.get(f"/v1/executions/{job}").json()
    assert body["callback_status"] == "delivered" and body["callback_attempts"] == 3, body
    assert len(hook.received) == 3
    assert hook.times[2] - hook.times[1] >= 4 * 2 * 0.9  # exponential: the third waits 4x the backoff
    first_body = hook.received[0][1]
    for headers, raw in hook.received:
        # The same delivery id and the same signed body on every attempt, from either replica.
        assert headers["x-execbox-delivery"] == job
        assert raw == first_body
        signature = "sha256=" + hmac.new(SECRET_A.encode(), raw, hashlib.sha256).hexdigest()
        assert headers["x-execbox-signature"] == signature
    assert hook.json()["result"]["stdout"] == "42\n" and hook.json()["status"] == "completed"


def test_sigterm_finishes_running_jobs_and_leaves_queued_ones_to_another_replica(replicas: Any) -> None:
    a = replicas("a", EXECBOX_MAX_CONCURRENT="1").ready()
    with a.client() as ca:
        running = submit(ca, "import time; time.sleep(3); print('finished')")
        until(lambda: status(ca, running) == "running", "the job to start")
        queued = [submit(ca, f"print({i})") for i in range(2)]
        assert [status(ca, j) for j in queued] == ["queued", "queued"]
    assert a.stop() == 0, a.log.read_text()[-2000:]
    b = replicas("b").ready()
    with b.client() as cb:
        body = finished(cb, running)
        assert body["result"]["stdout"] == "finished\n" and body["attempts"] == 1, body
        for i, job in enumerate(queued):
            body = finished(cb, job)
            assert body["status"] == "completed" and body["result"]["stdout"] == f"{i}\n", body


class DurableRedis:
    """A private redis-server with an append-only file, so that it can be killed and started again."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DurableRedis:
        args = ["--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        until(lambda: _pings(client), "redis-server to answer", limit=20)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)


def in_flight(c: httpx.Client) -> float:
    return metric(c.get("/metrics").text, "execbox_executions_in_flight")


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def test_a_redis_restart_mid_run_loses_neither_the_job_nor_its_result(replicas: Any, tmp_path: Path) -> None:
    store = DurableRedis(tmp_path).start()
    try:
        a = replicas("a", EXECBOX_STATE_URL=store.url).ready()
        with a.client() as ca:
            job = submit(ca, "import time; time.sleep(3); print('survived')")
            until(lambda: status(ca, job) == "running", "the job to start")
            store.kill()
            r = ca.get(f"/v1/executions/{job}")
            assert r.status_code == 503 and r.json()["error"]["type"] == "queue_unavailable", r.text
            assert r.headers["retry-after"]
            # The program ends while Redis is away: its end must wait for Redis, not vanish.
            until(lambda: in_flight(ca) == 0, "the program to end")
            store.start()
            body = finished(ca, job)
            ran = metric(ca.get("/metrics").text, 'execbox_executions_total{language="python",outcome="ok"}')
        assert body["status"] == "completed" and body["result"]["stdout"] == "survived\n", body
        assert body["attempts"] == 1 and ran == 1  # recorded, not run a second time
    finally:
        store.kill()
