"""Volume affinity on nodes: a user's volume lives on one node, and its runs and backups go there.

The first node to run a ``volume=true`` run of a (tenant, user), or to restore one,
records itself in ``execbox:volnode:<tenant>:<user>`` (``SET NX``, TTL the volume's idle
expiry, refreshed at every use). Volume runs and restores still arrive on the shared
``runs`` stream (pull-based); a node that takes one while another node holds the
volume forwards it to that node's own stream, where it is run under one of that node's
slots. If the holder is not live the entry is lost with it: the caller, who watches the
holder named in ``execbox:run:<id>``, answers ``node_lost`` naming it; it never runs on
an empty volume elsewhere. Deleting and exporting go to the holder's stream directly
(the API replica reads the key).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import redis.asyncio as aioredis

from .exceptions import ExecboxError, InvalidRequestError
from .queue import Entry, StreamQueue
from .state.keys import node_key, node_stream, run_key, volume_node_key

if TYPE_CHECKING:
    from .node import Node

__all__ = ["VOLUME_OPS", "NodeVolumes"]

log = logging.getLogger("execbox.node")

VOLUME_OPS = ("volume_delete", "volume_export", "volume_import")
REPLY_TTL = 60.0

Reply = Callable[[str, dict[str, Any]], Awaitable[None]]


def _px(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class NodeVolumes:
    """The volume side of one ``Node``; ``reply(call_id, answer)`` answers a caller."""

    def __init__(self, node: Node, ttl: float, reply: Reply, own_group: str) -> None:
        self.node, self.ttl, self.reply, self.own_group = node, ttl, reply, own_group
        self.r: aioredis.Redis = node.r
        self.name = node.name

    @staticmethod
    def _owner(fields: dict[str, str]) -> tuple[str, str] | None:
        """(tenant, user) of an entry that needs a user's volume, else None."""
        tenant = fields.get("tenant", "")
        if fields.get("op") in VOLUME_OPS:
            return tenant, fields.get("user_id", "")
        try:
            request = json.loads(fields["request"])
        except (KeyError, ValueError):
            return None
        user = request.get("user_id")
        if not request.get("volume") or not isinstance(user, str):
            return None
        return tenant, user

    async def claim(self, tenant: str, user: str) -> str:
        """The node holding the user's volume: this one if none did (recorded now), refreshed if this one."""
        key = volume_node_key(tenant, user)
        if await self.r.set(key, self.name, nx=True, px=_px(self.ttl)):
            log.info("volume of %s/%s: held by this node from now on", tenant, user)
            return self.name
        found: Any = await self.r.get(key)
        holder = str(found) if found is not None else None
        if holder is None or holder == self.name:
            await self.r.set(key, self.name, px=_px(self.ttl))  # refreshed at every use
            return self.name
        return holder

    async def divert(self, entry: Entry) -> bool:
        """An entry taken from the shared stream: False to run it here as a run; True if it was handled
        (a restore done here, or forwarded to the volume's node, or lost with it)."""
        fields = entry.fields
        owner = self._owner(fields)
        if owner is None:
            return False
        holder = await self.claim(*owner)
        if holder == self.name:
            if fields.get("op") in VOLUME_OPS:
                await self.handle(entry)
                return True
            return False
        # The caller watches the holder from now on: lost with it if it is not live.
        left = float(fields.get("deadline") or 0) - time.time()
        await self.r.set(run_key(fields["id"]), holder, px=_px(max(left, 0) + REPLY_TTL))
        if await self.r.exists(node_key(holder)):
            # With the shared stream's entry id: acknowledging it again on the holder is a no-op.
            forwarded = {**fields, "op": fields.get("op") or "run", "entry": entry.id}
            await StreamQueue(self.r, node_stream(holder), self.own_group, self.name).add(forwarded)
        else:
            log.warning("%s: the volume's node %s is not live: lost with it", fields.get("id"), holder)
        return True

    async def handle(self, entry: Entry) -> None:
        """A volume run or operation on this node (from its own stream, or claimed from the shared one)."""
        fields = entry.fields
        op = fields.get("op") or "run"
        owner = self._owner(fields)
        if owner is not None and op != "volume_delete":
            await self.claim(*owner)
        node = self.node
        if op == "run":
            async with node._free:  # a forwarded run takes a slot here, as if pulled here
                node.running += 1
                try:
                    run = {k: v for k, v in fields.items() if k not in ("op", "entry")}
                    await node._run(Entry(fields.get("entry") or entry.id, run))
                finally:
                    node.running -= 1
            return
        tenant, user = owner or ("", "")
        left = float(fields.get("deadline") or 0) - time.time()
        await self.r.set(run_key(fields["id"]), self.name, px=_px(max(left, 0) + REPLY_TTL))  # the caller watches us
        try:
            answer = await self._operate(op, tenant, user, fields)
        except ExecboxError as exc:
            from .node_sessions import error_answer

            answer = error_answer(exc)
        await self.reply(fields["id"], answer)

    async def _operate(self, op: str, tenant: str, user: str, fields: dict[str, str]) -> dict[str, Any]:
        volumes = self.node.executor.volumes
        if op == "volume_delete":
            existed = await anyio.to_thread.run_sync(volumes.delete, tenant, user)
            found: Any = await self.r.get(volume_node_key(tenant, user))
            if found == self.name:
                await self.r.delete(volume_node_key(tenant, user))
            return {"deleted": bool(existed)}
        if op == "volume_export":
            data = await anyio.to_thread.run_sync(volumes.export_tar, tenant, user)
            return {"data": base64.b64encode(data).decode()}
        if op == "volume_import":
            raw = base64.b64decode(fields.get("data") or "")
            entries = await anyio.to_thread.run_sync(volumes.import_tar, tenant, user, raw)
            return {"entries": entries}
        raise InvalidRequestError("op", f"unknown volume operation {op!r}")
