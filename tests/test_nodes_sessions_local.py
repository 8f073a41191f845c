"""Sessions on nodes without Docker: two ``Node`` objects with their ``NodeSessions`` over the in-package
local engine (the real session agent as local processes, NO isolation) and a ``SessionDispatcher``, all on
one event loop over a real Redis. Fast checks of the protocol; the real thing (processes, Docker, SIGKILL)
is tests/test_nodes_sessions.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from execbox import Executor, Sessions
from execbox.engine.local import LocalEngine
from execbox.exceptions import InvalidRequestError, SessionLimitError, SessionNotFoundError
from execbox.node import Node
from execbox.node_sessions import NodeSessions
from execbox.server.dispatch_sessions import SessionDispatcher
from execbox.server.errors import ApiError
from execbox.sessions import SessionExecuteRequest
from execbox.state.keys import node_key, session_node_key
from execbox.state.sqlite import SQLiteStateStore

Body = Callable[[SessionDispatcher, dict[str, Node]], Awaitable[None]]


@pytest.fixture
def cluster(redis_url: str, tmp_path: Path) -> Callable[[Body], None]:
    url = redis_url.rsplit("/", 1)[0] + "/11"

    def runner(body: Body) -> None:
        engine = LocalEngine()
        made: list[Any] = []

        async def main() -> None:
            r = aioredis.Redis.from_url(url, decode_responses=True)
            await r.flushdb()
            stop = asyncio.Event()
            nodes: dict[str, Node] = {}
            serving = []
            for name in ("n1", "n2"):
                data = tmp_path / name
                ex = Executor(engine=engine, pool=False, data_dir=str(data), sweep_on_start=False)
                store = SQLiteStateStore(data / "sessions.db")
                sessions = Sessions(engine, store, image="local", start_reaper=False, data_dir=str(data))
                made.extend([ex, sessions, store])
                node = Node(ex, r, name, slots=2, ttl=2.0)
                node.sessions = NodeSessions(node, sessions)
                nodes[name] = node
                serving.append(asyncio.create_task(node.serve(stop)))
            try:
                while not all([await r.exists(node_key(n)) for n in nodes]):
                    await asyncio.sleep(0.02)
                await body(SessionDispatcher(r), nodes)
            finally:
                stop.set()
                await asyncio.gather(*serving, return_exceptions=True)
                await r.flushdb()
                await r.aclose()

        try:
            asyncio.run(main())
        finally:
            for thing in made:
                thing.close()
            engine.close()

    return runner


def _create_body(user: str, **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "language": "python", "limits": {"timeout": 5}, **extra}


def _call(code: str | None = None, **extra: Any) -> str:
    return SessionExecuteRequest.model_validate({"code": code, **extra}).model_dump_json()


def test_creations_spread_calls_stick_and_records_follow(cluster: Callable[[Body], None]) -> None:
    async def body(d: SessionDispatcher, nodes: dict[str, Node]) -> None:
        infos = [await d.create("t1", f"u{i}", _create_body(f"u{i}"), "", 3) for i in range(6)]
        assert all(i.node in nodes for i in infos)
        for info in infos:
            await d.execute("t1", info.id, _call(f"v = '{info.node}'"), None)
        for info in infos:
            r = await d.execute("t1", info.id, _call("print(v)"), None)
            assert r.node == info.node and r.stdout == f"{info.node}\n" and r.call == 2
        listed = await d.list("t1")
        assert [s.id for s in listed] == [i.id for i in infos] and all(s.calls == 2 for s in listed)
        assert await d.list("t2") == []
        # Files in and out.
        r = await d.execute("t1", infos[0].id, _call(files={"a.txt": b"A"}, collect=["*.txt"]), None)
        assert r.files == {"a.txt": b"A"}
        # Another tenant: unknown, on the API side and on the node's side.
        with pytest.raises(SessionNotFoundError):
            await d.execute("t2", infos[0].id, _call("print(v)"), None)
        raw = await d.r.get(session_node_key("t1", infos[0].id))
        await d.r.set(session_node_key("t2", infos[0].id), raw.replace('"tenant": "t1"', '"tenant": "t2"'))
        with pytest.raises(SessionNotFoundError):  # the node checks the tenant in its own registry
            await d.execute("t2", infos[0].id, _call("print(v)"), None)
        # Errors of the node's library come back as the same classes, fields included.
        with pytest.raises(InvalidRequestError) as bad:
            await d.create("t1", "u9", _create_body("u9", idle_timeout=10**9), "", 3)
        assert bad.value.field == "idle_timeout"
        # The per-user cap counts every node's sessions.
        for _ in range(2):
            await d.create("t1", "u0", _create_body("u0"), "", 3)
        with pytest.raises(SessionLimitError):
            await d.create("t1", "u0", _create_body("u0"), "", 3)
        # Delete: gone from the node and from the records.
        await d.call("t1", infos[1].id, "delete")
        with pytest.raises(SessionNotFoundError):
            await d.info("t1", infos[1].id, "get")
        assert infos[1].id not in {s.id for s in await d.list("t1")}

    cluster(body)


def test_a_node_gone_makes_its_sessions_410_and_a_restart_brings_them_back(cluster: Callable[[Body], None]) -> None:
    async def body(d: SessionDispatcher, nodes: dict[str, Node]) -> None:
        infos = [await d.create("t1", f"u{i}", _create_body(f"u{i}"), "", 3) for i in range(4)]
        victim = infos[0].node
        # The node's liveness key gone (as when it dies): 410 naming it, and left out of the list.
        await d.r.delete(node_key(victim))
        with pytest.raises(ApiError) as lost:
            await d.execute("t1", infos[0].id, _call("print(1)"), None)
        assert lost.value.status == 410 and lost.value.type == "node_lost" and victim in lost.value.message
        listed = {s.id for s in await d.list("t1")}
        assert infos[0].id not in listed
        # Its next status publish (a third of the TTL) brings it back: the same sessions answer again.
        deadline = time.monotonic() + 10
        while not await d.r.exists(node_key(victim)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        r = await d.execute("t1", infos[0].id, _call("print(1)"), None)
        assert r.node == victim and r.stdout == "1\n"
        assert {i.node for i in infos} <= set(nodes)

    cluster(body)


def test_a_nodes_sessions_take_the_services_session_settings(tmp_path: Path) -> None:
    """One recipe for the API's and a node's ``Sessions``: the settings' defaults apply on nodes too."""
    from execbox.node_sessions import node_sessions
    from execbox.settings import Settings

    settings = Settings(
        data_dir=str(tmp_path),
        session_pause_after=120,
        session_checkpoint_quota=1 << 20,
        session_idle_timeout=300,
        session_max_per_user=5,
    )
    engine = LocalEngine()
    ex = Executor(engine=engine, pool=False, data_dir=str(tmp_path), sweep_on_start=False)
    try:
        sessions = node_sessions(settings, ex)
        try:
            cfg = sessions.config
            assert (cfg.pause_after, cfg.checkpoint_quota, cfg.idle_timeout, cfg.max_per_user) == (120, 1 << 20, 300, 5)
            assert (cfg.image, cfg.default_limits) == (ex.image, ex.config.default_limits)
        finally:
            sessions.close()
    finally:
        ex.close()
        engine.close()
