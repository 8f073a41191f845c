"""A run's agent stays after its answer until the host lets it go (or ``linger`` passed),
so that the engine's work on the container's end is off the caller's path."""

from __future__ import annotations

import time

from execbox import Executor
from execbox.agentlink import CallOutput
from execbox.engine.base import Engine
from execbox.hardening import WORKDIR
from execbox.pool import Profile
from execbox.runtimes import get_runtime


def request(linger: float | None) -> dict[str, object]:
    runtime = get_runtime("python")
    return {
        "argv": list(runtime.argv),
        "filename": runtime.filename,
        "code": "print(1)",
        "env": runtime.environment({}),
        "stdin": None,
        "files": {},
        "collect": [],
        "workdir": WORKDIR,
        "timeout": 10,
        "output_bytes": 1 << 20,
        "warm": False,
        "preload": None,
        "linger": linger,
    }


def answer(ex: Executor, linger: float | None) -> tuple[Engine, str]:
    profile = Profile.of(get_runtime("python"), ex.image, ex.config.default_limits, "none")
    sb = ex.factory.make(profile)
    sb.link.send_json(request(linger))
    call = CallOutput(1 << 20)
    meta = sb.link.read_call(time.monotonic() + 30, call)
    assert meta["exit_code"] == 0 and call.stdout.text() == "1\n"
    return ex.engine, sb.id


def test_an_agent_lingers_after_its_answer_until_let_go(engine: Engine) -> None:
    with Executor(engine=engine, pool=False) as ex:
        eng, sid = answer(ex, 30.0)
        sb = next(s for s in ex.factory.live() if s.id == sid)
        try:
            assert eng.wait(sid, 1.0).running  # still there a second after its answer
            sb.let_go()
            state = eng.wait(sid, 20.0)
            assert not state.running and state.exit_code == 0
        finally:
            ex.factory.destroy(sb)


def test_without_linger_an_agent_ends_with_its_answer(engine: Engine) -> None:
    with Executor(engine=engine, pool=False) as ex:
        eng, sid = answer(ex, None)
        sb = next(s for s in ex.factory.live() if s.id == sid)
        try:
            state = eng.wait(sid, 20.0)  # nobody lets it go: it ends by itself
            assert not state.running and state.exit_code == 0
        finally:
            ex.factory.destroy(sb)
