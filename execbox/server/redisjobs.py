"""Async jobs shared by every replica: records and queues in Redis (``EXECBOX_QUEUE_URL``).

Every replica is a producer and a consumer of one Redis Streams consumer group:

* ``submit`` writes the record and queues the job in one script (``jobrecords.py``);
  any replica answers ``GET`` for it, and ``?wait=`` blocks on ``XREAD`` of the
  ``done`` stream (one listener per replica wakes the local waiters).
* Each replica reads a job (``XREADGROUP``) only when it has a free job slot, so
  queued work stays in the stream for whoever has capacity.
* A job becomes ``running`` (owner = this consumer) in the record just before its
  code starts, and is acked once its final state is written.
* Every replica keeps a heartbeat key; every ``heartbeat_ttl / 2`` it claims the
  entries of consumers whose heartbeat is gone (``execbox.queue``). A claimed job
  still ``queued`` runs here; one that was ``running`` ends ``failed`` (type
  ``interrupted``) unless its ``retries`` allow another start.
* Webhooks are entries of a second stream, queued with the job's end. Failed
  attempts back off in the delivering replica (attempt count and next time in the
  record); if it dies, another replica claims the entry and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ..exceptions import EngineUnavailableError
from ..models import ExecutionRequest
from ..queue import Entry, Heartbeat, StreamQueue
from ..state.keys import job_key, pending_key, stream_key
from . import jobrecords as rec_
from .errors import ApiError
from .jobs import JobBackend, JobLimit, Runner, SecretOf, new_job_id
from .schemas import ErrorBody, ExecutionJob
from .webhooks import WebhookSender

__all__ = ["RedisJobs"]

log = logging.getLogger("execbox.server.jobs")

GROUP = "execbox"
UNFINISHED_TTL = 7 * 86400.0  # a record and its queue entries outlive any plausible outage
MAXLEN = 100_000
DELIVERY_SLOTS = 16


class _Taken(Exception):
    """Another replica started or ended the job first."""


class RedisJobs(JobBackend):
    def __init__(
        self,
        url: str,
        run: Runner,
        secret_of: SecretOf,
        webhooks: WebhookSender,
        ttl: float,
        max_jobs: int,
        slots: int,
        heartbeat_ttl: float = 10.0,
    ) -> None:
        super().__init__(run, secret_of, webhooks, ttl)
        self.max_jobs, self.heartbeat_ttl = max_jobs, heartbeat_ttl
        # A command whose connection broke is sent again on a new one (a Redis restart, a stale pooled
        # connection); the scripts are safe to send twice (see jobrecords.py).
        self.r = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=30,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        )
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{new_job_id()[3:11]}"
        self.heartbeat = Heartbeat(self.r, self.consumer, heartbeat_ttl)
        self.jobs = StreamQueue(self.r, "jobs", GROUP, self.consumer, MAXLEN, UNFINISHED_TTL)
        self.hooks = StreamQueue(self.r, "webhooks", GROUP, self.consumer, MAXLEN, UNFINISHED_TTL)
        self._submit = self.r.register_script(rec_.SUBMIT)
        self._transition = self.r.register_script(rec_.TRANSITION)
        self._update = self.r.register_script(rec_.UPDATE)
        self._job_slots = asyncio.Semaphore(slots)
        self._hook_slots = asyncio.Semaphore(DELIVERY_SLOTS)
        self._loops: list[asyncio.Task[None]] = []
        self._runs: dict[asyncio.Task[None], list[bool]] = {}  # task -> [started]
        self._deliveries: set[asyncio.Task[None]] = set()
        self._waiters: dict[tuple[str, str], set[asyncio.Future[None]]] = {}
        self._stored = 0

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.jobs.ensure_group()
            await self.hooks.ensure_group()
            await self.heartbeat.beat()
            last: Any = await self.r.xrevrange(stream_key("jobs-done"), count=1)
        except redis.exceptions.RedisError as exc:
            raise EngineUnavailableError(f"the job queue's Redis does not answer: {exc}") from exc
        self.heartbeat.start()
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self.jobs.pull(self._job_slots, lambda e: self._handle(self._job_slots, self._take, e))),
            loop.create_task(
                self.hooks.pull(self._hook_slots, lambda e: self._handle(self._hook_slots, self._deliver, e))
            ),
            loop.create_task(self._listen(last[0][0] if last else "0-0")),
            loop.create_task(self._reclaim()),
        ]
        log.info("job queue consumer started", extra={"consumer": self.consumer})

    async def shutdown(self, grace: float) -> None:
        """Stop reading; let started jobs finish within ``grace``; leave the rest to other replicas."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        # Not started yet, or only waiting to retry a webhook: another replica takes over at once.
        unstarted = [t for t, started in self._runs.items() if not started[0]]
        for task in (*unstarted, *self._deliveries):
            task.cancel()
        running = set(self._runs) | self._deliveries
        if running:
            _, still = await asyncio.wait(running, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
        await self.heartbeat.stop()  # what this replica still holds is orphaned now, for others to take
        await self.r.aclose()

    def stored(self) -> int:
        return self._stored

    def _spawn(self, coro: Coroutine[Any, Any, None], run: bool) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        if run:
            self._runs[task] = [False]
            task.add_done_callback(lambda t: self._runs.pop(t, None))
        else:
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    # -- producer side ------------------------------------------------------------------------

    async def submit(
        self, tenant: str, request: ExecutionRequest, callback_url: str | None, retries: int, max_pending: int
    ) -> str:
        job_id, now = new_job_id(), time.time()
        fields = {
            "id": job_id,
            "tenant": tenant,
            "language": request.language,
            "created_at": repr(now),
            "callback_url": callback_url or "",
            "retries": str(retries),
            "attempts": "0",
            "status": "queued",
            "owner": "",
            "request": rec_.dump_request(request),
        }
        args: list[Any] = [job_id, now, max_pending, self.max_jobs, int(UNFINISHED_TTL * 1000)]
        args += [now - UNFINISHED_TTL, MAXLEN, int(UNFINISHED_TTL * 1000), tenant]
        args += [x for kv in fields.items() for x in kv]
        keys = [job_key(tenant, job_id), pending_key(tenant), pending_key(None), self.jobs.key]
        answer = await self._redis(self._submit(keys=keys, args=args))
        if answer == -1:
            raise JobLimit("pending_jobs")
        if answer == -2:
            raise JobLimit("jobs_full")
        return job_id

    async def get(self, tenant: str, job_id: str) -> ExecutionJob | None:
        rec = await self._redis(self._record(tenant, job_id))
        return rec_.view(rec, self.ttl) if rec else None

    async def _record(self, tenant: str, job_id: str) -> dict[str, str]:
        raw: Any = await self.r.hgetall(job_key(tenant, job_id))
        return dict(raw)

    async def wait(self, tenant: str, job_id: str, timeout: float) -> ExecutionJob | None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault((tenant, job_id), set())
        waiters.add(fut)
        try:
            job = await self.get(tenant, job_id)  # after registering: an end announced meanwhile still wakes us
            if job is None or job.status in rec_.FINAL:
                return job
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout)
            return await self.get(tenant, job_id)
        finally:
            waiters.discard(fut)
            if not waiters:
                self._waiters.pop((tenant, job_id), None)

    async def _redis(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("the job queue's Redis does not answer: %s", exc)
            raise ApiError(503, "queue_unavailable", "the job queue does not answer", retry_after=5) from exc

    # -- consumer side ------------------------------------------------------------------------

    def _handle(self, slots: asyncio.Semaphore, handle: Callable[[Entry], Awaitable[None]], e: Entry) -> None:
        self._spawn(self._holding(slots, handle, e), run=slots is self._job_slots)

    async def _holding(
        self, slots: asyncio.Semaphore | None, handle: Callable[[Entry], Awaitable[None]], e: Entry
    ) -> None:
        """Handle an entry (releasing the slot it was read with, if any). Handlers may be run again after a
        Redis error: nobody else would take the entry while this replica is alive."""
        delay = 0.5
        try:
            while True:
                try:
                    await handle(e)
                    return
                except redis.exceptions.RedisError as exc:
                    log.warning("handling %s failed, again in %.1f s: %s", e.id, delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
        finally:
            if slots is not None:
                slots.release()

    async def _take_claimed(self, entry: Entry) -> None:
        await self._take(entry, slot_held=False)

    async def _reclaim(self) -> None:
        passes = 0
        while True:
            await asyncio.sleep(self.heartbeat_ttl / 2)
            try:
                for entry in await self.jobs.claim_orphans(self.heartbeat, min_idle=1.0):
                    log.warning("took over job %s from %s", entry.fields.get("id"), entry.previous)
                    self._spawn(self._holding(None, self._take_claimed, entry), run=True)
                for entry in await self.hooks.claim_orphans(self.heartbeat, min_idle=1.0):
                    self._spawn(self._holding(None, self._deliver, entry), run=False)
                passes += 1
                if passes % 20 == 0:
                    await self.jobs.prune_consumers(self.heartbeat)
                    await self.hooks.prune_consumers(self.heartbeat)
                self._stored = int(await self.r.zcard(pending_key(None)))
            except redis.exceptions.RedisError as exc:
                log.warning("reclaiming orphaned entries failed: %s", exc)

    async def _listen(self, last: str) -> None:
        """Wake local ``?wait=`` callers when any replica ends a job."""
        key = stream_key("jobs-done")
        while True:
            try:
                answer: Any = await self.r.xread({key: last}, count=100, block=5000)
            except redis.exceptions.RedisError as exc:
                log.warning("reading %s failed: %s", key, exc)
                await asyncio.sleep(1.0)
                continue
            for _, entries in answer or []:
                for entry_id, fields in entries:
                    last = entry_id
                    for fut in self._waiters.get((fields["tenant"], fields["id"]), ()):
                        if not fut.done():
                            fut.set_result(None)

    async def _cas(self, tenant: str, job_id: str, expect: tuple[str, str], fields: dict[str, str], hook: bool) -> bool:
        final = fields.get("status") in rec_.FINAL
        ttl = self.ttl if final else UNFINISHED_TTL
        keys = [job_key(tenant, job_id), pending_key(tenant), pending_key(None), stream_key("jobs-done")]
        args: list[Any] = [*expect, int(ttl * 1000), "1" if final else "0", "1" if hook else "0", tenant, job_id]
        args += [MAXLEN, int(UNFINISHED_TTL * 1000), *(x for kv in fields.items() for x in kv)]
        return bool(await self._transition(keys=[*keys, self.hooks.key], args=args))

    async def _take(self, entry: Entry, slot_held: bool = True) -> None:
        """Run a job delivered to (or claimed by) this replica, or settle it.

        A claimed job is settled (acked, failed, handed back) without a slot; it waits for one only to run.
        """
        tenant, job_id = entry.fields["tenant"], entry.fields["id"]
        rec = await self._record(tenant, job_id)
        if not rec or rec["status"] in rec_.FINAL:
            await self.jobs.ack(entry.id)
            return
        expect: tuple[str, str] = ("queued", "*")
        attempts = int(rec["attempts"]) + 1
        if rec["status"] == "running" and rec["owner"] == self.consumer:
            # Only after a Redis error around our own start (the reply was lost): the code never ran here.
            expect, attempts = ("running", self.consumer), attempts - 1
        elif rec["status"] == "running":
            owner = rec["owner"]
            if owner in await self.heartbeat.alive({owner}):
                await self.jobs.give_back(entry.id, owner)  # a slow replica, not a dead one
                return
            expect = ("running", owner)
            if int(rec["attempts"]) > int(rec["retries"]):
                error = ErrorBody(
                    type="interrupted",
                    message="the server running this execution stopped before it finished; it was not started "
                    "again (code may not be idempotent: ask for retries to allow it)",
                )
                await self._end(tenant, job_id, rec, expect, None, error)
                await self.jobs.ack(entry.id)
                return
        started = self._runs.get(asyncio.current_task(), [False])  # type: ignore[arg-type]

        async def on_start() -> None:
            fields = {"status": "running", "owner": self.consumer, "started_at": repr(time.time())}
            if not await self._cas(tenant, job_id, expect, fields | {"attempts": str(attempts)}, False):
                if not await self._wrote(tenant, job_id, fields):  # else: applied, and only the reply was lost
                    raise _Taken
            started[0] = True

        try:
            request = rec_.load_request(rec["request"])
        except (KeyError, ValueError) as exc:  # a record written by an incompatible version
            log.error("job %s has an unreadable request: %s", job_id, exc)
            await self._end(tenant, job_id, rec, expect, None, ErrorBody(type="internal_error", message="unreadable"))
            await self.jobs.ack(entry.id)
            return
        if not slot_held:
            await self._job_slots.acquire()
        try:
            result, failure = await self.run(tenant, request, on_start)
        except _Taken:
            log.info("job %s was taken by another replica", job_id)
            return
        finally:
            if not slot_held:
                self._job_slots.release()
        # The code ran: its end is written whatever it takes (a handler run again would not know the result).
        delay = 0.5
        while True:
            try:
                if not await self._end(tenant, job_id, rec, ("running", self.consumer), result, failure):
                    log.warning("job %s was declared interrupted meanwhile: its result is dropped", job_id)
                await self.jobs.ack(entry.id)
                return
            except redis.exceptions.RedisError as exc:
                log.warning("recording the end of job %s failed, again in %.1f s: %s", job_id, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _wrote(self, tenant: str, job_id: str, fields: dict[str, str]) -> bool:
        """Whether the record holds ``fields`` (our own CAS, sent twice because its reply was lost)."""
        rec = await self._record(tenant, job_id)
        return all(rec.get(k) == v for k, v in fields.items())

    async def _end(
        self, tenant: str, job_id: str, rec: dict[str, str], expect: tuple[str, str], result: Any, error: Any
    ) -> bool:
        fields = {"status": "completed" if result is not None else "failed", "finished_at": repr(time.time())}
        if result is not None:
            fields["result"] = result.model_dump_json()
        if error is not None:
            fields["error"] = error.model_dump_json()
        hook = bool(rec.get("callback_url")) and self.secret_of(tenant) is not None
        if hook:
            fields["callback_status"] = "pending"
        if await self._cas(tenant, job_id, expect, fields, hook):
            return True
        return await self._wrote(tenant, job_id, {"status": fields["status"], "finished_at": fields["finished_at"]})

    async def _deliver(self, entry: Entry) -> None:
        """Deliver a job's webhook, resuming the attempt count and backoff of a dead replica."""
        tenant, job_id = entry.fields["tenant"], entry.fields["id"]
        key = job_key(tenant, job_id)
        rec = await self._record(tenant, job_id)
        secret = self.secret_of(tenant)
        if not rec or rec.get("callback_status") != "pending" or not rec.get("callback_url"):
            await self.hooks.ack(entry.id)
            return
        if secret is None:  # the tenant lost its webhook secret (or was removed) meanwhile
            await self._update(keys=[key], args=["callback_status", "failed"])
            await self.hooks.ack(entry.id)
            return
        url = rec["callback_url"]
        body = rec_.view(rec, self.ttl).model_dump_json(exclude={"callback_status", "callback_attempts"}).encode()
        n = int(rec.get("callback_attempts") or 0)
        await asyncio.sleep(max(0.0, float(rec.get("callback_next_at") or 0) - time.time()))
        while True:
            n += 1
            await self._update(keys=[key], args=["callback_attempts", str(n)])
            outcome = await self.webhooks.attempt(url, body, secret, job_id, n)
            if outcome != "retry":
                break
            delay = self.webhooks.delay(n)
            await self._update(keys=[key], args=["callback_next_at", repr(time.time() + delay)])
            await asyncio.sleep(delay)
        await self._update(keys=[key], args=["callback_status", outcome])
        await self.hooks.ack(entry.id)
        log.info("webhook %s", outcome, extra={"job_id": job_id, "attempt": n})
