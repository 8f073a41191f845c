"""The API replica's side of volumes held by nodes (see ``execbox/node_volumes.py``):
``/v1/users/{id}/volume`` (delete, export, import) goes to the node that holds the user's volume.

No node holds it yet: deleting does nothing, exporting gives an empty archive (as for a
user without a volume in-process), and a restore goes onto the shared stream, where the
node that takes it becomes the holder. The holder not live: 503 ``node_lost`` naming it.
"""

from __future__ import annotations

import base64
import io
import tarfile
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from ..node import GROUP, RUNS
from ..node_sessions import NODE_GROUP
from ..queue import StreamQueue
from ..state.keys import node_key, node_stream, volume_node_key
from .dispatch_sessions import GRACE, SessionDispatcher
from .errors import ApiError

__all__ = ["VolumeDispatcher"]

OP_TIME = 300.0  # a backup or restore of a full volume, in a sandbox


class VolumeDispatcher:
    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self.calls = SessionDispatcher(r)  # its blocking wait and answers

    async def _holder(self, tenant: str, user: str) -> str | None:
        found: Any = await self.r.get(volume_node_key(tenant, user))
        if found is None:
            return None
        if not await self.r.exists(node_key(str(found))):
            raise ApiError(
                503,
                "node_lost",
                f"node {found} holds the volume of user {user!r} and is not live",
                retry_after=2,
                node=str(found),
            )
        return str(found)

    async def _send(self, holder: str | None, op: str, tenant: str, user: str, key: str, data: str = "") -> Any:
        call_id = uuid.uuid4().hex
        fields = {"id": call_id, "op": op, "tenant": tenant, "user_id": user, "deadline": str(time.time() + OP_TIME)}
        if data:
            fields["data"] = data
        if holder is None:
            await StreamQueue(self.r, RUNS, GROUP, "api").add(fields)  # the node that takes it holds it
        else:
            await StreamQueue(self.r, node_stream(holder), NODE_GROUP, "api").add(fields)
        answer = await self.calls._wait(call_id, holder, time.monotonic() + OP_TIME + GRACE, "volume operation")
        return self.calls._result(answer, key)

    async def delete(self, tenant: str, user: str) -> None:
        try:
            holder = await self._holder(tenant, user)
            if holder is not None:
                await self._send(holder, "volume_delete", tenant, user, "deleted")
        except redis.exceptions.RedisError as exc:
            raise ApiError(503, "queue_unavailable", f"the queue does not answer: {exc}", retry_after=2) from None

    async def export(self, tenant: str, user: str) -> bytes:
        try:
            holder = await self._holder(tenant, user)
            if holder is None:
                buf = io.BytesIO()
                tarfile.open(fileobj=buf, mode="w").close()
                return buf.getvalue()
            data = await self._send(holder, "volume_export", tenant, user, "data")
        except redis.exceptions.RedisError as exc:
            raise ApiError(503, "queue_unavailable", f"the queue does not answer: {exc}", retry_after=2) from None
        return base64.b64decode(data)

    async def restore(self, tenant: str, user: str, data: bytes) -> int:
        try:
            holder = await self._holder(tenant, user)
            encoded = base64.b64encode(data).decode()
            return int(await self._send(holder, "volume_import", tenant, user, "entries", encoded))
        except redis.exceptions.RedisError as exc:
            raise ApiError(503, "queue_unavailable", f"the queue does not answer: {exc}", retry_after=2) from None
