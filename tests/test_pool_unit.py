"""Executor and pool logic on the in-package fake engine (local agent processes, no
isolation, no Docker): fast checks of what the Docker tests check for real."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from execbox import Executor
from execbox.engine.local import LocalEngine
from execbox.pool import Profile
from execbox.runtimes import get_runtime
from tests.support import eventually


@pytest.fixture
def local() -> Iterator[LocalEngine]:
    eng = LocalEngine()
    yield eng
    eng.close()


def make(eng: LocalEngine, **options: object) -> Executor:
    return Executor(engine=eng, image="execbox-sandbox:test", **options)  # type: ignore[arg-type]


def profile(ex: Executor, language: str = "python") -> Profile:
    return Profile.of(get_runtime(language), ex.image, ex.config.default_limits)


def test_runs_each_language_through_the_agent(local: LocalEngine) -> None:
    with make(local, pool=False) as ex:
        for language, code in (
            ("python", "import os, sys; print(os.environ['K']); sys.exit(3)"),
            ("javascript", "console.log(process.env.K); process.exit(3)"),
            ("bash", "echo $K; exit 3"),
        ):
            r = ex.execute(code, {"K": "v"}, language=language)
            assert (r.stdout, r.exit_code) == ("v\n", 3), (language, r.stderr)
    assert local.live() == []


def test_pool_hands_out_each_sandbox_once_and_refills(local: LocalEngine) -> None:
    with make(local, pool_languages=("python",), pool_min_ready=2) as ex:
        assert ex.pool is not None
        eventually(lambda: ex.pool.ready_count(profile(ex)) == 2)  # type: ignore[union-attr]
        ids = [ex.execute("print(1)", language="python").sandbox_id for _ in range(5)]
        assert len(set(ids)) == 5
        stats = ex.pool_stats()
        assert stats is not None and stats.hits >= 1 and stats.hits + stats.misses == 5
        eventually(lambda: ex.pool.ready_count(profile(ex)) == 2)  # type: ignore[union-attr]
        assert not set(ids) & ex.pool.ready_ids()
        assert ex.drain()
        assert not set(ids) & set(local.live())  # the used ones are gone
    assert local.live() == []


def test_global_cap_and_expiry(local: LocalEngine) -> None:
    with make(local, pool_min_ready=3, pool_max_total=2, pool_max_idle_age=0.5) as ex:
        eventually(lambda: ex.pool_stats().expired >= 2)  # type: ignore[union-attr]
        for _ in range(20):
            stats = ex.pool_stats()
            assert stats is not None and stats.ready + stats.creating <= 2
            time.sleep(0.02)
    assert local.live() == []


def test_dead_ready_sandbox_is_skipped(local: LocalEngine) -> None:
    with make(local, pool_languages=("python",), pool_min_ready=1) as ex:
        assert ex.pool is not None
        eventually(lambda: ex.pool.ready_count(profile(ex)) == 1)  # type: ignore[union-attr]
        (dead,) = ex.pool.ready_ids()
        local.kill(dead)
        local.wait(dead, 5)
        r = ex.execute("print('fine')", language="python")
        assert r.stdout == "fine\n" and r.sandbox_id != dead
        assert ex.pool_stats().dead == 1  # type: ignore[union-attr]


def test_host_enforces_the_timeout_when_the_agent_is_stopped(local: LocalEngine) -> None:
    with make(local, pool=False, kill_grace=0.2) as ex:
        r = ex.execute("kill -STOP $PPID; sleep 30", language="bash", timeout=0.3)
        assert r.timed_out and r.exit_code == 137
    assert local.live() == []


def test_output_cap_and_agent_timeout(local: LocalEngine) -> None:
    with make(local, pool=False) as ex:
        r = ex.execute("import sys; sys.stdout.write('x' * 100000)", language="python", limits={"output_bytes": 100})
        assert len(r.stdout) == 100 and r.output_truncated
        r = ex.execute("while True: pass", language="python", timeout=0.3)
        assert r.timed_out and r.signal == 9


def test_close_removes_everything(local: LocalEngine) -> None:
    ex = make(local, pool_min_ready=2)
    eventually(lambda: ex.pool_stats().ready == 4)  # type: ignore[union-attr]
    ex.close()
    assert local.live() == []
