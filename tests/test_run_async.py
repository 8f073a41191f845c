"""``Executor.run_async``: a pooled run read on an event loop (what the HTTP service does for
most runs) gives what ``run`` gives, holds no thread, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from execbox import Executor
from execbox.egress import NetworkPolicy
from execbox.engine.base import Engine
from execbox.exceptions import SandboxError
from execbox.models import ExecutionRequest, ExecutionResult

from .conftest import busy, ours

T = TypeVar("T")


async def offload(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


@pytest.fixture(scope="module")
def pooled(engine: Engine) -> Iterator[Executor]:
    ex = Executor(engine=engine, pool=True, pool_languages=("python", "javascript", "bash"))
    yield ex
    ex.close()
    left = ours(engine)
    for cid in left:
        engine.remove(cid)
    assert not left, f"test leaked {len(left)} containers"


def ready(ex: Executor, language: str = "python", n: int = 1) -> None:
    """Until ``n`` pooled sandboxes for ``language`` are ready (the loop's way needs one)."""
    ex.run(ExecutionRequest(code={"bash": "true"}.get(language, "0"), language=language))  # pools kept from now on
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.language == language and k >= n for p, k in ex.pool.ready_by_profile().items()):  # type: ignore[union-attr]
            return
        time.sleep(0.05)
    raise AssertionError("no pooled sandbox became ready")


def on_loop(ex: Executor, request: ExecutionRequest, **kw: Any) -> ExecutionResult | None:
    return asyncio.run(ex.run_async(request, offload, **kw))


CASES = [
    ("python", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)", {}),
    ("javascript", "console.log('hello'); process.exitCode = 2", {}),
    ("bash", "echo a; echo b >&2; exit 5", {}),
    ("python", "print('x' * 5000)", {"limits": {"output_bytes": 1000}}),
    ("python", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", {}),
    ("python", "import time; time.sleep(30)", {"timeout": 1}),
    ("python", "import os; print(os.environ['GREETING'], input())", {"env": {"GREETING": "hi"}, "stdin": "there\n"}),
]


@pytest.mark.parametrize(("language", "code", "fields"), CASES)
def test_the_loops_way_gives_what_run_gives(pooled: Executor, language: str, code: str, fields: dict[str, Any]) -> None:
    request = ExecutionRequest.model_validate({"code": code, "language": language, **fields})
    ready(pooled, language)
    on = on_loop(pooled, request)
    assert on is not None, "a ready pooled sandbox takes this run on the loop"
    off = pooled.run(request)
    keys = ("stdout", "stderr", "exit_code", "signal", "timed_out", "oom_killed", "output_truncated", "language")
    assert {k: getattr(on, k) for k in keys} == {k: getattr(off, k) for k in keys}
    assert on.sandbox_id != off.sandbox_id
    assert pooled.drain(30)
    assert not busy(pooled)


def test_runs_that_need_more_than_a_ready_sandbox_are_left_to_run(engine: Engine, pooled: Executor) -> None:
    ready(pooled)
    needs_more = [
        ExecutionRequest(code="print(1)", language="python", user_id="u1", persist_state=True),
        ExecutionRequest(code="print(1)", language="python", user_id="u1", volume=True),
        ExecutionRequest(code="print(1)", language="python", network=NetworkPolicy(mode="proxy", allow=["a.test"])),
        ExecutionRequest(code="print(1)", language="python", image="no-such-package-image"),
    ]
    before = sum(pooled.pool.ready_by_profile().values())  # type: ignore[union-attr]
    for request in needs_more:
        assert on_loop(pooled, request) is None
    assert sum(pooled.pool.ready_by_profile().values()) == before  # type: ignore[union-attr]  # none taken
    with Executor(engine=engine, pool=False) as unpooled:
        assert on_loop(unpooled, ExecutionRequest(code="print(1)", language="python")) is None


def test_the_loop_keeps_serving_while_a_run_waits(pooled: Executor) -> None:
    ready(pooled)
    request = ExecutionRequest(code="import time; time.sleep(1); print('done')", language="python")
    ticks = 0

    async def main() -> ExecutionResult | None:
        nonlocal ticks
        run = asyncio.ensure_future(pooled.run_async(request, offload))
        while not run.done():
            ticks += 1
            await asyncio.sleep(0.01)
        return await run

    result = asyncio.run(main())
    assert result is not None and result.stdout == "done\n"
    # Blocked in the run, the loop would have ticked once or twice; it ticked all along.
    assert ticks >= 20


def test_a_sandbox_killed_under_a_run_is_a_sandbox_error(engine: Engine, pooled: Executor) -> None:
    ready(pooled)
    assert pooled.drain(30)  # the only sandbox leased from now on is this run's
    request = ExecutionRequest(code="import time; time.sleep(30)", language="python")

    def kill_the_leased_one() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for sid in busy(pooled):
                engine.kill(sid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_leased_one)
    killer.start()
    with pytest.raises(SandboxError, match="ended without a result"):
        on_loop(pooled, request)
    killer.join()
    assert pooled.drain(30)
    assert not busy(pooled)


def test_a_cancelled_run_takes_its_sandbox_with_it(pooled: Executor) -> None:
    ready(pooled)
    assert pooled.drain(30)
    request = ExecutionRequest(code="import time; time.sleep(30)", language="python")

    async def main() -> None:
        run = asyncio.ensure_future(pooled.run_async(request, offload))
        while not busy(pooled):
            await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(main())
    assert pooled.drain(30)
    assert not busy(pooled)


def test_runs_on_one_loop_at_once_each_get_their_own_answer(pooled: Executor) -> None:
    ready(pooled, n=2)

    async def main() -> list[ExecutionResult | None]:
        runs = [pooled.run_async(ExecutionRequest(code=f"print({i})", language="python"), offload) for i in range(2)]
        return list(await asyncio.gather(*runs))

    results = asyncio.run(main())
    assert [r.stdout if r is not None else None for r in results] == ["0\n", "1\n"]
    assert pooled.drain(30)
    assert not busy(pooled)
