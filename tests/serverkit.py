"""Helpers of the service tests: a real uvicorn server on 127.0.0.1 (random port) in a thread,
tenants files, and small HTTP receivers of the tests' own (webhooks) on loopback."""

from __future__ import annotations

import http.server
import json
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
import uvicorn

from execbox import Executor
from execbox.engine.base import Engine
from execbox.server.app import create_app
from execbox.server.auth import hash_key
from execbox.settings import Settings

from .conftest import ours

KEY_A = "test-key-alpha-0123456789"
KEY_B = "test-key-bravo-0123456789"
KEY_PY = "test-key-python-only-0123"
SECRET_A = "whsec_alpha_0123456789abcdef"

TENANTS_TOML = f"""
[tenants.alpha]
api_keys = ["{hash_key(KEY_A)}"]
max_concurrent = 4
executions_per_minute = 1000
webhook_secret = "{SECRET_A}"

[tenants.alpha.max_limits]
timeout = 20
memory = "512m"

[tenants.bravo]
api_keys = ["{hash_key(KEY_B)}"]
max_concurrent = 4
executions_per_minute = 1000

[tenants.pyonly]
api_keys = ["{hash_key(KEY_PY)}"]
languages = ["python"]
max_concurrent = 1
executions_per_minute = 2
"""


def write_tenants(directory: Path, text: str = TENANTS_TOML) -> Path:
    path = directory / "tenants.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def settings(tenants_file: Path | None, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "tenants_file": tenants_file,
        "allow_private_callbacks": True,
        "max_concurrent": 2,
        "max_queue": 16,
        "shutdown_grace": 20,
        "webhook_timeout": 5,
    }
    return Settings(**(base | overrides))


class LiveServer:
    """``create_app`` served by a real uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", ws="none")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()

    def client(self, key: str | None = KEY_A, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, trust_env=False, **kw)

    @property
    def service(self) -> Any:
        return self.app.state.service


@contextmanager
def live_server(engine: Engine, settings_: Settings, **executor_options: Any) -> Iterator[LiveServer]:
    """A live server over a fresh executor; afterwards no container of this process may remain."""
    executor = Executor(engine=engine, sweep_on_start=False, **executor_options)
    server = LiveServer(create_app(settings_, executor=executor)).start()
    try:
        yield server
    finally:
        server.stop()
        executor.close()
        left = ours(engine)
        for cid in left:
            engine.remove(cid)
        assert not left, f"the service leaked {len(left)} containers"


def metric(text: str, name: str) -> float:
    """The value of one sample line (``name`` includes its labels) of a Prometheus text page, or 0."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Receiver:
    """An HTTP server of the test's own on 127.0.0.1 that records POSTs (webhook target).

    ``status`` is the answer to every POST, or the answers in turn (the last one repeats).
    """

    def __init__(self, status: int | list[int] = 200) -> None:
        received: list[tuple[dict[str, str], bytes]] = []
        self.received = received
        times: list[float] = []
        self.times = times  # time.monotonic() of each POST
        self.event = threading.Event()
        event = self.event
        answers = [status] if isinstance(status, int) else list(status)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                times.append(time.monotonic())
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(answers.pop(0) if len(answers) > 1 else answers[0])
                self.send_header("Content-Length", "0")
                self.end_headers()
                event.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def json(self, i: int = 0) -> Any:
        return json.loads(self.received[i][1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``execbox serve`` as a real process on a free loopback port, with its own ``EXECBOX_*`` environment.

    Without a tenants file it serves with ``--no-auth``.
    """

    def __init__(self, directory: Path, name: str, tenants: Path | None, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / f"{name}.log"
        data = directory / f"{name}-data"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("EXECBOX_")}
        environ |= {"EXECBOX_DATA_DIR": str(data), "EXECBOX_SESSIONS": "false", "EXECBOX_LOG_LEVEL": "info"}
        environ |= env
        auth = ["--tenants", str(tenants)] if tenants is not None else ["--no-auth"]
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "execbox.cli", "serve", "--port", str(self.port), *auth],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=environ,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self, limit: float = 90.0) -> ServeProcess:
        deadline = time.monotonic() + limit
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", trust_env=False).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"execbox serve did not become ready:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.1)

    def client(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=90, trust_env=False)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)
