"""Session logic without Docker: ``Sessions`` over the in-package local engine (the real session
agent and REPL workers as local processes, NO isolation) and a SQLite registry. Fast: the
containment itself is tested against the real engine in test_sessions.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox import Sessions
from execbox.engine.local import LocalEngine
from execbox.state.sqlite import SQLiteStateStore


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[LocalEngine, SQLiteStateStore, dict[str, object]]]:
    engine, store = LocalEngine(), SQLiteStateStore(tmp_path / "sessions.db")
    opts: dict[str, object] = {"image": "local", "start_reaper": False, "data_dir": str(tmp_path / "host")}
    yield engine, store, opts
    engine.close()
    store.close()


def test_a_python_and_a_javascript_session_keep_their_globals(local: tuple) -> None:
    engine, store, opts = local
    with Sessions(engine, store, **opts) as sessions:
        py = sessions.create("alice", "python")
        js = sessions.create("alice", "javascript")
        sessions.execute(py.id, "x = 41")
        sessions.execute(js.id, "globalThis.y = 1")
        assert sessions.execute(py.id, "print(x + 1)").stdout == "42\n"
        assert sessions.execute(js.id, "console.log(y + 41)").stdout == "42\n"
        slow = sessions.execute(py.id, "import time\nwhile True: time.sleep(0.01)", timeout=0.5)
        assert slow.timed_out and sessions.execute(py.id, "print(x)").stdout == "41\n"  # the REPL survived
        for s in (py, js):
            sessions.delete(s.id)
    assert engine.live() == []


def test_a_restarted_sessions_adopts_through_a_relay(local: tuple) -> None:
    engine, store, opts = local
    first = Sessions(engine, store, **opts)
    s = first.create("alice", "python")
    first.execute(s.id, "counter = 5")
    first.close()  # the attach stream's owner is gone: the next one adopts the session
    with Sessions(engine, store, **opts) as second:
        r = second.execute(s.id, "counter += 1\nprint(counter)")
        assert r.stdout == "6\n", r.stderr
        assert any(link.via == "relay" for link in second._links.values())
        second.delete(s.id)
    assert engine.live() == []
