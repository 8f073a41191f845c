"""No network, cleanup after every outcome, bad input: against the real Docker Engine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox import Executor, InvalidRequestError
from execbox.engine.base import Engine
from execbox.exceptions import EngineError
from execbox.labels import MANAGED_FILTER, OWNER, owner_id
from tests.conftest import busy
from tests.isolations import every_isolation  # noqa: F401 (runs this module under every isolation)

pytestmark = pytest.mark.docker

CLI = str(Path(sys.executable).with_name("execbox"))


def _bridge_gateway(engine: Engine) -> str:
    import ipaddress

    net = engine.api.inspect_network("bridge")  # type: ignore[attr-defined]
    cfg = net["IPAM"]["Config"][0]
    if cfg.get("Gateway"):
        return str(cfg["Gateway"])
    return str(next(ipaddress.ip_network(cfg["Subnet"]).hosts()))


@pytest.fixture
def bridge_server(engine: Engine) -> Iterator[tuple[str, int, list[str]]]:
    """A TCP server of the test's own on this machine's Docker bridge address.

    It is reachable from a container on the default bridge; a sandbox must not reach it.
    """
    host = _bridge_gateway(engine)
    srv = socket.create_server((host, 0))
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    hits: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = srv.accept()
            except TimeoutError:
                continue
            hits.append(addr[0])
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield host, port, hits
    stop.set()
    t.join()
    srv.close()


def test_bridge_server_is_reachable_from_a_normal_container(engine: Engine, bridge_server: tuple) -> None:
    # The control: the same server IS reachable from a container with default networking,
    # so the failures below are the sandbox's doing, not a dead server.
    from execbox.images import default_image

    host, port, hits = bridge_server
    api = engine.api  # type: ignore[attr-defined]
    cid = api.create_container(
        default_image(),
        ["python3", "-c", f"import urllib.request; print(urllib.request.urlopen('http://{host}:{port}/').read())"],
        labels={"execbox.managed": "1", OWNER: owner_id()},  # alive: no sweep takes it
    )["Id"]
    try:
        api.start(cid)
        assert api.wait(cid, timeout=30)["StatusCode"] == 0
    finally:
        api.remove_container(cid, force=True)
    assert hits


def test_no_network_at_all(executor: Executor, bridge_server: tuple) -> None:
    host, port, hits = bridge_server
    py = executor.execute(
        f"""
import socket, urllib.request
for what, fn in [
    ('socket', lambda: socket.create_connection(('{host}', {port}), timeout=2)),
    ('urllib', lambda: urllib.request.urlopen('http://{host}:{port}/', timeout=2)),
    ('dns', lambda: socket.getaddrinfo('example.com', 80)),
]:
    try:
        fn(); print(what, 'CONNECTED')
    except Exception as e:
        print(what, 'failed', type(e).__name__)
print(open('/proc/net/dev').read().count(':') - 0)
""",
        language="python",
    )
    js = executor.execute(
        f"""
const http = require('http');
const req = http.get('http://{host}:{port}/', r => console.log('http CONNECTED'));
req.on('error', e => console.log('http failed', e.code));
req.setTimeout(2000, () => req.destroy(new Error('timeout')));
""",
        language="javascript",
    )
    sh = executor.execute(
        f"(exec 3<>/dev/tcp/{host}/{port}) 2>/dev/null && echo tcp CONNECTED || echo tcp failed", language="bash"
    )
    assert "CONNECTED" not in py.stdout + js.stdout + sh.stdout
    assert py.stdout.count("failed") == 3 and "http failed" in js.stdout and sh.stdout == "tcp failed\n"
    assert py.stdout.splitlines()[-1] == "1"  # interfaces: only lo
    assert hits == []


def test_removed_after_error_timeout_and_oom(executor: Executor, engine: Engine) -> None:
    runs = [
        executor.execute("raise SystemExit(3)", language="python"),
        executor.execute("while True: pass", language="python", timeout=0.5),
        executor.execute("b = bytearray(200 << 20)", language="python", limits={"memory": "32m"}),
    ]
    assert [r.exit_code for r in runs] == [3, 137, 137]
    assert runs[1].timed_out and runs[2].oom_killed
    assert executor.drain()
    assert busy(executor) == set()
    for r in runs:
        with pytest.raises(EngineError, match="No such container"):
            engine.state(r.sandbox_id)


def test_removed_after_exception_in_execbox(executor: Executor, engine: Engine) -> None:
    def explode(stream: str, chunk: bytes) -> None:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError):
        executor.execute("console.log('x'); setTimeout(() => {}, 5000)", on_output=explode)
    assert executor.drain()
    assert busy(executor) == set()


def _wait_for_container(engine: Engine, pid: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in engine.list_resources(MANAGED_FILTER):
            if r.kind == "container" and r.labels.get(OWNER, "").split(":")[1:2] == [str(pid)]:
                return r.id
        time.sleep(0.05)
    raise AssertionError("the CLI never created its sandbox")


def _cli(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_of_cli_then_gc_leaves_nothing(engine: Engine) -> None:
    with _cli("run", "-l", "bash", "-c", "echo up; sleep 60", "--timeout", "120") as proc:
        cid = _wait_for_container(engine, proc.pid)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"  # killed mid-run, not before the code started
        proc.kill()
        proc.wait()
    assert engine.state(cid).running  # orphaned: nobody removed it
    out = subprocess.run([CLI, "gc"], capture_output=True, text=True, check=True).stdout
    assert "removed container" in out
    left = [
        r for r in engine.list_resources(MANAGED_FILTER) if r.labels.get(OWNER, "").split(":")[1:2] == [str(proc.pid)]
    ]
    assert left == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_cli_removes_its_container(engine: Engine, sig: int) -> None:
    with _cli("run", "-l", "python", "-c", "import time; print('up', flush=True); time.sleep(60)") as proc:
        cid = _wait_for_container(engine, proc.pid)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"  # the code is running
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=30) in (130, 128 + sig)
    with pytest.raises(EngineError, match="No such container"):
        engine.state(cid)


def test_cli_run_exit_code_env_and_json(tmp_path: Path) -> None:
    script = tmp_path / "hello.js"
    script.write_text("console.log('hi', process.env.K); process.exit(5)")
    r = subprocess.run([CLI, "run", str(script), "--env", "K=V"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (5, "hi V\n")
    r = subprocess.run(
        [CLI, "run", "-c", "print(1)", "--language", "python", "--timeout", "5", "--memory", "128m", "--json"],
        capture_output=True,
        text=True,
    )
    import json

    body = json.loads(r.stdout)
    assert r.returncode == 0 and body["stdout"] == "1\n" and body["exit_code"] == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"language": "cobol"}, "language"),
        ({"code": "   "}, "code"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"env": {"A-B": "x"}}, "env"),
        ({"limits": {"memory": "lots"}}, "limits.memory"),
        ({"limits": {"memory": "1t"}}, "limits.memory"),
        ({"limits": {"cpus": -1}}, "limits.cpus"),
        ({"limits": {"pids": 1_000_000}}, "limits.pids"),
        ({"limits": {"bogus": 1}}, "limits.bogus"),
        ({"timeout": 100_000}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"files": {"../x": "y"}}, "files"),
    ],
)
def test_bad_input_is_refused_before_any_container(
    executor: Executor, engine: Engine, kwargs: dict, field: str
) -> None:
    made = executor.factory.made
    stats = executor.pool_stats()
    args = {"code": "print(1)", "language": "python", **kwargs}
    with pytest.raises(InvalidRequestError) as info:
        executor.execute(args.pop("code"), **args)
    assert info.value.field == field, info.value
    assert info.value.message
    # No sandbox was made or handed out for it (the pool may refill meanwhile).
    after = executor.pool_stats()
    if stats is None or after is None:
        assert executor.factory.made == made
    else:
        assert (after.hits, after.misses) == (stats.hits, stats.misses)
    assert busy(executor) == set()


def test_cli_bad_input_exit_code_and_message() -> None:
    r = subprocess.run([CLI, "run", "-c", "x", "-l", "cobol"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid language" in r.stderr and "cobol" in r.stderr
    r = subprocess.run([CLI, "run", "-c", "x", "-e", "9X=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "env" in r.stderr


def test_cli_says_how_a_run_ended() -> None:
    r = subprocess.run(
        [CLI, "run", "-l", "bash", "-c", "echo hi; sleep 5", "--timeout", "0.5"], capture_output=True, text=True
    )
    assert (r.returncode, r.stdout) == (137, "hi\n")
    assert r.stderr.strip().endswith("execbox: timed out")
    r = subprocess.run(
        [CLI, "run", "-l", "python", "-c", "print('x' * 5000)", "--output-bytes", "100"], capture_output=True, text=True
    )
    assert r.returncode == 0 and len(r.stdout) == 100 and "execbox: output truncated" in r.stderr
