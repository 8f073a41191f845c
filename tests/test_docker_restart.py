"""Docker Engine restarts under a running executor (disruptive: run alone, last).

scripts/test.sh runs these in a separate pytest invocation after everything else,
because restarting dockerd breaks whatever else is using it at that moment.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from execbox import EngineUnavailableError, Executor
from execbox.engine.base import Engine
from tests.conftest import ours
from tests.support import eventually
from tests.test_docker_pool import profile_of

pytestmark = [pytest.mark.docker, pytest.mark.disruptive]


def _dockerd_pid() -> int:
    out = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    if len(out) != 1:
        pytest.fail(f"expected one dockerd process, found {out}")
    return int(out[0])


def _stop_dockerd() -> None:
    pid = _dockerd_pid()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError("dockerd did not stop")


def _start_dockerd(engine: Engine) -> None:
    # Detached through a shell that exits at once, as scripts/setup.sh starts it.
    subprocess.run(["sh", "-c", "setsid nohup dockerd >>/var/log/execbox-dockerd.log 2>&1 </dev/null &"], check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            engine.ping()
            return
        except EngineUnavailableError:
            time.sleep(0.2)
    raise AssertionError("dockerd did not come back")


def test_pool_recovers_after_docker_restarts(engine: Engine) -> None:
    ex = Executor(engine=engine, pool=True, pool_languages=("python",), pool_min_ready=2)
    try:
        assert ex.pool is not None
        eventually(lambda: ex.pool.ready_count(profile_of(ex)) == 2)  # type: ignore[union-attr]
        _stop_dockerd()
        try:
            # Engine down: a clear error, not a hang or a crash.
            with pytest.raises(EngineUnavailableError):
                ex.execute("print(1)", language="python")
        finally:
            _start_dockerd(engine)
        # The sandboxes made before the restart are dead: they are skipped, not handed out.
        r = ex.execute("print('after restart')", language="python")
        assert r.stdout == "after restart\n" and r.exit_code == 0
        eventually(lambda: ex.pool.ready_count(profile_of(ex)) == 2, timeout=90)  # type: ignore[union-attr]
        stats = ex.pool_stats()
        assert stats is not None and stats.dead >= 1
        assert ex.execute("print(2)", language="python").stdout == "2\n"
    finally:
        ex.close()
        gc.collect()  # a socket leaked while the engine was down would be reported here
    assert ours(engine) == []


def test_a_paused_session_resumes_after_docker_restarts(engine: Engine, tmp_path: Path) -> None:
    # Its checkpoint (the image kept beside the container, linked from it) outlives dockerd.
    from execbox.sessions import Sessions
    from execbox.state.sqlite import SQLiteStateStore

    store = SQLiteStateStore(tmp_path / "sessions.db")
    sessions = Sessions(engine, store, start_reaper=False)
    try:
        s = sessions.create("alice", "javascript", isolation="gvisor")
        sessions.execute(s.id, "globalThis.x = 41")
        assert sessions.pause(s.id).paused
        _stop_dockerd()
        _start_dockerd(engine)
        r = sessions.execute(s.id, "console.log(x + 1)")
        assert (r.stdout, r.exit_code, r.resumed) == ("42\n", 0, True), r.stderr
        sessions.delete(s.id)
    finally:
        sessions.close()
        store.close()
    assert ours(engine) == []
