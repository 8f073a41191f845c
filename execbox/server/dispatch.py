"""The API replica's side of nodes: runs go to ``execbox node`` workers over Redis.

With ``--queue-url`` a replica runs nothing itself: it appends each run to the
``runs`` stream (with its deadline) and waits, by a blocking read, for the answer
the node that took it pushes. While it waits it watches that node's liveness key
(``execbox:node:<name>``, a TTL refreshed by the node): gone means the node died
with the run, answered as 503 ``node_lost`` naming it, within the run's timeout
plus the key's TTL. Nothing here is kept that another replica would need.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from .. import exceptions
from ..egress import NetworkPolicy
from ..exceptions import ExecboxError, InvalidRequestError
from ..models import ExecutionRequest, ExecutionResult
from ..node import GROUP, RUNS
from ..queue import StreamQueue
from ..state.keys import NODE, node_key, reply_key, run_key
from .dispatch_sessions import check_volume_node
from .errors import ApiError

__all__ = ["Dispatcher"]

GRACE = 15.0  # beyond a run's timeout: a node's liveness TTL and the hand-offs


class Dispatcher:
    def __init__(self, url: str) -> None:
        self.r: aioredis.Redis = aioredis.from_url(url, decode_responses=True)
        self.queue = StreamQueue(self.r, RUNS, GROUP, "api")

    async def start(self) -> None:
        await self.queue.ensure_group()

    async def close(self) -> None:
        await self.r.aclose()

    async def nodes(self) -> list[dict[str, Any]]:
        """Live nodes and what they said of themselves last."""
        names = [key async for key in self.r.scan_iter(match=f"{NODE}*", count=500)]
        values = await self.r.mget(names) if names else []
        out = [json.loads(v) for v in values if v]
        return sorted(out, key=lambda n: str(n.get("name")))

    async def run(
        self, tenant: str, request: ExecutionRequest, ceiling: NetworkPolicy | None
    ) -> ExecutionResult:
        """Run ``request`` (limits resolved) on a node; its result, or the ApiError that says why not."""
        run_id = uuid.uuid4().hex
        timeout = request.limits.timeout if request.limits is not None else 10.0
        deadline = time.monotonic() + timeout + GRACE
        try:
            await check_volume_node(self.r, tenant, request)  # its volume's node, if it has one, must be live
            await self.queue.add(
                {
                    "id": run_id,
                    "tenant": tenant,
                    "request": request.model_dump_json(),
                    "ceiling": ceiling.model_dump_json() if ceiling is not None else "",
                    "deadline": str(time.time() + timeout + GRACE),
                }
            )
            return await self._wait(run_id, deadline)
        except redis.exceptions.RedisError as exc:
            raise ApiError(503, "queue_unavailable", f"the run queue does not answer: {exc}", retry_after=2) from None

    async def _wait(self, run_id: str, deadline: float) -> ExecutionResult:
        holder: str | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if holder is None:
                    raise ApiError(503, "no_node", "no node took the execution in time", retry_after=2)
                raise ApiError(503, "node_lost", f"node {holder} did not answer in time", retry_after=2)
            got: Any = await self.r.blpop([reply_key(run_id)], timeout=min(1.0, left))
            if got is not None:
                return self._answer(json.loads(got[1]), holder)
            if holder is None:
                found: Any = await self.r.get(run_key(run_id))
                holder = str(found) if found is not None else None
            if holder is not None and not await self.r.exists(node_key(holder)):
                # One more look: the answer may have come just before the node went.
                last: Any = await self.r.lpop(reply_key(run_id))
                if last is not None:
                    return self._answer(json.loads(last), holder)
                raise ApiError(
                    503, "node_lost", f"node {holder} was lost while running this execution", retry_after=2
                )

    @staticmethod
    def _answer(answer: dict[str, Any], holder: str | None) -> ExecutionResult:
        if "result" in answer:
            return ExecutionResult.model_validate(answer["result"])
        err = answer.get("error") or {}
        if err.get("type") == "InvalidRequestError":
            raise InvalidRequestError(str(err.get("field") or "request"), str(err.get("message")))
        # The same class as the node's library raised (the service maps it to its status).
        kind = getattr(exceptions, str(err.get("type")), None)
        if not (isinstance(kind, type) and issubclass(kind, ExecboxError)) or kind.__init__ is not Exception.__init__:
            kind = ExecboxError
        raise kind(f"node {answer.get('node') or holder}: {err.get('message')}")
