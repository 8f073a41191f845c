"""Persistent sessions against the real Docker Engine: what persists, what does not, and how
sessions end (idle, lifetime, delete, a dying container), caps, tenants, and adoption by a
second ``Sessions`` over the same store (the restart case without the process; see
test_sessions_restart.py for real processes killed with SIGKILL).

Session containers are owned by their registry, not by this process, so ``conftest.ours``
does not see them: each test has its own registry (its own store), and afterwards no
container of that registry may remain.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from execbox import (
    InvalidRequestError,
    SandboxError,
    SessionBusyError,
    SessionLimitError,
    SessionNotFoundError,
    Sessions,
)
from execbox.engine.base import Engine
from execbox.exceptions import EngineError
from execbox.sessions import RECORD_KIND, REGISTRY_LABEL, SESSION_LABEL
from execbox.state import StateStore
from execbox.state.redis import RedisStateStore
from execbox.state.sqlite import SQLiteStateStore
from tests.support import eventually

pytestmark = pytest.mark.docker


# -- helpers (also used by test_sessions_api.py and test_sessions_restart.py) -------------------------


def registry_containers(engine: Engine, registry_id: str) -> list[str]:
    """Containers of this registry that still exist."""
    return [r.id for r in engine.list_resources(f"{REGISTRY_LABEL}={registry_id}") if r.kind == "container"]


def end_all(engine: Engine, store: StateStore) -> list[str]:
    """End every session of the store's registry; the containers that were left even so (then removed)."""
    cleaner = Sessions(engine, store, start_reaper=False)
    registry_id = cleaner.registry_id
    cleaner.close(end_sessions=True)
    left = registry_containers(engine, registry_id)
    for cid in left:
        engine.remove(cid)
    return left


@contextmanager
def sessions_over(engine: Engine, store: StateStore, **options: Any) -> Iterator[Sessions]:
    """A ``Sessions`` whose sessions all end afterwards; none of its registry's containers may be left."""
    sessions = Sessions(engine, store, **options)
    try:
        yield sessions
    finally:
        sessions.close()
        left = end_all(engine, store)
        assert not left, f"sessions leaked {len(left)} containers"


def container_gone(engine: Engine, cid: str) -> bool:
    try:
        engine.state(cid)
    except EngineError as exc:
        return "no such container" in str(exc).lower()
    return False


def session_gone(sessions: Sessions, session_id: str, tenant: str = "default") -> bool:
    try:
        sessions.get(session_id, tenant=tenant)
    except SessionNotFoundError:
        return True
    return False


def container_of(store: StateStore, tenant: str, session_id: str) -> str:
    record = store.get_record(RECORD_KIND, f"{tenant}/{session_id}")
    assert record is not None and record["container_id"]
    return str(record["container_id"])


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = SQLiteStateStore(tmp_path / "sessions.db")
    yield s
    s.close()


@pytest.fixture
def sessions(engine: Engine, store: StateStore) -> Iterator[Sessions]:
    with sessions_over(engine, store, reap_interval=0.2) as s:
        yield s


# -- what persists ---------------------------------------------------------------------------------


def test_python_repl_keeps_variables_imports_and_files(sessions: Sessions) -> None:
    s = sessions.create("alice", "python")
    assert s.repl and s.language == "python" and s.status == "ready"
    first = sessions.execute(s.id, "x = 41\nimport json\nn = open('notes.txt', 'w').write('kept')")
    assert first.exit_code == 0 and first.stdout == "" and first.call == 1
    second = sessions.execute(s.id, "print(x + 1)\nprint(json.dumps({'a': 1}))\nprint(open('/work/notes.txt').read())")
    assert (second.exit_code, second.stdout) == (0, '42\n{"a": 1}\nkept\n')
    assert second.call == 2 and not second.repl_reset
    # A last bare expression is echoed, as in a notebook; top-level await works.
    assert sessions.execute(s.id, "x * 2").stdout == "82\n"
    assert sessions.execute(s.id, "import asyncio\nawait asyncio.sleep(0)\nx").stdout == "41\n"
    assert sessions.get(s.id).calls == 4


def test_exception_does_not_end_the_session_and_output_is_per_call(sessions: Sessions) -> None:
    s = sessions.create("alice", "python")
    ok = sessions.execute(s.id, "import sys\nprint('one')\nprint('err one', file=sys.stderr)\ny = 1")
    assert (ok.stdout, ok.stderr) == ("one\n", "err one\n")
    boom = sessions.execute(s.id, "print('two')\ndef f():\n    return 1 / 0\nf()")
    assert boom.exit_code == 1 and boom.stdout == "two\n"
    assert "ZeroDivisionError" in boom.stderr and 'File "<cell 2>", line 4' in boom.stderr
    assert "session_repl" not in boom.stderr  # the driver's own frames are not shown
    assert sessions.execute(s.id, "x = = 1").exit_code == 1  # a syntax error too
    after = sessions.execute(s.id, "print('three', y)")
    assert (after.exit_code, after.stdout, after.stderr) == (0, "three 1\n", "")
    exited = sessions.execute(s.id, "import sys\nsys.exit(3)")
    assert exited.exit_code == 3 and not exited.repl_reset
    assert sessions.execute(s.id, "print(y)").stdout == "1\n"


def test_env_holds_for_one_call_only(sessions: Sessions) -> None:
    s = sessions.create("alice", "python")
    r = sessions.execute(s.id, "import os\nprint(os.environ['TOKEN'])", env={"TOKEN": "abc"})
    assert r.stdout == "abc\n"
    assert sessions.execute(s.id, "print(os.environ.get('TOKEN'))").stdout == "None\n"


def test_javascript_repl_keeps_globals_and_survives_errors(sessions: Sessions) -> None:
    s = sessions.create("alice", "javascript")
    assert s.repl
    assert (
        sessions.execute(s.id, "let x = 41; const fs = require('fs'); fs.writeFileSync('a.txt', 'kept')").exit_code == 0
    )
    r = sessions.execute(s.id, "console.log(x + 1); console.log(fs.readFileSync('/work/a.txt', 'utf8'))")
    assert (r.exit_code, r.stdout) == (0, "42\nkept\n")
    boom = sessions.execute(s.id, "function f() { null.x }\nf()")
    assert boom.exit_code == 1 and "TypeError" in boom.stderr and "<cell 3>:2" in boom.stderr
    assert sessions.execute(s.id, "x + 1").stdout == "42\n"  # completion values are echoed
    awaited = sessions.execute(s.id, "await new Promise((r) => setTimeout(r, 10)); globalThis.y = x * 2")
    assert awaited.exit_code == 0
    assert sessions.execute(s.id, "console.log(y)").stdout == "82\n"
    rejected = sessions.execute(s.id, "Promise.reject(new Error('nope'))")
    assert rejected.exit_code == 1 and "nope" in rejected.stderr


def test_bash_session_keeps_files_not_shell_variables(sessions: Sessions) -> None:
    s = sessions.create("alice", "bash")
    assert not s.repl
    with pytest.raises(InvalidRequestError) as info:
        sessions.create("alice", "bash", repl=True)
    assert info.value.field == "repl"
    assert sessions.execute(s.id, "echo data > f.txt; V=1; cd /tmp").exit_code == 0
    r = sessions.execute(s.id, 'cat f.txt; echo "V=$V"; pwd; exit 4')
    assert (r.exit_code, r.stdout) == (4, "data\nV=\n/work\n")


def test_python_without_repl_runs_each_call_afresh(sessions: Sessions) -> None:
    s = sessions.create("alice", "python", repl=False)
    sessions.execute(s.id, "x = 1\nopen('f', 'w').write('1')")
    r = sessions.execute(s.id, "print(open('f').read())\nprint(x)")
    assert r.exit_code == 1 and r.stdout == "1\n" and "NameError" in r.stderr


# -- timeouts, kills, a dying container ------------------------------------------------------------


def test_python_timeout_interrupts_the_call_and_keeps_the_session(sessions: Sessions) -> None:
    s = sessions.create("alice", "python")
    sessions.execute(s.id, "x = 41")
    r = sessions.execute(s.id, "print('started', flush=True)\nwhile True:\n    pass", timeout=1)
    assert r.timed_out and r.exit_code == 130 and r.signal == 2
    assert r.stdout == "started\n" and "KeyboardInterrupt" in r.stderr
    assert not r.repl_reset and not r.session_ended
    assert sessions.execute(s.id, "print(x + 1)").stdout == "42\n"


def test_code_that_ignores_the_interrupt_costs_the_repl_not_the_files(sessions: Sessions) -> None:
    s = sessions.create("alice", "python")
    sessions.execute(s.id, "x = 41\nopen('kept.txt', 'w').write('yes')")
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)"
    r = sessions.execute(s.id, stubborn, timeout=1)
    assert r.timed_out and r.exit_code == 137 and r.signal == 9 and r.repl_reset and not r.session_ended
    after = sessions.execute(s.id, "print(open('kept.txt').read())\nprint('x' in globals())")
    assert (after.exit_code, after.stdout) == (0, "yes\nFalse\n")


def test_javascript_timeout_interrupts_loops_and_awaits(sessions: Sessions) -> None:
    s = sessions.create("alice", "javascript")
    sessions.execute(s.id, "var kept = 'yes'")
    loop = sessions.execute(s.id, "while (true) {}", timeout=1)
    assert loop.timed_out and loop.exit_code == 130 and not loop.repl_reset
    forever = sessions.execute(s.id, "await new Promise(() => {})", timeout=1)
    assert forever.timed_out and forever.exit_code == 130 and not forever.repl_reset
    assert sessions.execute(s.id, "console.log(kept)").stdout == "yes\n"


def test_bash_timeout_kills_the_call_only(sessions: Sessions) -> None:
    s = sessions.create("alice", "bash")
    r = sessions.execute(s.id, "echo before; sleep 60", timeout=1)
    assert r.timed_out and r.stdout == "before\n" and not r.session_ended
    assert sessions.execute(s.id, "echo after").stdout == "after\n"


def test_exit_and_oom_restart_the_repl_and_say_so(sessions: Sessions) -> None:
    s = sessions.create("alice", "python", limits={"memory": "64m"})
    sessions.execute(s.id, "x = 1\nopen('f', 'w').write('1')")
    gone = sessions.execute(s.id, "import os\nos._exit(5)")
    assert gone.exit_code == 5 and gone.repl_reset
    sessions.execute(s.id, "x = 1")
    oom = sessions.execute(s.id, "b = b'x' * (200 * 1024 * 1024)")
    assert oom.oom_killed and oom.exit_code == 137 and oom.repl_reset and not oom.session_ended
    assert sessions.execute(s.id, "print(open('f').read())").stdout == "1\n"


def test_a_container_that_dies_ends_the_session_and_says_so(engine: Engine, sessions: Sessions) -> None:
    s = sessions.create("alice", "python")
    # The REPL's parent is the session agent: killing it ends the container (its init exits).
    r = sessions.execute(s.id, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(30)")
    assert r.session_ended
    with pytest.raises(SessionNotFoundError):
        sessions.execute(s.id, "print(1)")
    assert sessions.list() == []


# -- isolation ---------------------------------------------------------------------------------------


def test_two_users_sessions_are_isolated(sessions: Sessions) -> None:
    a = sessions.create("alice", "python")
    b = sessions.create("bob", "python")
    sessions.execute(a.id, "secret = 's3'\nopen('/work/secret.txt', 'w').write('s3')\nopen('/tmp/t', 'w').write('x')")
    probe = (
        "import os\n"
        "print('secret' in globals(), os.path.exists('/work/secret.txt'), os.path.exists('/tmp/t'))\n"
        "print(os.getuid())\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit())[:1])\n"
    )
    lines = sessions.execute(b.id, probe).stdout.splitlines()
    assert lines[0] == "False False False"
    uid_a = int(sessions.execute(a.id, "import os\nprint(os.getuid())").stdout)
    assert int(lines[1]) != uid_a and uid_a >= 100_000  # a UID of its own, not root
    assert lines[2] == "[1]"  # its own PID namespace


def test_session_containers_are_hardened_like_runs(sessions: Sessions) -> None:
    s = sessions.create("alice", "python")
    code = (
        "import os, socket, errno\n"
        "st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
        "print(st['CapBnd'].strip(), st['NoNewPrivs'].strip(), st['Seccomp'].strip())\n"
        "try:\n    open('/usr/x', 'w')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
        "print(sorted(os.listdir('/sys/class/net')))\n"
    )
    out = sessions.execute(s.id, code).stdout.splitlines()
    assert out == ["0000000000000000 1 2", "EROFS", "['lo']"]


def test_the_agent_socket_refuses_connections_without_the_token(sessions: Sessions) -> None:
    s = sessions.create("alice", "python")
    # Code in the session can reach its agent's socket; the agent answers it only between calls.
    probe = (
        "import socket, threading\n"
        "def probe():\n"
        "    c = socket.socket(socket.AF_UNIX)\n"
        "    c.connect('\\0execbox-session')\n"
        '    c.sendall(b\'{"op": "hello", "token": "guess"}\\n{"op": "exec", "code": "print(1)"}\\n\')\n'
        "    data = b''\n"
        "    while chunk := c.recv(4096):\n"
        "        data += chunk\n"
        "    open('/tmp/reply', 'wb').write(data)\n"
        "threading.Thread(target=probe, daemon=True).start()\n"
    )
    assert sessions.execute(s.id, probe).exit_code == 0
    read = "import os\nprint(open('/tmp/reply', 'rb').read() if os.path.exists('/tmp/reply') else '')"
    reply = eventually(lambda: sessions.execute(s.id, read).stdout.strip())
    assert reply == repr(b"X\x00\x00\x00\x0funauthenticated")


def test_tenants_see_only_their_own_sessions(sessions: Sessions) -> None:
    s = sessions.create("alice", "python", tenant="acme")
    for call in (
        lambda: sessions.get(s.id, tenant="globex"),
        lambda: sessions.execute(s.id, "print(1)", tenant="globex"),
        lambda: sessions.delete(s.id, tenant="globex"),
    ):
        with pytest.raises(SessionNotFoundError):
            call()
    assert sessions.list("globex") == [] and [x.id for x in sessions.list("acme")] == [s.id]
    assert sessions.execute(s.id, "print(1)", tenant="acme").stdout == "1\n"
    for bad in ("../acme/" + s.id, "ses_nothex", ""):
        with pytest.raises(SessionNotFoundError):
            sessions.get(bad, tenant="acme")


# -- lifecycle: idle, lifetime, delete, caps ---------------------------------------------------------


def test_idle_sessions_are_reaped_with_their_container(engine: Engine, store: StateStore, sessions: Sessions) -> None:
    s = sessions.create("alice", "bash", idle_timeout=1)
    cid = container_of(store, "default", s.id)
    eventually(lambda: session_gone(sessions, s.id))
    eventually(lambda: store.get_record(RECORD_KIND, f"default/{s.id}") is None)
    eventually(lambda: container_gone(engine, cid))
    with pytest.raises(SessionNotFoundError):
        sessions.execute(s.id, "echo 1")


def test_a_running_call_is_never_idle(sessions: Sessions) -> None:
    s = sessions.create("alice", "python", idle_timeout=1)
    r = sessions.execute(s.id, "import time\ntime.sleep(3)\nprint('done')")
    assert (r.exit_code, r.stdout, r.session_ended) == (0, "done\n", False)
    assert sessions.execute(s.id, "print('still here')").stdout == "still here\n"


def test_max_lifetime_ends_a_busy_session(engine: Engine, store: StateStore, sessions: Sessions) -> None:
    s = sessions.create("alice", "python", max_lifetime=2, idle_timeout=600)
    cid = container_of(store, "default", s.id)

    def ended() -> bool:
        try:
            r = sessions.execute(s.id, "print(1)")
        except SessionNotFoundError:
            return True
        return r.session_ended

    eventually(ended, interval=0.2)
    eventually(lambda: container_gone(engine, cid))


def test_delete_ends_the_session_now(engine: Engine, store: StateStore, sessions: Sessions) -> None:
    s = sessions.create("alice", "python")
    cid = container_of(store, "default", s.id)
    sessions.delete(s.id)
    assert container_gone(engine, cid)
    with pytest.raises(SessionNotFoundError):
        sessions.execute(s.id, "print(1)")
    with pytest.raises(SessionNotFoundError):
        sessions.delete(s.id)


def test_caps_per_user_and_in_all(engine: Engine, store: StateStore) -> None:
    with sessions_over(engine, store, max_per_user=2, max_total=3, start_reaper=False) as sessions:
        a1 = sessions.create("alice", "bash")
        sessions.create("alice", "bash")
        with pytest.raises(SessionLimitError) as info:
            sessions.create("alice", "bash")
        assert info.value.scope == "user" and info.value.retry_after is not None
        assert sessions.create("alice", "bash", tenant="other").user_id == "alice"  # another tenant's alice
        with pytest.raises(SessionLimitError) as info:
            sessions.create("bob", "bash")
        assert info.value.scope == "total"
        assert len(registry_containers(engine, sessions.registry_id)) == 3  # nothing made for the refused ones
        sessions.delete(a1.id)
        assert sessions.create("bob", "bash").user_id == "bob"


def test_bad_requests_make_nothing(engine: Engine, sessions: Sessions) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"language": "cobol"}, "language"),
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"max_lifetime": 10**9}, "max_lifetime"),
        ({"limits": {"memory": "1t"}}, "limits.memory"),
        ({"network": "bridge"}, "network"),
        ({"image": "no such image!"}, "image"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidRequestError) as info:
            sessions.create("alice", **{"language": "python", **kwargs})
        assert info.value.field == field, kwargs
    with pytest.raises(InvalidRequestError):
        sessions.create("../etc", "python")
    assert registry_containers(engine, sessions.registry_id) == []
    s = sessions.create("alice", "bash")
    calls: list[tuple[dict[str, Any], str]] = [
        ({"code": " "}, "code"),
        ({"code": "x", "env": {"A-B": "1"}}, "env"),
        ({"code": "x", "timeout": 10**6}, "timeout"),
    ]
    for kwargs, field in calls:
        with pytest.raises(InvalidRequestError) as info:
            sessions.execute(s.id, **kwargs)
        assert info.value.field == field


# -- restart adoption and reconciliation -------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    s: StateStore
    if request.param == "sqlite":
        s = SQLiteStateStore(tmp_path / "registry.db")
    else:
        s = RedisStateStore(request.getfixturevalue("redis_url"))
    yield s
    s.close()


def test_a_second_sessions_adopts_live_sessions(engine: Engine, any_store: StateStore) -> None:
    first = Sessions(engine, any_store, start_reaper=False)
    try:
        py = first.create("alice", "python")
        js = first.create("alice", "javascript")
        first.execute(py.id, "x = 41\nopen('f.txt', 'w').write('file')")
        first.execute(js.id, "globalThis.y = 'js'")
        second = Sessions(engine, any_store, start_reaper=False)  # a restarted service, or another replica
        try:
            assert {s.id for s in second.list()} >= {py.id, js.id}
            r = second.execute(py.id, "print(x + 1, open('f.txt').read())")
            assert (r.exit_code, r.stdout, r.repl_reset) == (0, "42 file\n", False)
            assert second.execute(js.id, "console.log(y)").stdout == "js\n"
            # Both hold a connection now; calls from either land in the same interpreter.
            assert first.execute(py.id, "x += 1\nprint(x)").stdout == "42\n"
            assert second.execute(py.id, "print(x)").stdout == "42\n"
            first.close()  # the first process goes away: the sessions stay
            assert second.execute(py.id, "print(x)").stdout == "42\n"
            assert second.get(py.id).calls == 5
        finally:
            second.close()
    finally:
        first.close()
        assert end_all(engine, any_store) == []


def test_unregistered_containers_are_removed_and_lost_containers_end_sessions(
    engine: Engine, store: StateStore
) -> None:
    with sessions_over(engine, store, start_reaper=False) as sessions:
        kept = sessions.create("alice", "bash")
        orphan = sessions.create("bob", "bash")
        lost = sessions.create("carol", "bash")
        orphan_cid = container_of(store, "default", orphan.id)
        lost_cid = container_of(store, "default", lost.id)
        store.delete_record(RECORD_KIND, f"default/{orphan.id}")  # the registry forgot it (e.g. Redis flushed)
        engine.remove(lost_cid)  # its container vanished (e.g. removed by hand)
        restarted = Sessions(engine, store, start_reaper=False)  # reconciles at start
        try:
            assert container_gone(engine, orphan_cid)
            assert [s.id for s in restarted.list()] == [kept.id]
            assert restarted.execute(kept.id, "echo ok").stdout == "ok\n"
        finally:
            restarted.close()


def test_containers_carry_registry_labels_and_no_process_owner(engine: Engine, sessions: Sessions) -> None:
    s = sessions.create("alice", "bash", max_lifetime=100)
    (res,) = [r for r in engine.list_resources(f"{SESSION_LABEL}={s.id}") if r.kind == "container"]
    labels = res.labels
    assert labels["execbox.kind"] == "session" and labels["execbox.managed"] == "1"
    assert labels[REGISTRY_LABEL] == sessions.registry_id and labels["execbox.tenant"] == "default"
    assert "execbox.owner" not in labels  # a restart must not make it an orphan
    # The expiry covers the max lifetime, so the global reaper leaves it alone until then.
    assert time.time() + 100 <= float(labels["execbox.expires"]) <= time.time() + 100 + 700
    from execbox.reaper import is_orphan

    assert not is_orphan(res, time.time())


def test_session_records_hold_no_secret_in_the_public_view(sessions: Sessions, store: StateStore) -> None:
    s = sessions.create("alice", "bash")
    assert "token" not in json.loads(s.model_dump_json())
    assert store.get_record(RECORD_KIND, f"default/{s.id}")["token"]


def test_a_broken_connection_is_not_a_dead_session(engine: Engine, store: StateStore) -> None:
    with sessions_over(engine, store, start_reaper=False) as first:
        s = first.create("alice", "python")
        first.execute(s.id, "x = 41")
        second = Sessions(engine, store, start_reaper=False)
        try:
            assert second.execute(s.id, "print(x)").stdout == "41\n"  # adopted: through a relay
            kill_relay = (
                "import os, signal\n"
                "for p in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                "    try:\n"
                "        if b'--relay' in open(f'/proc/{p}/cmdline', 'rb').read():\n"
                "            os.kill(int(p), signal.SIGKILL)\n"
                "    except OSError:\n"
                "        pass\n"
            )
            with pytest.raises(SandboxError, match="the session lives on"):
                second.execute(s.id, kill_relay)
            r = second.execute(s.id, "print(x + 1)")  # a new relay
            assert (r.stdout, r.repl_reset, r.session_ended) == ("42\n", False, False)
        finally:
            second.close()


def test_concurrent_calls_on_one_session_are_serialized(engine: Engine, store: StateStore) -> None:
    import threading

    with sessions_over(engine, store, start_reaper=False, busy_wait=0) as sessions:
        s = sessions.create("alice", "python")
        sessions.execute(s.id, "n = 0")
        errors: list[BaseException] = []

        def bump() -> None:
            try:
                for _ in range(5):
                    r = sessions.execute(s.id, "v = n\nimport time\ntime.sleep(0.01)\nn = v + 1", timeout=5)
                    assert r.exit_code == 0, r
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert sessions.execute(s.id, "print(n)").stdout == "20\n"  # no call interleaved with another

        # A call that finds the session busy for longer than its own timeout (+ busy_wait) gives up.
        slow = threading.Thread(target=lambda: sessions.execute(s.id, "import time\ntime.sleep(8)", timeout=10))
        slow.start()
        eventually(lambda: sessions.get(s.id).calls == 23)  # the slow call holds the session now
        with pytest.raises(SessionBusyError):
            sessions.execute(s.id, "print(1)", timeout=1)
        slow.join(60)
        assert sessions.execute(s.id, "print(n)").stdout == "20\n"


def test_a_repl_that_closes_its_stdout_does_not_make_the_agent_spin(sessions: Sessions) -> None:
    s = sessions.create("alice", "python")
    agent_cpu = (
        "import os\n"
        "fields = open(f'/proc/{os.getppid()}/stat').read().rsplit(')', 1)[1].split()\n"
        "print(int(fields[11]) + int(fields[12]), file=__import__('sys').stderr)\n"  # utime + stime, in ticks
    )
    assert sessions.execute(s.id, "import os\nos.close(1)").exit_code == 0
    before = int(sessions.execute(s.id, agent_cpu).stderr)
    time.sleep(1.0)  # between calls: a spinning agent would burn this whole second
    r = sessions.execute(s.id, agent_cpu)
    assert int(r.stderr) - before < 50  # ticks are 1/100 s: far less than the second that passed
    assert sessions.execute(s.id, "import sys\n_ = sys.stderr.write('alive\\n')").stderr == "alive\n"
