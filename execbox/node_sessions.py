"""A node's sessions, and volume affinity: what lives on one host stays served by that host.

With ``execbox serve --queue-url`` the API replica holds no session. Creations go onto
the ``session-creates`` stream (a consumer group of every node, like runs): a node
takes one only while it has a free slot and room for another session, creates it in
its own ``Sessions`` (its registry in its own store, under its data dir) and records
the affinity in Redis:

* ``execbox:sesnode:<tenant>/<id>`` = ``{node, tenant, user_id, info}`` (TTL: the
  session's max lifetime left plus a grace), indexed by ``execbox:sesidx:<tenant>``
  (listing a tenant's sessions is one ZRANGE and one MGET, no node asked) and by
  ``execbox:nodeses:<node>`` (what a node holds, for its own reconciliation).

Every later operation on the session goes to the node's own stream
(``execbox:q:node:<name>``, a group that only that node reads) and is answered on
``execbox:reply:<id>`` exactly as runs are (a streaming caller's call: its output, then
the answer, on ``execbox:out:<id>``, as for runs: ``node_stream.py``). A node reconciles
its records with its registry at every pass (sessions ended by its reaper disappear,
live ones missing from Redis reappear), so a restarted node with the same name and data
dir serves its sessions again.

Volumes: see ``node_volumes.py`` (runs and backups of a user's volume go to the node that
holds it); their forwarded entries arrive on this same stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import redis.asyncio as aioredis
import redis.exceptions

from .egress import NetworkPolicy
from .exceptions import (
    ExecboxError,
    InvalidRequestError,
    SessionLimitError,
    SessionNotFoundError,
    SessionStateError,
)
from .models import Limits
from .node_stream import OutputPump
from .node_volumes import VOLUME_OPS, NodeVolumes
from .queue import Entry, StreamQueue
from .sessions import SessionExecuteRequest, SessionInfo, Sessions
from .sessions.models import LABEL_GRACE
from .state.keys import (
    node_sessions_key,
    node_stream,
    reply_key,
    run_key,
    session_index_key,
    session_node_key,
)

if TYPE_CHECKING:
    from .executor import Executor
    from .node import Node
    from .settings import Settings

__all__ = ["CREATES", "NODE_GROUP", "NodeSessions", "error_answer", "node_sessions"]

log = logging.getLogger("execbox.node")

CREATES = "session-creates"  # the stream of session creations; its group is every node's ("nodes")
NODE_GROUP = "node"  # the group of a node's own stream: that node alone
INDEX_TTL = 86400.0 + LABEL_GRACE  # the indexes outlive any session (the longest lifetime a client may ask)
REPLY_TTL = 60.0
MAX_OPS = 64  # session operations handled at once (calls on one session are serialized by its lock)


def error_answer(exc: ExecboxError) -> dict[str, Any]:
    """A library error as a reply: enough for the API replica to raise the same one."""
    err: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, InvalidRequestError):
        err["message"], err["field"] = exc.message, exc.field
    elif isinstance(exc, SessionStateError):
        err["field"] = exc.field
    elif isinstance(exc, SessionLimitError):
        err["scope"], err["retry_after"] = exc.scope, exc.retry_after
    return {"error": err}


def _px(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class NodeSessions:
    """The session side of one ``Node``: creations it takes, its own stream, its records in Redis."""

    def __init__(self, node: Node, sessions: Sessions | None, volume_ttl: float = 30 * 86400) -> None:
        """``sessions`` None: this node serves no sessions (``EXECBOX_SESSIONS=false``), volumes still."""
        self.node, self._sessions = node, sessions
        self.r: aioredis.Redis = node.r
        self.name = node.name
        self.volumes = NodeVolumes(node, volume_ttl, self._reply, NODE_GROUP)
        self.creates = StreamQueue(self.r, CREATES, "nodes", node.name)
        self.own = StreamQueue(self.r, node_stream(node.name), NODE_GROUP, node.name)
        self._ops = asyncio.Semaphore(MAX_OPS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._live = 0  # live sessions in this node's registry (at the last pass, plus creations since)
        self._creating = 0

    # -- start and stop -------------------------------------------------------------------------

    async def start(self) -> list[asyncio.Task[None]]:
        """Groups, stale entries dropped, records reconciled; the loops to cancel at stop."""
        for queue in (self.creates, self.own):
            await queue.ensure_group()
            await self._drop_stale(queue)
        loop = asyncio.get_running_loop()
        loops = [loop.create_task(self.own.pull(self._ops, self._start_op, block=1.0))]
        if self._sessions is not None:
            await self.sync()
            loops += [loop.create_task(self._pull_creates()), loop.create_task(self._sync_loop())]
        return loops

    @property
    def live(self) -> int:
        """Live sessions this node holds (as of its last pass, plus creations since)."""
        return self._live

    @property
    def sessions(self) -> Sessions:
        if self._sessions is None:
            raise SessionNotFoundError("this node serves no sessions")
        return self._sessions

    async def divert(self, entry: Entry) -> bool:
        """A run taken from the shared stream that is another node's (its user's volume): see node_volumes."""
        return await self.volumes.divert(entry)

    async def finish(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def _drop_stale(self, queue: StreamQueue) -> None:
        """Entries this name held in an earlier life: their callers were answered ``node_lost``."""
        pending = await self.r.xpending_range(queue.key, queue.group, "-", "+", 1000, consumername=self.name)
        for p in pending:
            log.warning("dropping %s held by this node before it restarted", p["message_id"])
            await queue.ack(str(p["message_id"]))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def wrapped() -> None:
            try:
                await work
            except Exception:
                log.exception("session work failed in the node")

        task = asyncio.get_running_loop().create_task(wrapped())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- records in Redis -----------------------------------------------------------------------

    async def publish(self, tenant: str, info: SessionInfo) -> None:
        """Record that this node holds the session (affinity, listing): TTL bounded by its lifetime."""
        info.node = self.name
        ttl = max(info.created_at + info.max_lifetime - time.time(), 0.0) + LABEL_GRACE
        value = {"node": self.name, "tenant": tenant, "user_id": info.user_id, "info": info.model_dump(mode="json")}
        async with self.r.pipeline(transaction=True) as p:
            p.set(session_node_key(tenant, info.id), json.dumps(value), px=_px(ttl))
            p.zadd(session_index_key(tenant), {info.id: info.expires_at})
            p.pexpire(session_index_key(tenant), _px(INDEX_TTL))
            p.zadd(node_sessions_key(self.name), {f"{tenant}/{info.id}": info.expires_at})
            p.pexpire(node_sessions_key(self.name), _px(INDEX_TTL))
            await p.execute()

    async def forget(self, tenant: str, session_id: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.delete(session_node_key(tenant, session_id))
            p.zrem(session_index_key(tenant), session_id)
            p.zrem(node_sessions_key(self.name), f"{tenant}/{session_id}")
            await p.execute()

    async def sync(self) -> None:
        """Reconcile Redis with this node's registry: ended sessions forgotten, missing live ones recorded."""
        now = time.time()
        records = await anyio.to_thread.run_sync(self.sessions._records)
        live = {rec.key: rec for rec in records if rec.expires_at() > now}
        self._live = len(live)
        held: Any = await self.r.zrange(node_sessions_key(self.name), 0, -1)
        for key in set(held) - set(live):
            tenant, _, sid = key.partition("/")
            await self.forget(tenant, sid)
        ready = [rec for rec in live.values() if rec.status == "ready"]
        if ready:
            async with self.r.pipeline(transaction=False) as p:
                for rec in ready:
                    p.exists(session_node_key(rec.tenant, rec.id))
                found = await p.execute()
            for rec, there in zip(ready, found, strict=True):
                if not there:
                    await self.publish(rec.tenant, rec.info())

    async def _sync_loop(self) -> None:
        interval = max(0.5, min(self.sessions.config.reap_interval, self.node.ttl))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sync()
                # Creations a dead node held: lost with it (the API says so), never made twice.
                for entry in await self.creates.claim_orphans(self.node.heartbeat, min_idle=self.node.ttl):
                    cid = entry.fields.get("id")
                    log.warning("dropping session creation %s held by lost node %s", cid, entry.previous)
                    await self.creates.ack(entry.id)
                await self.creates.prune_consumers(self.node.heartbeat)
            except (redis.exceptions.RedisError, ExecboxError) as exc:
                log.warning("session pass failed: %s", exc)

    async def _reply(self, call_id: str, answer: dict[str, Any]) -> None:
        answer["node"] = self.name
        async with self.r.pipeline(transaction=True) as p:
            p.rpush(reply_key(call_id), json.dumps(answer))
            p.pexpire(reply_key(call_id), _px(REPLY_TTL))
            await p.execute()

    # -- creations (pulled while a slot is free) --------------------------------------------------

    def _has_room(self) -> bool:
        """A slot free (runs running and creations under way) and room for one more session here."""
        node = self.node
        busy = node.running + self._creating
        return node.healthy.is_set() and busy < node.slots and self._live < self.sessions.config.max_total

    async def _pull_creates(self) -> None:
        while True:
            if not self._has_room():
                await asyncio.sleep(0.2)  # no free slot or no room: creations stay queued for others
                continue
            try:
                entry = await self.creates.read(1.0)
            except redis.exceptions.RedisError as exc:
                log.warning("reading session creations failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if entry is not None:
                self._live += 1  # counted at once: the next read sees it
                self._creating += 1
                self._spawn(self._create(entry))

    async def _create(self, entry: Entry) -> None:
        fields = entry.fields
        call_id, tenant = fields.get("id", ""), fields.get("tenant", "")
        made = False
        try:
            left = float(fields.get("deadline") or 0) - time.time()
            if left <= 0:
                log.info("dropping session creation %s: its caller gave up", call_id)
                return
            await self.r.set(run_key(call_id), self.name, px=_px(left + REPLY_TTL))
            async with self.node._free:  # a slot while the container starts (fair: at most one read's wait)
                answer = await self._create_now(tenant, fields)
            made = "info" in answer
            await self._reply(call_id, answer)
        finally:
            self._creating -= 1
            if not made:
                self._live -= 1
            with contextlib.suppress(redis.exceptions.RedisError):
                await self.creates.ack(entry.id)

    async def _create_now(self, tenant: str, fields: dict[str, str]) -> dict[str, Any]:
        try:
            p = json.loads(fields["body"])
            ceiling = NetworkPolicy.model_validate_json(fields["ceiling"]) if fields.get("ceiling") else None
            limits = Limits.model_validate(p["limits"]) if p.get("limits") is not None else None

            def create() -> SessionInfo:
                return self.sessions.create(
                    p["user_id"],
                    p["language"],
                    image=p.get("image"),
                    limits=limits,
                    network=p.get("network"),
                    idle_timeout=p.get("idle_timeout"),
                    max_lifetime=p.get("max_lifetime"),
                    tenant=tenant,
                    repl=p.get("repl"),
                    secrets=p.get("secrets") or None,
                    network_ceiling=ceiling,
                    isolation=p.get("isolation"),
                    pause_after=p.get("pause_after"),
                    checkpoint_quota=p.get("checkpoint_quota"),
                )

            info = await anyio.to_thread.run_sync(create)
        except ExecboxError as exc:
            return error_answer(exc)
        except (KeyError, ValueError) as exc:
            return error_answer(InvalidRequestError("body", f"unreadable session creation: {exc!r}"))
        try:
            await self.publish(tenant, info)  # before the answer: the caller's next call finds this node
        except redis.exceptions.RedisError as exc:
            log.warning("session %s not recorded yet (the next pass does): %s", info.id, exc)
        return {"info": info.model_dump(mode="json")}

    # -- this node's own stream: calls on its sessions, forwarded volume runs ------------------

    def _start_op(self, entry: Entry) -> None:
        async def handle() -> None:
            try:
                await self._op(entry)
            finally:
                self._ops.release()
                with contextlib.suppress(redis.exceptions.RedisError):
                    await self.own.ack(entry.id)

        self._spawn(handle())

    async def _op(self, entry: Entry) -> None:
        fields = entry.fields
        op = fields.get("op", "")
        if float(fields.get("deadline") or 0) <= time.time():
            log.info("dropping %s %s: its caller gave up", op, fields.get("id"))
            return
        if op == "run" or op in VOLUME_OPS:
            await self.volumes.handle(entry)
            return
        handler = self._handlers().get(op)
        tenant, sid = fields.get("tenant", ""), fields.get("session_id", "")
        # A streaming caller gets the call's output as it comes, then the answer, on the call's own stream.
        pump = None
        if op == "execute" and fields.get("stream") == "1":
            left = float(fields.get("deadline") or 0) - time.time()
            pump = OutputPump(self.r, fields.get("id", ""), left + REPLY_TTL)
            on_output = pump.on_output

            async def streamed(tenant: str, sid: str, body: str) -> dict[str, Any]:
                return await self._execute(tenant, sid, body, on_output)

            handler = streamed
        answer: dict[str, Any]
        if handler is None:
            answer = error_answer(InvalidRequestError("op", f"unknown session operation {op!r}"))
        else:
            try:
                answer = await handler(tenant, sid, fields.get("body") or "{}")
            except SessionNotFoundError as exc:
                await self.forget(tenant, sid)
                answer = error_answer(exc)
            except ExecboxError as exc:
                answer = error_answer(exc)
            except Exception as exc:  # never leave the caller waiting for its deadline
                log.exception("session %s %s failed in the node", sid, op)
                answer = error_answer(ExecboxError(f"the node failed: {type(exc).__name__}: {exc}"))
        if pump is not None:
            await pump.finish(json.dumps(answer | {"node": self.name}))
        else:
            await self._reply(fields.get("id", ""), answer)

    def _handlers(self) -> dict[str, Callable[[str, str, str], Awaitable[dict[str, Any]]]]:
        return {
            "execute": self._execute,
            "get": self._info_of(lambda s, t, sid: s.get(sid, tenant=t)),
            "pause": self._info_of(lambda s, t, sid: s.pause(sid, tenant=t)),
            "resume": self._info_of(lambda s, t, sid: s.resume(sid, tenant=t)),
            "delete": self._delete,
        }

    def _info_of(
        self, call: Callable[[Sessions, str, str], SessionInfo]
    ) -> Callable[[str, str, str], Awaitable[dict[str, Any]]]:
        async def handler(tenant: str, sid: str, body: str) -> dict[str, Any]:
            info = await anyio.to_thread.run_sync(lambda: call(self.sessions, tenant, sid))
            await self.publish(tenant, info)
            return {"info": info.model_dump(mode="json")}

        return handler

    async def _execute(
        self, tenant: str, sid: str, body: str, on_output: Callable[[str, bytes], None] | None = None
    ) -> dict[str, Any]:
        try:
            req = SessionExecuteRequest.model_validate_json(body)
        except ValueError as exc:
            raise InvalidRequestError("body", f"unreadable session call: {exc}") from None

        def run() -> tuple[Any, SessionInfo | None]:
            result = self.sessions.execute(
                sid,
                req.code,
                req.env,
                req.timeout,
                tenant=tenant,
                files=dict(req.files),
                collect=req.collect,
                on_output=on_output,
            )
            try:
                return result, self.sessions.get(sid, tenant=tenant)
            except SessionNotFoundError:
                return result, None  # it ended with this call

        result, info = await anyio.to_thread.run_sync(run)
        result.node = self.name
        if info is None:
            await self.forget(tenant, sid)
        else:
            await self.publish(tenant, info)
        return {"result": result.model_dump(mode="json")}

    async def _delete(self, tenant: str, sid: str, body: str) -> dict[str, Any]:
        await anyio.to_thread.run_sync(lambda: self.sessions.delete(sid, tenant=tenant))
        await self.forget(tenant, sid)
        return {"deleted": True}


def node_sessions(settings: Settings, executor: Executor) -> Sessions:
    """A node's ``Sessions``: the executor's engine, image, limits and egress; its registry its own
    (``session_store_url``, else SQLite under the node's data dir: never shared with other nodes)."""
    from .sessions.setup import sessions_beside

    return sessions_beside(
        settings, executor, settings.session_store_url or f"sqlite:///{settings.data_dir}/sessions.db"
    )
