"""The warm pool against the real Docker Engine (behaviour shared with the no-pool
path is covered by the parametrized ``executor`` fixture in the other test files)."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest

from execbox import Executor
from execbox.engine.base import Engine
from execbox.pool import Profile
from execbox.runtimes import get_runtime
from tests.conftest import busy, ours
from tests.support import eventually

pytestmark = pytest.mark.docker


@pytest.fixture
def pooled(engine: Engine) -> Iterator[Executor]:
    ex = Executor(engine=engine, pool=True, pool_languages=("python",), pool_min_ready=2)
    yield ex
    ex.close()
    left = ours(engine)
    for cid in left:
        engine.remove(cid)
    assert not left, f"leaked {len(left)} containers"


def profile_of(ex: Executor, language: str = "python") -> Profile:
    return Profile.of(get_runtime(language), ex.image, ex.config.default_limits)


def test_pool_fills_and_hands_out_each_sandbox_once(pooled: Executor) -> None:
    assert pooled.pool is not None
    eventually(lambda: pooled.pool.ready_count(profile_of(pooled)) == 2)  # type: ignore[union-attr]
    ready_before = pooled.pool.ready_ids()
    results = [pooled.execute("import os; print(os.getpid())", language="python") for _ in range(6)]
    ids = [r.sandbox_id for r in results]
    assert len(set(ids)) == 6  # never reused
    assert ids[0] in ready_before  # the first came ready from the pool
    stats = pooled.pool_stats()
    assert stats is not None and stats.hits >= 1 and stats.hits + stats.misses == 6
    assert pooled.drain()
    assert busy(pooled) == set()
    # Used sandboxes are gone from the engine; the pool refilled with new ones.
    eventually(lambda: pooled.pool.ready_count(profile_of(pooled)) == 2)  # type: ignore[union-attr]
    assert not set(ids) & pooled.pool.ready_ids()


def test_other_profiles_and_languages_are_served_fresh(pooled: Executor) -> None:
    r = pooled.execute("console.log('js')", language="javascript", limits={"memory": "128m"})
    assert r.stdout == "js\n"
    r = pooled.execute("echo sh", language="bash")
    assert r.stdout == "sh\n"


def test_expired_sandboxes_are_replaced(engine: Engine) -> None:
    with Executor(engine=engine, pool=True, pool_languages=("python",), pool_min_ready=1, pool_max_idle_age=1.0) as ex:
        assert ex.pool is not None
        eventually(lambda: ex.pool.ready_count(profile_of(ex)) == 1)  # type: ignore[union-attr]
        first = ex.pool.ready_ids()
        eventually(lambda: ex.pool_stats().expired >= 1 and ex.pool.ready_ids() - first)  # type: ignore[union-attr]
        assert ex.execute("print('fresh')", language="python").stdout == "fresh\n"
    assert ours(engine) == []


def test_global_cap_on_pooled_sandboxes(engine: Engine) -> None:
    with Executor(engine=engine, pool=True, pool_min_ready=3, pool_max_total=2) as ex:
        eventually(lambda: ex.pool_stats().ready == 2, 60)  # type: ignore[union-attr]
        # Two more passes of the refiller, each wanting 4 more sandboxes than the cap allows.
        passes = ex.pool_stats().refill_passes  # type: ignore[union-attr]
        eventually(lambda: ex.pool_stats().refill_passes >= passes + 2, 30)  # type: ignore[union-attr]
        stats = ex.pool_stats()
        assert stats is not None and stats.ready + stats.creating <= 2 and stats.created == 2
        assert len([sb for sb in ex.factory.live() if not sb.leased]) <= 2
    assert ours(engine) == []


def test_close_removes_every_pooled_container(engine: Engine) -> None:
    ex = Executor(engine=engine, pool=True, pool_min_ready=2)
    eventually(lambda: ex.pool_stats().ready == 4)  # type: ignore[union-attr]
    assert len(ours(engine)) >= 4
    ex.close()
    assert ours(engine) == []


def test_empty_pool_waits_for_a_fresh_container(engine: Engine) -> None:
    with Executor(engine=engine, pool=True, pool_min_ready=0) as ex:
        r = ex.execute("print('made on demand')", language="python")
        stats = ex.pool_stats()
        assert r.stdout == "made on demand\n"
        assert stats is not None and (stats.hits, stats.misses) == (0, 1)
    assert ours(engine) == []


def test_burst_of_200_runs_with_timeouts_and_kills_leaks_nothing(engine: Engine) -> None:
    rng = random.Random(7)
    cases = [
        ("print('ok')", None, "ok\n"),
        ("import time; time.sleep(5)", 0.3, None),  # timeout
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", None, None),  # killed
        ("import os; os.kill(1, 9); print('x')", None, None),  # kills init (not permitted / no effect)
        ("raise SystemExit(4)", None, None),
    ]
    plan = [rng.choice(cases) for _ in range(200)]
    seen: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    with Executor(engine=engine, pool=True, pool_min_ready=2, pool_max_total=6) as ex:

        def worker(items: list[tuple[str, float | None, str | None]]) -> None:
            for code, timeout, expect in items:
                try:
                    r = ex.execute(code, language="python", timeout=timeout)
                    if expect is not None:
                        assert r.stdout == expect, r
                    if timeout is not None:
                        assert r.timed_out, r
                    with lock:
                        seen.append(r.sandbox_id)
                except BaseException as exc:  # report in the main thread
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(plan[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert len(seen) == 200 and len(set(seen)) == 200
        assert ex.drain()
        assert busy(ex) == set()
    assert ours(engine) == []
