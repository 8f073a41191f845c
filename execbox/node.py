"""An execbox node: the library on one host, taking runs from a queue in Redis.

``execbox node`` runs one per host, beside that host's container engine. It keeps
its own warm pool (and egress, volumes) through an ``Executor``, and pulls runs from
the ``runs`` stream (a consumer group shared by every node) only while it has a free
slot, so load follows capacity without a scheduler of our own. Redis records the
node as the entry's holder when it delivers it (the group's pending list); the node
also names itself in ``execbox:run:<id>`` as the run starts, then pushes the answer
to ``execbox:reply:<id>`` and acknowledges the entry in one transaction. A caller
that streams gets the output on the run's own stream instead, the answer last
(``node_stream.py``).

Liveness is a key with a TTL (``execbox:node:<name>``, its status as JSON: slots,
running, ready sandboxes by profile, health, runs by outcome), refreshed at a third
of the TTL and within ``WATCH`` s of a change. An API
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
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import redis.asyncio as aioredis
import redis.exceptions

from .egress import NetworkPolicy
from .exceptions import ConfigurationError, ExecboxError, InvalidRequestError
from .executor import Executor, OutputCallback
from .models import ExecutionRequest
from .node_stream import OutputPump
from .queue import Entry, Heartbeat, StreamQueue
from .server.metrics import outcome_of
from .settings import Settings
from .state.keys import node_key, reply_key, run_key

if TYPE_CHECKING:
    from .node_sessions import NodeSessions

__all__ = ["GROUP", "RUNS", "Node", "node_status", "run_node"]

log = logging.getLogger("execbox.node")

RUNS = "runs"  # the stream of dispatched runs
GROUP = "nodes"  # its consumer group: every node
REPLY_TTL = 60.0
WATCH = 0.1  # seconds between looks at whether the status changed


def _fingerprint(status: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in status.items() if k != "last_seen"}, sort_keys=True)


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
        self.counts: Counter[str] = Counter()  # runs ended here, by outcome (published with the status)
        self._published: str = ""  # the fingerprint of the status last written
        self.sessions: NodeSessions | None = None  # its sessions and volume affinity (node_sessions.py)

    def status(self) -> dict[str, Any]:
        """What this node publishes: ``node_status`` plus its health and its runs by outcome."""
        status = node_status(self.executor, self.name, self.slots, self.running)
        status["healthy"] = self.healthy.is_set()
        status["runs"] = dict(self.counts)
        if self.sessions is not None:
            status["sessions"] = self.sessions.live  # held here (node_sessions.py)
        return status

    async def publish(self) -> None:
        await self._check_engine()
        await self._write_status()

    async def _write_status(self) -> None:
        status = self.status()
        await self.r.set(node_key(self.name), json.dumps(status), px=max(1, int(self.ttl * 1000)))
        self._published = _fingerprint(status)

    async def _watch_loop(self) -> None:
        """Publish soon after the status changes (a run starts or ends, the pool refills), not only
        at the periodic refresh: ``/v1/nodes`` and the metrics stay current. At most every ``WATCH`` s."""
        while True:
            await asyncio.sleep(WATCH)
            if _fingerprint(self.status()) != self._published:
                try:
                    await self._write_status()
                except redis.exceptions.RedisError as exc:
                    log.warning("node status not published: %s", exc)

    async def serve(self, stop: asyncio.Event) -> None:
        """Take runs until ``stop``; then finish those running and drop the liveness keys."""
        await self.queue.ensure_group()
        await self.publish()
        self.heartbeat.start()
        loops = [
            asyncio.create_task(self._publish_loop()),
            asyncio.create_task(self._watch_loop()),
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
        acked = False
        try:
            if self.sessions is None or not await self.sessions.divert(entry):
                acked = await self._run(entry)
        except Exception:
            log.exception("run %s failed in the node", entry.fields.get("id"))
        finally:
            self.running -= 1
            self._free.release()
            if not acked:
                with contextlib.suppress(redis.exceptions.RedisError):
                    await self.queue.ack(entry.id)

    async def _run(self, entry: Entry) -> bool:
        """Run the entry and push its answer; True if the entry was acknowledged with the answer."""
        fields = entry.fields
        run_id, deadline = fields["id"], float(fields["deadline"])
        left = deadline - time.time()
        if left <= 0:
            log.info("dropping run %s: its caller gave up", run_id)
            self.counts["dropped"] += 1
            return False
        # Redis recorded this node as the entry's holder when it delivered it (the group's pending
        # list: the caller's liveness check reads it); the run key says so too, written beside the
        # run's start rather than before it (one round trip off the run's path).
        keep = max(1, int((left + REPLY_TTL) * 1000))
        holding = asyncio.ensure_future(self.r.set(run_key(run_id), self.name, px=keep))
        # A streaming caller gets the output as it comes, on the run's own stream (node_stream.py).
        pump = OutputPump(self.r, run_id, left + REPLY_TTL) if fields.get("stream") == "1" else None
        try:
            answer = await self._execute(fields, pump.on_output if pump is not None else None)
        except BaseException:
            if pump is not None:
                await pump.cancel()
            raise
        finally:
            with contextlib.suppress(redis.exceptions.RedisError):
                await holding
        if pump is not None:
            await pump.finish(answer)
            return False
        async with self.r.pipeline(transaction=True) as p:  # the answer and the entry's end: one round trip
            p.rpush(reply_key(run_id), answer)
            p.pexpire(reply_key(run_id), int(REPLY_TTL * 1000))
            p.xack(self.queue.key, GROUP, entry.id)
            p.xdel(self.queue.key, entry.id)
            await p.execute()
        return True

    async def _execute(self, fields: dict[str, str], on_output: OutputCallback | None) -> str:
        """Run the entry's request here; the answer as JSON (the result, or the library's error)."""
        error: dict[str, Any]
        try:
            request = ExecutionRequest.model_validate_json(fields["request"])
            ceiling = NetworkPolicy.model_validate_json(fields["ceiling"]) if fields.get("ceiling") else None
            result = await anyio.to_thread.run_sync(
                lambda: self.executor.run(request, on_output, tenant=fields["tenant"], network_ceiling=ceiling)
            )
        except InvalidRequestError as exc:
            error = {"type": "InvalidRequestError", "field": exc.field, "message": exc.message}
        except ExecboxError as exc:
            error = {"type": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # a bug here: the caller still gets an answer, not a wait until its deadline
            log.exception("run %s failed in the node", fields.get("id"))
            error = {"type": "ExecboxError", "message": f"the node failed to run it ({type(exc).__name__})"}
        else:
            self.counts[outcome_of(result)] += 1
            # Serialized once: the result's JSON goes into the answer as it is.
            return f'{{"node":{json.dumps(self.name)},"result":{result.model_dump_json()}}}'
        self.counts["failed"] += 1
        return json.dumps({"node": self.name, "error": error})


def run_node(settings: Settings) -> int:
    """``execbox node``: serve until SIGTERM/SIGINT (runs in progress finish first); 0 after a clean stop."""
    import signal
    import socket

    from .config import ExecutorConfig
    from .egress import EgressSettings
    from .state import open_store

    if not settings.queue_url:
        raise ConfigurationError("execbox node needs --queue-url (or EXECBOX_QUEUE_URL): the Redis of the cluster")
    if settings.node_metrics:
        from .server.node_metrics import parse_listen

        try:
            parse_listen(settings.node_metrics)
        except ValueError as exc:
            raise ConfigurationError(f"EXECBOX_NODE_METRICS / --metrics-port: {exc}") from None
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
            node = Node(executor, r, name, settings.node_slots, settings.node_ttl)
            node.sessions = NodeSessions(node, sessions, settings.volume_max_idle)
            stop_metrics = _metrics(settings.node_metrics, node)
            try:
                await node.serve(stop)
            finally:
                stop_metrics()
                await r.aclose()

        try:
            asyncio.run(main())
        finally:
            if sessions is not None:
                sessions.close()  # the reaper stops; the sessions live on for this node's next start
    store.close()
    return 0


def _metrics(listen: str | None, node: Node) -> Callable[[], None]:
    """The node's own /metrics (``--metrics-port``), if asked for; the function that stops it."""
    if not listen:
        return lambda: None
    from .server.node_metrics import NodeSelfCollector, serve_node_metrics

    def pool() -> dict[str, Any] | None:
        stats = node.executor.pool_stats()
        return stats.as_dict() if stats is not None else None

    try:
        return serve_node_metrics(listen, NodeSelfCollector(node.status, pool))
    except (ValueError, OSError) as exc:
        raise ConfigurationError(f"EXECBOX_NODE_METRICS / --metrics-port: {exc}") from None
