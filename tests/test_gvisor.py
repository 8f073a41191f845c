"""gVisor isolation end to end: what a run, a session, the pool, the service and the CLI do
with ``isolation="gvisor"``. (Containment, limits, sockets and egress bypasses run under
both isolations in their own modules, parametrized: tests/isolations.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox import Executor, InvalidRequestError, Sessions
from execbox.engine.base import Engine
from execbox.pool import Profile
from execbox.runtimes import get_runtime
from execbox.server.auth import hash_key
from execbox.state.sqlite import SQLiteStateStore

from .conftest import ours
from .serverkit import live_server, settings, write_tenants
from .support import eventually
from .test_sessions import sessions_over

pytestmark = pytest.mark.docker

CLI = str(Path(sys.executable).with_name("execbox"))
HOST_KERNEL = os.uname().release
GVISOR_KERNEL = "import os; print(os.uname().release)"  # gVisor's own kernel says 4.4.0, not the host's


@pytest.fixture(scope="module")
def isolation() -> str:
    return "gvisor"


def test_each_language_env_stdin_files_and_state(executor: Executor) -> None:
    r = executor.execute(GVISOR_KERNEL, language="python")
    assert (r.isolation, r.exit_code) == ("gvisor", 0) and r.stdout.strip() != HOST_KERNEL
    r = executor.execute("console.log(process.env.K, require('fs').readFileSync(0, 'utf8'))", {"K": "v"}, stdin="in")
    assert (r.stdout, r.isolation) == ("v in\n", "gvisor")
    r = executor.execute(
        "tr a-z A-Z < in.txt > out/up.txt; echo done",
        language="bash",
        files={"in.txt": "abc", "out/.keep": ""},
        collect=["out/*.txt"],
    )
    assert (r.stdout, r.files) == ("done\n", {"out/up.txt": b"ABC"})
    r = executor.execute(
        "import os, json; s = json.loads(os.environ['EXECBOX_STATE'])\n"
        "print('OUTPUT_STATE:' + json.dumps({'n': s['n'] + 1}))",
        language="python",
        state={"n": 1},
    )
    assert r.state == {"n": 2}


def test_a_package_image_and_a_user_volume(engine: Engine, tmp_path: Path) -> None:
    user = "g" + uuid.uuid4().hex[:12]  # volume names are per (tenant, user): none of another test's
    data = str(tmp_path / "data")
    with Executor(engine=engine, pool=False, isolation="gvisor", data_dir=data, volume_quota=16 << 20) as ex:
        r = ex.execute("console.log(require('lodash').chunk([1, 2, 3], 2).length)", image="web")
        assert (r.stdout, r.isolation) == ("2\n", "gvisor"), r.stderr
        try:
            w = ex.execute("open('/data/kept', 'w').write('hi')", language="python", user_id=user, volume=True)
            assert w.exit_code == 0, w.stderr
            r = ex.execute(
                "cat /data/kept; head -c 20m /dev/zero > /data/big; echo rc=$?",
                language="bash",
                user_id=user,
                volume=True,
            )
            assert r.stdout.startswith("hi") and "rc=1" in r.stdout and r.isolation == "gvisor"  # the quota holds
        finally:
            ex.volumes.delete("default", user)
    assert ours(engine) == []


def test_a_pool_per_isolation(engine: Engine) -> None:
    with Executor(engine=engine, pool=True, pool_min_ready=1, pool_languages=("python",)) as ex:
        assert ex.pool is not None
        runc = ex.execute(GVISOR_KERNEL, language="python")
        assert (runc.isolation, runc.stdout.strip()) == ("container", HOST_KERNEL)
        first = ex.execute(GVISOR_KERNEL, language="python", isolation="gvisor")  # from now on kept warm too
        assert first.isolation == "gvisor" and first.stdout.strip() != HOST_KERNEL
        gvisor = Profile.of(get_runtime("python"), ex.image, ex.config.default_limits, isolation="gvisor")
        eventually(lambda: ex.pool.ready_count(gvisor) >= 1, what="a warm gVisor sandbox")  # type: ignore[union-attr]
        before = ex.pool_stats()
        again = ex.execute(GVISOR_KERNEL, language="python", isolation="gvisor")
        after = ex.pool_stats()
        assert again.isolation == "gvisor" and again.stdout == first.stdout
        assert before is not None and after is not None and after.hits == before.hits + 1


def test_bad_isolation_is_refused_naming_the_field(engine: Engine, executor: Executor) -> None:
    with pytest.raises(InvalidRequestError) as info:
        executor.execute("print(1)", language="python", isolation="kata")
    assert info.value.field == "isolation"
    with pytest.raises(InvalidRequestError) as info:
        Executor(engine=engine, isolation="firecracker")
    assert info.value.field == "isolation"


def test_sessions_repl_timeout_and_adoption(engine: Engine, tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store) as sessions:
        s = sessions.create("alice", "python", isolation="gvisor")
        assert s.isolation == "gvisor"
        assert sessions.execute(s.id, "x = 41\nimport os").exit_code == 0
        r = sessions.execute(s.id, "print(x + 1, os.uname().release)")
        assert r.stdout.split()[0] == "42" and r.stdout.split()[1] != HOST_KERNEL and r.isolation == "gvisor"
        r = sessions.execute(s.id, "while True: pass", timeout=1)
        assert r.timed_out and not r.repl_reset
        # Another process's Sessions over the same registry adopts it (a relay through exec).
        with Sessions(engine, store, start_reaper=False) as other:
            r = other.execute(s.id, "print(x)")
            assert (r.stdout, r.isolation) == ("41\n", "gvisor")
            assert other.get(s.id).isolation == "gvisor"
        js = sessions.create("alice", "javascript", isolation="gvisor")
        sessions.execute(js.id, "globalThis.y = 6")
        assert sessions.execute(js.id, "console.log(y * 7)").stdout == "42\n"
    store.close()


TENANTS = f"""
[tenants.forced]
api_keys = ["{hash_key("test-key-forced-gvisor-01")}"]
isolation = "gvisor"

[tenants.runconly]
api_keys = ["{hash_key("test-key-runc-only-000001")}"]
isolation = ["container"]

[tenants.any]
api_keys = ["{hash_key("test-key-any-isolation-01")}"]
"""


@pytest.fixture(scope="module")
def server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    tenants = write_tenants(tmp_path_factory.mktemp("gvisor-tenants"), TENANTS)
    with live_server(engine, settings(tenants), pool=False) as srv:
        yield srv
        srv.service.sessions.close(end_sessions=True)


def test_service_isolation_per_request_and_tenant_policy(server: object) -> None:
    srv = server  # a serverkit.LiveServer
    code = {"code": GVISOR_KERNEL, "language": "python"}
    with srv.client("test-key-forced-gvisor-01") as c:  # type: ignore[attr-defined]
        r = c.post("/v1/execute", json=code)
        assert r.status_code == 200 and r.json()["isolation"] == "gvisor"
        assert r.json()["stdout"].strip() != HOST_KERNEL
        r = c.post("/v1/execute", json={**code, "isolation": "container"})
        assert r.status_code == 403 and r.json()["error"]["field"] == "isolation"
        r = c.post("/v1/sessions", json={"user_id": "u1", "language": "python"})
        assert r.status_code == 201 and r.json()["isolation"] == "gvisor", r.text
        call = c.post(f"/v1/sessions/{r.json()['id']}/execute", json={"code": GVISOR_KERNEL}).json()
        assert call["isolation"] == "gvisor" and call["stdout"].strip() != HOST_KERNEL
        r = c.post("/v1/sessions", json={"user_id": "u1", "language": "python", "isolation": "container"})
        assert r.status_code == 403 and r.json()["error"]["field"] == "isolation"
    with srv.client("test-key-runc-only-000001") as c:  # type: ignore[attr-defined]
        assert c.post("/v1/execute", json=code).json()["isolation"] == "container"
        r = c.post("/v1/execute", json={**code, "isolation": "gvisor"})
        assert r.status_code == 403 and r.json()["error"]["field"] == "isolation"
    with srv.client("test-key-any-isolation-01") as c:  # type: ignore[attr-defined]
        r = c.post("/v1/execute", json={**code, "isolation": "gvisor"})
        assert r.status_code == 200 and r.json()["isolation"] == "gvisor"
        r = c.post("/v1/execute", json={**code, "isolation": "kata"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "isolation"


def test_cli_isolation_flag() -> None:
    r = subprocess.run(
        [CLI, "run", "-l", "python", "-c", GVISOR_KERNEL, "--isolation", "gvisor", "--json"],
        capture_output=True,
        text=True,
    )
    body = json.loads(r.stdout)
    assert r.returncode == 0 and body["isolation"] == "gvisor" and body["stdout"].strip() != HOST_KERNEL
    r = subprocess.run([CLI, "run", "-l", "bash", "-c", "true", "--isolation", "kata"], capture_output=True, text=True)
    assert r.returncode == 2 and "isolation" in r.stderr


def test_a_session_with_egress(engine: Engine, tmp_path: Path) -> None:
    from execbox.egress import Egress

    from .egress_support import PLAIN_HOST, start_upstream
    from .test_sessions import end_all
    from .test_sessions_egress import FETCH, egress_settings

    upstream = start_upstream()
    store = SQLiteStateStore(tmp_path / "registry.db")
    egress = Egress(engine, egress_settings(upstream))
    try:
        with Sessions(engine, store, egress=egress) as sessions:
            s = sessions.create("alice", "python", network={"mode": "proxy", "allow": [PLAIN_HOST]}, isolation="gvisor")
            assert sessions.execute(s.id, FETCH + "import os").exit_code == 0
            r = sessions.execute(
                s.id,
                "print(get('http://plain.example.test/g')[0], get('http://other.example.test/x')[0],"
                " os.uname().release)",
            )
            ok, denied, kernel = r.stdout.split()
            assert (ok, denied, r.isolation) == ("200", "403", "gvisor") and kernel != HOST_KERNEL, r.stderr
            assert [e.decision for e in r.network_log] == ["allowed", "denied"]
    finally:
        left = end_all(engine, store)
        egress.close()
        store.close()
        upstream.close()
    assert not left
