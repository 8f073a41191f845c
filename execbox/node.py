"""An execbox node: the library on one host, taking runs from a queue in Redis.

``execbox node`` runs one per host, beside that host's container engine. It keeps
its own warm pool (and egress, volumes) through an ``Executor``, and pulls runs from
the ``runs`` stream (a consumer group shared by every node) only while it has a free
slot, so load follows capacity without a scheduler of our own. For each run it
records that it holds it (``execbox:run:<id>`` = its name) before running, then
pushes the answer to ``execbox:reply:<id>`` and acknowledges the entry.

Liveness is a key with a TTL (``execbox:node:<name>``, its status as JSON: slots,
running, ready sandboxes by profile), refreshed at a third of the TTL. An API
replica waiting for a run whose node's key is gone answers ``node_lost``; entries a
dead node held are dropped by the survivors, never run again (code is not
idempotent). Entries past their deadline (the API gave up) are dropped unrun.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import redis.asyncio as aioredis
import redis.exceptions

from .egress import NetworkPolicy
from .exceptions import ConfigurationError, ExecboxError, InvalidRequestError
from .executor import Executor
from .models import ExecutionRequest
from .queue import Entry, Heartbeat, StreamQueue
from .settings import Settings
from .state.keys import node_key, reply_key, run_key

if TYPE_CHECKING:
    from .node_sessions import NodeSessions

__all__ = ["GROUP", "RUNS", "Node", "node_status", "run_node"]

log = logging.getLogger("execbox.node")

RUNS = "runs"  # the stream of dispatched runs
GROUP = "nodes"  # its consumer group: every node
REPLY_TTL = 60.0


def node_status(executor: Executor, name: str, slots: int, running: int) -> dict[str, Any]:
    """What a node publishes about itself."""
    ready: dict[str, int] = {}
    if executor.pool is not None:
        for profile, n in executor.pool.ready_by_profile().items():
            key = profile.language if profile.network == "none" else f"{profile.language}+egress"
            ready[key] = ready.get(key, 0) + n
    return {"name": name, "slots": slots, "running": running, "ready": ready, "last_seen": time.time()}


class Node:
    """The consumer of one node: pulls runs while it has slots, runs them on ``executor``."""

    def __init__(self, executor: Executor, r: aioredis.Redis, name: str, slots: int = 4, ttl: float = 10.0) -> None:
        self.executor, self.r, self.name, self.ttl = executor, r, name, ttl
        self.slots = slots
        self._free = asyncio.Semaphore(slots)
        self.running = 0
        self.queue = StreamQueue(r, RUNS, GROUP, name)
        self.heartbeat = Heartbeat(r, name, ttl)
        self._tasks: set[asyncio.Task[None]] = set()
        self.healthy = asyncio.Event()  # the engine answers: only then does the node take work
        self.sessions: NodeSessions | None = None  # its sessions and volume affinity (node_sessions.py)

    async def publish(self) -> None:
        await self._check_engine()
        status = node_status(self.executor, self.name, self.slots, self.running)
        status["healthy"] = self.healthy.is_set()
        if self.sessions is not None:
            status["sessions"] = self.sessions.live  # held here (node_sessions.py)
        await self.r.set(node_key(self.name), json.dumps(status), px=max(1, int(self.ttl * 1000)))

    async def serve(self, stop: asyncio.Event) -> None:
        """Take runs until ``stop``; then finish those running and drop the liveness keys."""
        await self.queue.ensure_group()
        await self.publish()
        self.heartbeat.start()
        loops = [
            asyncio.create_task(self._publish_loop()),
            asyncio.create_task(self._orphan_loop()),
            asyncio.create_task(self._pull()),
        ]
        if self.sessions is not None:
            loops += await self.sessions.start()
        log.info("node %s serving (%d slots)", self.name, self.slots)
        await stop.wait()
        for task in loops:
            task.cancel()
        for task in loops:
            with contextlib.suppress(asyncio.CancelledError, redis.exceptions.RedisError):
                await task
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self.sessions is not None:
            await self.sessions.finish()
        await self.heartbeat.stop()
        with contextlib.suppress(redis.exceptions.RedisError):
            await self.r.delete(node_key(self.name))

    async def _pull(self) -> None:
        """One entry per free slot, and only while the engine answers: the rest stays queued for others."""
        while True:
            await self._free.acquire()
            await self.healthy.wait()
            try:
                entry = await self.queue.read(1.0)
            except redis.exceptions.RedisError as exc:
                self._free.release()
                log.warning("reading the run queue failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            except BaseException:
                self._free.release()
                raise
            if entry is None:
                self._free.release()
            else:
                self._start(entry)

    async def _check_engine(self) -> None:
        try:
            await anyio.to_thread.run_sync(self.executor.engine.ping)
        except ExecboxError as exc:
            if self.healthy.is_set():
                log.warning("node %s: the engine does not answer (%s): taking no work", self.name, exc)
            self.healthy.clear()
            return
        if not self.healthy.is_set():
            log.info("node %s: the engine answers: taking work", self.name)
        self.healthy.set()

    def _start(self, entry: Entry) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.publish()
            except redis.exceptions.RedisError as exc:
                log.warning("node status not published: %s", exc)

    async def _orphan_loop(self) -> None:
        """Drop what dead nodes held: their runs are lost (the API says so), never run twice."""
        while True:
            await asyncio.sleep(self.ttl)
            try:
                for entry in await self.queue.claim_orphans(self.heartbeat, min_idle=self.ttl):
                    log.warning("dropping run %s held by lost node %s", entry.fields.get("id"), entry.previous)
                    await self.queue.ack(entry.id)
                await self.queue.prune_consumers(self.heartbeat)
            except redis.exceptions.RedisError as exc:
                log.warning("orphan pass failed: %s", exc)

    async def _handle(self, entry: Entry) -> None:
        self.running += 1
        try:
            if self.sessions is None or not await self.sessions.divert(entry):
                await self._run(entry)
        except Exception:
            log.exception("run %s failed in the node", entry.fields.get("id"))
        finally:
            self.running -= 1
            self._free.release()
            with contextlib.suppress(redis.exceptions.RedisError):
                await self.queue.ack(entry.id)

    async def _run(self, entry: Entry) -> None:
        fields = entry.fields
        run_id, deadline = fields["id"], float(fields["deadline"])
        left = deadline - time.time()
        if left <= 0:
            log.info("dropping run %s: its caller gave up", run_id)
            return
        # Recorded before the run starts: a caller that sees this node gone knows its run is lost.
        await self.r.set(run_key(run_id), self.name, px=max(1, int((left + REPLY_TTL) * 1000)))
        answer: dict[str, Any]
        try:
            request = ExecutionRequest.model_validate_json(fields["request"])
            ceiling = NetworkPolicy.model_validate_json(fields["ceiling"]) if fields.get("ceiling") else None
            result = await anyio.to_thread.run_sync(
                lambda: self.executor.run(request, tenant=fields["tenant"], network_ceiling=ceiling)
            )
            answer = {"result": json.loads(result.model_dump_json())}
        except InvalidRequestError as exc:
            answer = {"error": {"type": "InvalidRequestError", "field": exc.field, "message": exc.message}}
        except ExecboxError as exc:
            answer = {"error": {"type": type(exc).__name__, "message": str(exc)}}
        answer["node"] = self.name
        async with self.r.pipeline(transaction=True) as p:
            p.rpush(reply_key(run_id), json.dumps(answer))
            p.pexpire(reply_key(run_id), int(REPLY_TTL * 1000))
            await p.execute()


def run_node(settings: Settings) -> int:
    """``execbox node``: serve until SIGTERM/SIGINT (runs in progress finish first); 0 after a clean stop."""
    import signal
    import socket

    from .config import ExecutorConfig
    from .egress import EgressSettings
    from .state import open_store

    if not settings.queue_url:
        raise ConfigurationError("execbox node needs --queue-url (or EXECBOX_QUEUE_URL): the Redis of the cluster")
    name = settings.node_name or socket.gethostname()
    config = ExecutorConfig(
        image=settings.image,
        max_code_bytes=settings.max_code_bytes,
        data_dir=settings.data_dir,
        node_name=name,
        pool=settings.pool_min_ready > 0,
        pool_min_ready=settings.pool_min_ready,
        pool_max_total=settings.pool_max_total,
        volume_quota=settings.volume_quota,
        volume_max_idle=settings.volume_max_idle,
    )
    store = open_store(settings.state_store())
    egress = EgressSettings(
        host_map=settings.proxy_host_map, network_name=settings.egress_network, proxy_port=settings.egress_proxy_port
    )
    with Executor(settings.engine_url, config=config, state_store=store, egress=egress) as executor:
        from .node_sessions import NodeSessions, node_sessions

        sessions = node_sessions(settings, executor) if settings.sessions else None  # volumes either way

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            r = aioredis.from_url(str(settings.queue_url), decode_responses=True)
            try:
                node = Node(executor, r, name, settings.node_slots, settings.node_ttl)
                node.sessions = NodeSessions(node, sessions, settings.volume_max_idle)
                await node.serve(stop)
            finally:
                await r.aclose()

        try:
            asyncio.run(main())
        finally:
            if sessions is not None:
                sessions.close()  # the reaper stops; the sessions live on for this node's next start
    store.close()
    return 0
