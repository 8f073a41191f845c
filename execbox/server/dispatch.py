"""The API replica's side of nodes: runs go to ``execbox node`` workers over Redis.

With ``--queue-url`` a replica runs nothing itself: it appends each run to the
``runs`` stream (with its deadline) and waits, by a blocking read, for the answer
the node that took it pushes (or, for a caller that streams, for the output chunks
and then the answer on the run's own stream: ``node_stream.py``). While it waits it
looks, at least every second, at the liveness key (``execbox:node:<name>``, a TTL
refreshed by the node) of the node holding the run (the one Redis delivered it to):
gone means the node died with the run, answered as 503 ``node_lost`` naming it,
within the run's timeout plus the key's TTL. Nothing here is kept that another
replica would need.
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
from ..executor import OutputCallback
from ..models import ExecutionRequest, ExecutionResult
from ..node import GROUP, RUNS
from ..node_stream import Receive, list_receiver, stream_receiver
from ..queue import StreamQueue
from ..state.keys import NODE, node_key, reply_key, run_key
from .dispatch_sessions import check_volume_node
from .errors import ApiError
from .jobrecords import dump_request

__all__ = ["Dispatcher"]

GRACE = 15.0  # beyond a run's timeout: a node's liveness TTL and the hand-offs
LOOK = 1.0  # seconds between looks at the liveness of the node holding a run


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
        self,
        tenant: str,
        request: ExecutionRequest,
        ceiling: NetworkPolicy | None,
        on_output: OutputCallback | None = None,
    ) -> ExecutionResult:
        """Run ``request`` (limits resolved) on a node; its result, or the ApiError that says why not.

        With ``on_output``, the node streams the run's output chunks as they come (node_stream.py),
        passed on here in order before the result."""
        run_id = uuid.uuid4().hex
        timeout = request.limits.timeout if request.limits is not None else 10.0
        deadline = time.monotonic() + timeout + GRACE
        fields = {
            "id": run_id,
            "tenant": tenant,
            "request": dump_request(request),  # with its secrets' values (model_dump_json masks them)
            "ceiling": ceiling.model_dump_json() if ceiling is not None else "",
            "deadline": str(time.time() + timeout + GRACE),
        }
        try:
            await check_volume_node(self.r, tenant, request)  # its volume's node, if it has one, must be live
            if on_output is None:
                entry_id = await self.queue.add(fields)
                return await self._wait(run_id, entry_id, deadline, list_receiver(self.r, reply_key(run_id)))
            receive, drop = stream_receiver(self.r, run_id, on_output)
            try:
                entry_id = await self.queue.add(fields | {"stream": "1"})
                return await self._wait(run_id, entry_id, deadline, receive)
            finally:
                await drop()
        except redis.exceptions.RedisError as exc:
            raise ApiError(503, "queue_unavailable", f"the run queue does not answer: {exc}", retry_after=2) from None

    async def _holder(self, run_id: str, entry_id: str) -> str | None:
        """The node holding the run: the one Redis delivered its entry to (the group's pending list, from
        the moment of delivery), or the one its run key names."""
        async with self.r.pipeline(transaction=False) as p:
            p.get(run_key(run_id))
            p.xpending_range(self.queue.key, GROUP, entry_id, entry_id, 1)
            named, pending = await p.execute()
        if named is not None:
            return str(named)
        return str(pending[0]["consumer"]) if pending else None

    async def _wait(self, run_id: str, entry_id: str, deadline: float, receive: Receive) -> ExecutionResult:
        """Receive the answer, looking at the holder's liveness at least every second meanwhile."""
        holder: str | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if holder is None:
                    raise ApiError(503, "no_node", "no node took the execution in time", retry_after=2)
                raise ApiError(503, "node_lost", f"node {holder} did not answer in time", retry_after=2)
            got = await receive(min(LOOK, left))
            if got is not None:
                return self._answer(got, holder)
            if holder is None:
                holder = await self._holder(run_id, entry_id)
            if holder is not None and not await self.r.exists(node_key(holder)):
                # One more look: the answer may have come just before the node went.
                last = await receive(None)
                if last is not None:
                    return self._answer(last, holder)
                raise ApiError(503, "node_lost", f"node {holder} was lost while running this execution", retry_after=2)

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
