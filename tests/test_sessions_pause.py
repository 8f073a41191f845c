"""Sessions paused to disk and resumed where they were (isolation gvisor): real runsc
checkpoints through the real Docker Engine (experimental mode, turned on by setup).
Automatic pauses, quotas, a pause during a call and the MCP tools: test_sessions_pause_more.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from execbox.engine import _checkpoints
from execbox.engine.base import Engine
from execbox.engine.docker import DockerEngine
from execbox.exceptions import SessionStateError
from execbox.sessions import RECORD_KIND, Sessions
from execbox.sessions.pausing import CHECKPOINT
from execbox.state.sqlite import SQLiteStateStore

from .support import eventually
from .test_sessions import container_gone, sessions_over

pytestmark = pytest.mark.docker


def container_of(store: SQLiteStateStore, session_id: str, tenant: str = "default") -> str:
    record = store.get_record(RECORD_KIND, f"{tenant}/{session_id}")
    assert record is not None
    return str(record["container_id"])


def checkpoint_dir(engine: Engine, cid: str) -> Path:
    assert isinstance(engine, DockerEngine)
    path = engine.checkpoint_dir(cid, CHECKPOINT)
    assert path is not None, "the engine's data root is not visible here"
    return path


def test_variables_files_and_the_repl_survive_pause_and_resume(engine: Engine, tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store, start_reaper=False) as sessions:
        s = sessions.create("alice", "python", isolation="gvisor")
        sessions.execute(s.id, "import json\nx = 41\nopen('/work/note.txt', 'w').write('kept')")
        info = sessions.pause(s.id)
        assert info.paused and sessions.get(s.id).paused
        cid = container_of(store, s.id)
        assert not engine.state(cid).running  # holds no memory or CPU while paused
        # Its checkpoint is on the engine's disk, measured and counted for the tenant.
        on_disk = checkpoint_dir(engine, cid)
        assert on_disk.is_dir() and info.checkpoint_bytes > 0
        # Its image is kept beside the container, linked from the checkpoint (_checkpoints.py).
        aside = _checkpoints.aside_dir(on_disk)
        links = list(on_disk.iterdir())
        assert links and all(f.is_symlink() and f.resolve().parent == aside for f in links), links
        assert info.checkpoint_bytes >= sum(f.stat().st_size for f in aside.iterdir()) > 1 << 20
        assert sessions.checkpoint_usage("default") == info.checkpoint_bytes
        assert sessions.pause(s.id).paused  # pausing again changes nothing
        # A call resumes it and says so; variables, imports and files are where they were.
        r = sessions.execute(s.id, "print(json.dumps(x + 1), open('/work/note.txt').read())")
        assert (r.stdout, r.exit_code, r.repl_reset) == ("42 kept\n", 0, False), r.stderr
        assert r.resumed and r.resume_ms is not None and r.resume_ms > 0
        assert not sessions.get(s.id).paused and engine.state(cid).running
        assert sessions.checkpoint_usage("default") == 0
        eventually(lambda: not on_disk.exists(), timeout=30, what="the used checkpoint deleted")  # off the path
        eventually(lambda: not aside.exists(), timeout=30, what="its image deleted")
        assert not sessions.resume(s.id).paused  # resuming a running session changes nothing
        again = sessions.execute(s.id, "x += 1\nprint(x)")
        assert (again.stdout, again.resumed) == ("42\n", False)
    store.close()


@pytest.mark.parametrize(
    ("language", "step", "show"),
    [
        ("python", "n = globals().get('n', 0) + 1", "print(n)"),
        ("javascript", "globalThis.n = (globalThis.n || 0) + 1", "console.log(n)"),
    ],
)
def test_a_session_pauses_and_resumes_again_and_again(
    engine: Engine, tmp_path: Path, language: str, step: str, show: str
) -> None:
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store, start_reaper=False) as sessions:
        s = sessions.create("alice", language, isolation="gvisor")
        for cycle in range(1, 4):
            sessions.execute(s.id, step)
            assert sessions.pause(s.id).paused
            if cycle % 2:
                r = sessions.execute(s.id, show)  # resumed by the call
                assert r.resumed, (cycle, r.stderr)
            else:
                assert not sessions.resume(s.id).paused  # resumed when asked
                r = sessions.execute(s.id, show)
                assert not r.resumed
            assert (r.stdout, r.exit_code, r.repl_reset) == (f"{cycle}\n", 0, False), (cycle, r.stderr)
    store.close()


def test_a_paused_sessions_checkpoint_goes_with_it(engine: Engine, tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store, start_reaper=False) as sessions:
        s = sessions.create("alice", "python", isolation="gvisor")
        sessions.execute(s.id, "blob = bytearray(8 << 20)")
        sessions.pause(s.id)
        cid = container_of(store, s.id)
        on_disk = checkpoint_dir(engine, cid)
        assert sum(f.stat().st_size for f in on_disk.rglob("*") if f.is_file()) > 0
        sessions.delete(s.id)
        assert container_gone(engine, cid)
        assert not on_disk.exists() and not on_disk.parent.parent.exists()  # nothing of it left on disk
        assert sessions.checkpoint_usage("default") == 0
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

    cfg = settings(
        None,
        no_auth=True,
        data_dir=str(tmp_path / "data"),
        session_store_url=f"sqlite:///{tmp_path}/s.db",
        session_pause_after=300,
    )
    with live_server(engine, cfg, pool=False) as srv, srv.client(None) as c:
        made = c.post("/v1/sessions", json={"user_id": "alice", "language": "python", "isolation": "gvisor"})
        assert made.status_code == 201, made.text
        assert made.json()["pause_after"] == 300  # the service's default, for gvisor sessions
        sid = made.json()["id"]
        assert c.post(f"/v1/sessions/{sid}/execute", json={"code": "y = 20"}).status_code == 200
        paused = c.post(f"/v1/sessions/{sid}/pause")
        assert paused.status_code == 200 and paused.json()["paused"], paused.text
        assert paused.json()["checkpoint_bytes"] > 0
        r = c.post(f"/v1/sessions/{sid}/execute", json={"code": "print(y + 22)"}).json()
        assert (r["stdout"], r["resumed"]) == ("42\n", True)
        plain = c.post("/v1/sessions", json={"user_id": "alice", "language": "python"}).json()
        assert plain["pause_after"] is None  # the default is for gvisor sessions only
        refused = c.post(f"/v1/sessions/{plain['id']}/pause")
        assert refused.status_code == 409 and refused.json()["error"]["field"] == "isolation", refused.text
        # pause_after asked for where it cannot be: 422 naming it, nothing created.
        for body in (
            {"user_id": "alice", "language": "python", "isolation": "container", "pause_after": 5},
            {"user_id": "alice", "language": "python", "isolation": "gvisor", "pause_after": 5, "idle_timeout": 5},
            {"user_id": "alice", "language": "python", "isolation": "gvisor", "pause_after": 0},
            {"user_id": "alice", "language": "python", "isolation": "gvisor", "pause_after": "soon"},
        ):
            bad = c.post("/v1/sessions", json=body)
            assert bad.status_code == 422 and bad.json()["error"]["field"] == "pause_after", bad.text
        for s in (sid, plain["id"]):
            assert c.delete(f"/v1/sessions/{s}").status_code == 204


def test_pause_after_is_checked_where_it_cannot_apply(engine: Engine, tmp_path: Path) -> None:
    from execbox.exceptions import InvalidRequestError

    store = SQLiteStateStore(tmp_path / "sessions.db")
    with Sessions(engine, store, start_reaper=False) as sessions:
        for kwargs in (
            {"isolation": "container", "pause_after": 30},
            {"isolation": "gvisor", "pause_after": 600, "idle_timeout": 600},
            {"isolation": "gvisor", "pause_after": -1},
        ):
            with pytest.raises(InvalidRequestError) as info:
                sessions.create("alice", "python", **kwargs)  # type: ignore[arg-type]
            assert info.value.field == "pause_after"
        assert sessions.list("default") == []  # nothing was created
    store.close()


def test_a_resume_takes_the_stream_attached_before_the_restore(engine: Engine, tmp_path: Path) -> None:
    """Told of the pause, the agent serves the stream its resumer attached: no relay is started,
    also for a session this process adopted (its link to it was a relay) and after a restart."""
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store, start_reaper=False) as first:
        s = first.create("alice", "python", isolation="gvisor")
        first.execute(s.id, "x = 1")
        first.pause(s.id)
        record = store.get_record(RECORD_KIND, f"default/{s.id}")
        assert record is not None and record["resume_attach"]  # the agent was told
        assert isinstance(engine, DockerEngine)
        host = engine.api.inspect_container(record["container_id"])["HostConfig"]
        assert (host["CpuPeriod"], host["CpuQuota"], host["NanoCpus"]) == (1_000_000, 1_000_000, 0)  # 1 cpu, 1 s window
        r = first.execute(s.id, "print(x)")
        assert (r.stdout, r.resumed, first._links[s.id].via) == ("1\n", True, "attach"), r.stderr
        with sessions_over(engine, store, start_reaper=False) as second:
            assert second.execute(s.id, "x += 1").exit_code == 0
            assert second._links[s.id].via == "relay"  # adopted
            second.pause(s.id)
            r = second.execute(s.id, "print(x)")
            assert (r.stdout, r.resumed, second._links[s.id].via) == ("2\n", True, "attach"), r.stderr
            assert not first.get(s.id).paused
    store.close()


def test_an_agent_not_told_of_the_pause_is_reached_through_a_relay(engine: Engine, tmp_path: Path) -> None:
    """A checkpoint whose agent was not told (made before this existed): resumed through a relay.
    An agent told of a pause that did not happen serves the relay of the next call, and its next
    pause and resume take the attached stream again."""
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store, start_reaper=False) as sessions:
        s = sessions.create("alice", "javascript", isolation="gvisor")
        sessions.execute(s.id, "globalThis.n = 41")
        sessions.pause(s.id)
        record = store.get_record(RECORD_KIND, f"default/{s.id}")
        assert record is not None
        store.put_record(RECORD_KIND, f"default/{s.id}", {**record, "resume_attach": False}, 600, "update")
        r = sessions.execute(s.id, "console.log(n + 1)")
        assert (r.stdout, r.resumed, sessions._links[s.id].via) == ("42\n", True, "relay"), r.stderr
        rec = sessions._record("default", s.id)
        assert sessions._tell_pause(rec)  # told, then no checkpoint: the next call comes through a relay
        r = sessions.execute(s.id, "console.log(n + 2)")
        assert (r.stdout, r.resumed, sessions._links[s.id].via) == ("43\n", False, "relay"), r.stderr
        sessions.pause(s.id)
        r = sessions.execute(s.id, "console.log(n + 3)")
        assert (r.stdout, r.resumed, sessions._links[s.id].via) == ("44\n", True, "attach"), r.stderr
        # Another process tells it of a pause that does not happen: this one's stream still serves.
        with Sessions(engine, store, start_reaper=False) as other:
            assert other._tell_pause(other._record("default", s.id))
        r = sessions.execute(s.id, "console.log(n + 4)")
        assert (r.stdout, r.resumed, sessions._links[s.id].via) == ("45\n", False, "attach"), r.stderr
    store.close()


def test_a_retried_restore_gives_the_agent_a_stream_of_its_own(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dockerd ends the streams attached to a start that failed, so a restore retried after an
    engine race attaches again for each try: the agent takes the last one (not a relay)."""
    assert isinstance(engine, DockerEngine)
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store, start_reaper=False) as sessions:
        s = sessions.create("alice", "python", isolation="gvisor")
        sessions.execute(s.id, "x = 1")
        sessions.pause(s.id)
        post, failed = engine.api._post, []

        def first_start_fails(url: str, **kwargs: Any) -> Any:
            if url.endswith("/start") and (kwargs.get("params") or {}).get("checkpoint") == CHECKPOINT and not failed:
                failed.append(url)
                kwargs["params"] = {"checkpoint": "execbox-missing"}  # a start that really fails in dockerd
            return post(url, **kwargs)

        known = _checkpoints.transient_restore_error
        monkeypatch.setattr(engine.api, "_post", first_start_fails)
        monkeypatch.setattr(_checkpoints, "transient_restore_error", lambda m: known(m) or "execbox-missing" in m)
        r = sessions.execute(s.id, "print(x)")
        assert failed and (r.stdout, r.exit_code, r.resumed) == ("1\n", 0, True), r.stderr
        assert sessions._links[s.id].via == "attach"
    store.close()
