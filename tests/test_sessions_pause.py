"""Sessions paused to disk and resumed where they were (isolation gvisor): real runsc
checkpoints through the real Docker Engine (experimental mode, turned on by setup)."""

from __future__ import annotations

from pathlib import Path

import pytest

from execbox.engine.base import Engine
from execbox.exceptions import SessionStateError
from execbox.sessions import RECORD_KIND
from execbox.state.sqlite import SQLiteStateStore

from .test_sessions import sessions_over

pytestmark = pytest.mark.docker


def _container(store: SQLiteStateStore, session_id: str) -> str:
    record = store.get_record(RECORD_KIND, f"default/{session_id}")
    assert record is not None
    return str(record["container_id"])


def test_variables_files_and_the_repl_survive_pause_and_resume(engine: Engine, tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store, start_reaper=False) as sessions:
        s = sessions.create("alice", "python", isolation="gvisor")
        sessions.execute(s.id, "import json\nx = 41\nopen('/work/note.txt', 'w').write('kept')")
        info = sessions.pause(s.id)
        assert info.paused and sessions.get(s.id).paused
        cid = _container(store, s.id)
        assert not engine.state(cid).running  # holds no memory or CPU while paused
        assert sessions.pause(s.id).paused  # pausing again changes nothing
        # A call resumes it and says so; variables, imports and files are where they were.
        r = sessions.execute(s.id, "print(json.dumps(x + 1), open('/work/note.txt').read())")
        assert (r.stdout, r.exit_code, r.repl_reset) == ("42 kept\n", 0, False), r.stderr
        assert r.resumed and r.resume_ms is not None and r.resume_ms > 0
        assert not sessions.get(s.id).paused and engine.state(cid).running
        assert not sessions.resume(s.id).paused  # resuming a running session changes nothing
        again = sessions.execute(s.id, "x += 1\nprint(x)")
        assert (again.stdout, again.resumed) == ("42\n", False)
        # This engine cannot restore a second checkpoint of a restored container: refused, session intact.
        with pytest.raises(SessionStateError) as info2:
            sessions.pause(s.id)
        assert info2.value.field == "session_id"
        assert sessions.execute(s.id, "print(x)").stdout == "42\n"
    store.close()


def test_a_new_sessions_over_the_same_registry_resumes_a_paused_session(engine: Engine, tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store, start_reaper=False) as first:
        s = first.create("alice", "python", isolation="gvisor")
        first.execute(s.id, "counter = 7")
        first.pause(s.id)
        first.close()  # a restart: the registry knows the session is paused
        with sessions_over(engine, store, start_reaper=False) as second:
            assert second.get(s.id).paused
            r = second.execute(s.id, "print(counter * 6)")
            assert (r.stdout, r.resumed) == ("42\n", True), r.stderr
    store.close()


def test_a_container_session_cannot_be_paused(engine: Engine, tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store, start_reaper=False) as sessions:
        s = sessions.create("alice", "python")
        with pytest.raises(SessionStateError) as info:
            sessions.pause(s.id)
        assert info.value.field == "isolation"
        assert sessions.execute(s.id, "print(1)").stdout == "1\n"  # and it is unharmed
    store.close()


def test_pause_and_resume_over_http(engine: Engine, tmp_path: Path) -> None:
    from .serverkit import live_server, settings

    cfg = settings(None, no_auth=True, data_dir=str(tmp_path / "data"), session_store_url=f"sqlite:///{tmp_path}/s.db")
    with live_server(engine, cfg, pool=False) as srv, srv.client(None) as c:
        made = c.post("/v1/sessions", json={"user_id": "alice", "language": "python", "isolation": "gvisor"})
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
        assert c.post(f"/v1/sessions/{sid}/execute", json={"code": "y = 20"}).status_code == 200
        paused = c.post(f"/v1/sessions/{sid}/pause")
        assert paused.status_code == 200 and paused.json()["paused"], paused.text
        r = c.post(f"/v1/sessions/{sid}/execute", json={"code": "print(y + 22)"}).json()
        assert (r["stdout"], r["resumed"]) == ("42\n", True)
        plain = c.post("/v1/sessions", json={"user_id": "alice", "language": "python"}).json()["id"]
        refused = c.post(f"/v1/sessions/{plain}/pause")
        assert refused.status_code == 409 and refused.json()["error"]["field"] == "isolation", refused.text
        for s in (sid, plain):
            assert c.delete(f"/v1/sessions/{s}").status_code == 204
