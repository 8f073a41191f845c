"""``execbox.Client``, ``execbox.AsyncClient`` and ``execbox run --server`` against a real uvicorn server
on 127.0.0.1 over the real Docker Engine."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

import execbox
from execbox import (
    AsyncClient,
    AuthenticationError,
    Client,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    ServiceError,
    WaitTimeoutError,
)
from execbox.engine.base import Engine

from .serverkit import KEY_A, KEY_PY, LiveServer, live_server, settings, write_tenants

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(engine, settings(write_tenants(tmp_path_factory.mktemp("tenants")))) as srv:
        yield srv


@pytest.fixture
def client(server: LiveServer) -> Iterator[Client]:
    with Client(server.url, KEY_A, trust_env=False) as c:
        yield c


def test_public_names_are_exported() -> None:
    for name in ("Client", "AsyncClient", "ServiceError", "QuotaExceededError", "ServerBusyError", "NotFoundError"):
        assert name in execbox.__all__ and hasattr(execbox, name)
    assert issubclass(QuotaExceededError, ServiceError) and issubclass(ServiceError, execbox.ExecboxError)


def test_execute_returns_the_result_model(client: Client) -> None:
    r = client.execute(
        "import os, sys; print(os.environ['A'], sys.stdin.read())",
        {"A": "x"},
        language="py",
        stdin="in",
        limits={"memory": "128m"},
        timeout=5,
    )
    assert isinstance(r, execbox.ExecutionResult)
    assert (r.stdout, r.exit_code, r.language) == ("x in\n", 0, "python")
    assert client.execute("process.exit(5)").exit_code == 5


def test_errors_map_onto_the_exception_tree(server: LiveServer, client: Client) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        client.execute("1", limits={"memory": "2g"})
    assert exc.value.field == "limits.memory"
    with pytest.raises(InvalidRequestError) as exc:
        client.execute("1", env={"BAD NAME": "v"})  # refused before sending, like the library
    assert exc.value.field == "env"
    with pytest.raises(InvalidRequestError) as exc:
        client.execute("1", language="cobol")
    assert exc.value.field == "language"
    with pytest.raises(NotFoundError):
        client.get("ex_unknown")
    with Client(server.url, "wrong-key-0123456789", trust_env=False) as bad, pytest.raises(AuthenticationError):
        bad.execute("1")
    with Client(server.url, KEY_PY, trust_env=False) as py:
        with pytest.raises(PermissionDeniedError):
            py.execute("console.log(1)")
        py.execute("print(1)", language="python")
        py.execute("print(2)", language="python")
        with pytest.raises(QuotaExceededError) as quota:  # pyonly: 2 executions per minute
            py.execute("print(3)", language="python")
        assert quota.value.retry_after is not None and 1 <= quota.value.retry_after <= 60
    with socket_closed_url() as url, Client(url, KEY_A, trust_env=False) as gone, pytest.raises(ServiceError):
        gone.execute("1")


class socket_closed_url:  # noqa: N801 (used as a context manager)
    """A loopback URL on which nothing listens."""

    def __enter__(self) -> str:
        import socket

        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        return f"http://127.0.0.1:{self.s.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.s.close()


def test_stream_yields_output_then_the_result(client: Client) -> None:
    events = list(client.stream("echo one; echo two >&2; echo three", language="bash"))
    assert events[-1].kind == "result" and events[-1].result is not None
    text = {k: "".join(e.data for e in events if e.kind == k) for k in ("stdout", "stderr")}
    assert text == {"stdout": "one\nthree\n", "stderr": "two\n"}
    assert events[-1].result.stdout == "one\nthree\n"
    with pytest.raises(InvalidRequestError):
        list(client.stream("1", limits={"memory": "2g"}))


def test_submit_wait_and_wait_timeout(client: Client) -> None:
    job_id = client.submit("print('bg')", language="python")
    assert client.wait(job_id, timeout=60).stdout == "bg\n"
    job = client.get(job_id)
    assert job.status == "completed" and job.result is not None
    slow = client.submit("import time; time.sleep(3)", language="python", timeout=10)
    with pytest.raises(WaitTimeoutError):
        client.wait(slow, timeout=0.2)
    assert client.wait(slow, timeout=60).exit_code == 0


def test_async_client(server: LiveServer) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.url, KEY_A, trust_env=False) as c:
            results = await asyncio.gather(*(c.execute(f"console.log({i})") for i in range(3)))
            assert [r.stdout for r in results] == ["0\n", "1\n", "2\n"]
            events = [e async for e in c.stream("print('s')", language="python")]
            assert events[-1].result is not None and events[-1].result.stdout == "s\n"
            assert "".join(e.data for e in events if e.kind == "stdout") == "s\n"
            job_id = await c.submit("echo async", language="bash")
            assert (await c.wait(job_id, timeout=60)).stdout == "async\n"
            with pytest.raises(NotFoundError):
                await c.get("ex_nope")
            with pytest.raises(InvalidRequestError):
                await c.execute("1", timeout=25)

    asyncio.run(scenario())


def test_cli_run_against_the_server(server: LiveServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECBOX_")}
    cmd = [sys.executable, "-m", "execbox.cli", "run", "--server", server.url, "--api-key", KEY_A]
    p = subprocess.run(
        [*cmd, "-l", "python", "-c", "import sys; print('remote'); sys.exit(3)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (p.returncode, p.stdout) == (3, "remote\n"), p.stderr
    p = subprocess.run([*cmd, "--json", "-c", "console.log(1)"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0 and json.loads(p.stdout)["stdout"] == "1\n"
    p = subprocess.run(
        [*cmd[:-1], "wrong-key-0123456789", "-c", "1"], capture_output=True, text=True, env=env, timeout=60
    )
    assert p.returncode != 0 and "API key" in p.stderr
    p = subprocess.run([*cmd, "-m", "2g", "-c", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and "limits.memory" in p.stderr
