"""The API replica's side of sessions (and volumes) held by nodes (see ``execbox/node_sessions.py``).

A creation goes onto the ``session-creates`` stream, taken by any node with a free
slot; the answer names the node, which recorded the affinity in Redis. Every later
operation on the session reads that record (``execbox:sesnode:<tenant>/<id>``: another
tenant's id is simply not there, 404) and goes onto that node's own stream only,
answered by a blocking read as runs are. A session whose node is not live answers 410
``node_lost`` naming it; a call in flight when its node dies, 503 ``node_lost`` once the
node's liveness key is gone (its TTL). Listing reads the tenant's index and records in
Redis: no node is asked. The per-user cap on live sessions is checked here, across
nodes, under a lock per user; each node caps its own total (``session_max_total``).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from .. import exceptions
from ..exceptions import (
    ExecboxError,
    InvalidRequestError,
    SessionBusyError,
    SessionLimitError,
    SessionNotFoundError,
    SessionStateError,
)
from ..executor import OutputCallback
from ..models import ExecutionRequest
from ..node_sessions import CREATES, NODE_GROUP
from ..node_stream import Receive, list_receiver, stream_receiver
from ..queue import StreamQueue
from ..sessions import SessionInfo, SessionResult
from ..sessions.models import ID_RE, RESTART_SLACK
from ..state.keys import (
    node_key,
    node_stream,
    reply_key,
    run_key,
    session_create_lock_key,
    session_index_key,
    session_node_key,
    volume_node_key,
)
from .errors import ApiError

__all__ = ["SessionDispatcher", "check_volume_node"]

GRACE = 15.0  # beyond an operation's own time: a node's liveness TTL and the hand-offs
CREATE_TIME = 30.0  # a session's container and REPL start (SessionsConfig.ready_timeout)
BUSY_WAIT = 30.0  # a call may wait this long (beyond its timeout) for another call on the session


def _unavailable(exc: redis.exceptions.RedisError) -> ApiError:
    return ApiError(503, "queue_unavailable", f"the session queue does not answer: {exc}", retry_after=2)


async def check_volume_node(r: aioredis.Redis, tenant: str, request: ExecutionRequest) -> None:
    """A run with a user's volume whose node is not live: 503 ``node_lost`` naming it (never a fresh volume)."""
    if not request.volume or request.user_id is None:
        return
    holder: Any = await r.get(volume_node_key(tenant, request.user_id))
    if holder is not None and not await r.exists(node_key(str(holder))):
        raise ApiError(
            503,
            "node_lost",
            f"node {holder} holds the volume of user {request.user_id!r} and is not live",
            retry_after=2,
            node=str(holder),
        )


class SessionDispatcher:
    """Sessions on nodes, as one API replica sees them (shares the runs' Redis connection)."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self.creates = StreamQueue(r, CREATES, "nodes", "api")

    # -- records ----------------------------------------------------------------------------------

    async def _record(self, tenant: str, session_id: str) -> dict[str, Any]:
        if not ID_RE.match(session_id):
            raise SessionNotFoundError(f"no session {session_id!r}")
        raw: Any = await self.r.get(session_node_key(tenant, session_id))
        if raw is None:
            raise SessionNotFoundError(f"no session {session_id!r}")
        record: dict[str, Any] = json.loads(raw)
        if record.get("tenant") != tenant:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return record

    async def _live_node(self, tenant: str, session_id: str) -> tuple[str, dict[str, Any]]:
        """The node holding the session, or 410 ``node_lost`` naming it if it is not live."""
        record = await self._record(tenant, session_id)
        node = str(record["node"])
        if not await self.r.exists(node_key(node)):
            raise ApiError(
                410,
                "node_lost",
                f"session {session_id} was held by node {node}, which is not live: its state is gone with it"
                " (unless that node comes back)",
                field="session_id",
                reason="node_lost",
                node=node,
            )
        return node, record

    async def list(self, tenant: str, user_id: str | None = None) -> list[SessionInfo]:
        """The tenant's live sessions on live nodes, oldest first: from Redis, no node asked."""
        try:
            now = time.time()
            index = session_index_key(tenant)
            await self.r.zremrangebyscore(index, "-inf", now)
            ids: Any = await self.r.zrangebyscore(index, now, "+inf")
            raws: list[Any] = await self.r.mget([session_node_key(tenant, sid) for sid in ids]) if ids else []
            records = [json.loads(raw) for raw in raws if raw is not None]
            nodes = sorted({str(rec["node"]) for rec in records})
            async with self.r.pipeline(transaction=False) as p:
                for node in nodes:
                    p.exists(node_key(node))
                live = {node for node, n in zip(nodes, await p.execute(), strict=True) if n}
        except redis.exceptions.RedisError as exc:
            raise _unavailable(exc) from None
        out = []
        for rec in records:
            info = SessionInfo.model_validate(rec["info"])
            if (
                rec.get("tenant") == tenant
                and rec["node"] in live
                and info.expires_at > now
                and (user_id is None or info.user_id == user_id)
            ):
                out.append(info)
        return sorted(out, key=lambda s: s.created_at)

    # -- creation ---------------------------------------------------------------------------------

    async def create(
        self, tenant: str, user_id: str, body: dict[str, Any], ceiling: str, max_per_user: int
    ) -> SessionInfo:
        """Create on whichever node takes it, the user's cap checked across nodes first."""
        lock = self.r.lock(session_create_lock_key(tenant, user_id), timeout=CREATE_TIME + 2 * GRACE)
        try:
            if not await lock.acquire(blocking_timeout=CREATE_TIME):
                raise SessionBusyError(f"another session of user {user_id!r} is being created; try again")
            try:
                mine = await self.list(tenant, user_id)
                if len(mine) >= max_per_user:
                    soonest = min(s.expires_at for s in mine)
                    raise SessionLimitError(
                        f"user {user_id!r} has {len(mine)} live sessions (at most {max_per_user}): end one first",
                        "user",
                        retry_after=max(1.0, round(soonest - time.time())),
                    )
                call_id = uuid.uuid4().hex
                await self.creates.add(
                    {
                        "id": call_id,
                        "tenant": tenant,
                        "body": json.dumps(body),
                        "ceiling": ceiling,
                        "deadline": str(time.time() + CREATE_TIME + GRACE),
                    }
                )
                answer = await self._wait(call_id, None, time.monotonic() + CREATE_TIME + GRACE, "session creation")
            finally:
                with contextlib.suppress(redis.exceptions.LockError):  # expired during a slow creation
                    await lock.release()
        except redis.exceptions.RedisError as exc:
            raise _unavailable(exc) from None
        return SessionInfo.model_validate(self._result(answer, "info"))

    # -- operations on one session ----------------------------------------------------------------

    async def call(
        self,
        tenant: str,
        session_id: str,
        op: str,
        body: str = "{}",
        timeout: float = 0.0,
        on_output: OutputCallback | None = None,
    ) -> Any:
        """``op`` on the node holding the session; the answer's payload (``info``, ``result``, ...).
        With ``on_output`` (execute), the node streams the call's output as it comes (node_stream.py)."""
        try:
            node, record = await self._live_node(tenant, session_id)
            if op == "execute":
                call_timeout = timeout or float(record["info"]["limits"]["timeout"])
                own = 2 * call_timeout + BUSY_WAIT + RESTART_SLACK + 1
            else:
                own = 120.0 + BUSY_WAIT  # a pause or resume under gvisor, waiting for a running call
            call_id = uuid.uuid4().hex
            fields = {
                "id": call_id,
                "op": op,
                "tenant": tenant,
                "session_id": session_id,
                "body": body,
                "deadline": str(time.time() + own + GRACE),
            }
            queue = StreamQueue(self.r, node_stream(node), NODE_GROUP, "api")
            deadline = time.monotonic() + own + GRACE
            if on_output is None:
                await queue.add(fields)
                answer = await self._wait(call_id, node, deadline, f"session {op}")
            else:
                receive, drop = stream_receiver(self.r, call_id, on_output)
                try:
                    await queue.add(fields | {"stream": "1"})
                    answer = await self._wait(call_id, node, deadline, f"session {op}", receive)
                finally:
                    await drop()
        except redis.exceptions.RedisError as exc:
            raise _unavailable(exc) from None
        key = {"execute": "result", "delete": "deleted"}.get(op, "info")
        return self._result(answer, key)

    async def execute(
        self,
        tenant: str,
        session_id: str,
        body: str,
        timeout: float | None,
        on_output: OutputCallback | None = None,
    ) -> SessionResult:
        answer = await self.call(tenant, session_id, "execute", body, timeout or 0.0, on_output)
        return SessionResult.model_validate(answer)

    async def info(self, tenant: str, session_id: str, op: str) -> SessionInfo:
        return SessionInfo.model_validate(await self.call(tenant, session_id, op))

    # -- answers ----------------------------------------------------------------------------------

    async def _wait(
        self, call_id: str, node: str | None, deadline: float, what: str, receive: Receive | None = None
    ) -> dict[str, Any]:
        """The answer, looking at the holder's liveness every second meanwhile (``receive``: the answer's
        list by default, or a streamed call's output stream)."""
        if receive is None:
            receive = list_receiver(self.r, reply_key(call_id))
        holder = node
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if holder is None:
                    raise ApiError(503, "no_node", f"no node took the {what} in time", retry_after=2)
                message = f"node {holder} did not answer the {what} in time"
                raise ApiError(503, "node_lost", message, retry_after=2, node=holder)
            got = await receive(min(1.0, left))
            if got is not None:
                return got
            if holder is None:
                found: Any = await self.r.get(run_key(call_id))
                holder = str(found) if found is not None else None
            if holder is not None and not await self.r.exists(node_key(holder)):
                last = await receive(None)
                if last is not None:
                    return last
                message = f"node {holder} was lost during this {what}"
                raise ApiError(503, "node_lost", message, retry_after=2, node=holder)

    @staticmethod
    def _result(answer: dict[str, Any], key: str) -> Any:
        if key in answer:
            return answer[key]
        err = answer.get("error") or {}
        kind, message = str(err.get("type")), str(err.get("message"))
        if kind == "InvalidRequestError":
            raise InvalidRequestError(str(err.get("field") or "request"), message)
        if kind == "SessionStateError":
            raise SessionStateError(str(err.get("field") or "session_id"), message)
        if kind == "SessionLimitError":
            retry = err.get("retry_after")
            raise SessionLimitError(message, str(err.get("scope") or "total"), float(retry) if retry else None)
        # The same class as the node's library raised (the routes map it to its status).
        cls = getattr(exceptions, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, ExecboxError)) or cls.__init__ is not Exception.__init__:
            cls = ExecboxError
        if issubclass(cls, SessionNotFoundError | SessionBusyError):
            raise cls(message)
        raise cls(f"node {answer.get('node')}: {message}")
