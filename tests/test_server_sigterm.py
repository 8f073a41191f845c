"""``execbox serve`` as a real process: SIGTERM with an execution in flight, JSON logs, start-up checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from execbox.engine.base import Engine
from execbox.labels import MANAGED_FILTER, OWNER

from .serverkit import KEY_A, metric, write_tenants

pytestmark = pytest.mark.docker

SECRET_VALUE = "sk_live_do_not_log_me_123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EXECBOX_") or k == "EXECBOX_REQUIRE_DOCKER"}
    environ.update(env)
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "execbox.cli", "serve", *args], stdout=fh, stderr=subprocess.STDOUT, env=environ
        )


def containers_of(engine: Engine, pid: int) -> list[str]:
    return [
        r.id
        for r in engine.list_resources(MANAGED_FILTER)
        if r.kind == "container" and r.labels.get(OWNER, "").split(":")[1:2] == [str(pid)]
    ]


def test_sigterm_lets_the_in_flight_execution_finish_then_exits_0(engine: Engine, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = serve(["--port", str(port), "--tenants", str(write_tenants(tmp_path))], log, EXECBOX_SHUTDOWN_GRACE="60")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)

        response: list[httpx.Response] = []
        body = {
            "language": "python",
            "code": "import os, time; time.sleep(6); print('done', len(os.environ['TOKEN']))",
            "env": {"TOKEN": SECRET_VALUE},
        }

        def in_flight() -> None:
            headers = {"Authorization": f"Bearer {KEY_A}"}
            response.append(httpx.post(f"{url}/v1/execute", json=body, headers=headers, timeout=90, trust_env=False))

        worker = threading.Thread(target=in_flight)
        worker.start()
        while metric(httpx.get(f"{url}/metrics", trust_env=False).text, "execbox_executions_in_flight") < 1:
            assert worker.is_alive()
            time.sleep(0.05)

        proc.send_signal(signal.SIGTERM)
        # New connections are refused while the execution still runs.
        refused = False
        while worker.is_alive() and not refused:
            try:
                httpx.get(f"{url}/healthz", trust_env=False, timeout=2)
            except httpx.TransportError:
                refused = True
            time.sleep(0.05)
        worker.join(90)
        assert response and response[0].status_code == 200, log.read_text()
        assert response[0].json()["stdout"] == f"done {len(SECRET_VALUE)}\n"
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert refused, "the server kept accepting connections after SIGTERM"
    assert not containers_of(engine, proc.pid), "the server left containers behind"

    text = log.read_text()
    assert SECRET_VALUE not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    finished = [ln for ln in lines if ln.get("logger") == "execbox.server.access" and ln.get("status") == 200]
    assert any(ln.get("tenant") == "alpha" and ln.get("path") == "/v1/execute" for ln in finished)
    assert any(ln.get("execution_id") and ln.get("tenant") == "alpha" for ln in lines), lines


def test_serve_refuses_bad_start_ups(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    # No keys at all, and no --no-auth: nothing would be reachable.
    assert serve(["--port", str(free_port())], log).wait(60) != 0
    assert "no API keys" in log.read_text()
    # --no-auth only on loopback.
    assert serve(["--no-auth", "--host", "0.0.0.0", "--port", str(free_port())], log).wait(60) != 0
    assert "loopback" in log.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text('[tenants.a]\napi_keys = ["plain-text-key-0123456789"]\n')
    assert serve(["--tenants", str(bad), "--port", str(free_port())], log).wait(60) != 0
    assert "hashed" in log.read_text()
