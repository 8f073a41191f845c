"""Async executions (jobs): the backend interface, and the embedded one (this process's memory).

A job is visible only to its tenant: looking up another tenant's id answers
exactly like an unknown id. Finished jobs are forgotten ``ttl`` seconds after
they finish.

Two backends: ``LocalJobs`` (one process, no Redis: jobs run as tasks of this
process and end with it) and ``RedisJobs`` (``redisjobs.py``: records and queues
in Redis, shared by every replica). Both run a job through the service's
``Runner``, which calls ``on_start`` once the job holds its execution slots, just
before the code starts: that is when a job becomes ``running``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..models import ExecutionRequest, ExecutionResult
from .schemas import ErrorBody, ExecutionJob, JobStatus
from .webhooks import WebhookSender, check_callback_url, resolve_callback

__all__ = [
    "Job",
    "JobBackend",
    "JobLimit",
    "JobStore",
    "LocalJobs",
    "Outcome",
    "Runner",
    "check_callback_url",
    "new_job_id",
    "resolve_callback",
]

log = logging.getLogger("execbox.server.jobs")

Outcome = tuple[ExecutionResult | None, ErrorBody | None]
Runner = Callable[[str, ExecutionRequest, Callable[[], Awaitable[None]]], Awaitable[Outcome]]
"""``run(tenant name, request, on_start)``: the result or the error it failed with."""
SecretOf = Callable[[str], str | None]
"""The webhook secret of a tenant (by name), if it has one."""

SHUTDOWN_ERROR = ErrorBody(type="shutting_down", message="the server shut down before the execution ran")


async def drain(pending: set[asyncio.Task[Any]], grace: float, what: str) -> None:
    """Let ``pending`` finish within ``grace`` seconds; cancel what is left (and give it 5 s to go)."""
    if not pending:
        return
    log.info("waiting for %d %s", len(pending), what, extra={"in_flight": len(pending)})
    _, still = await asyncio.wait(pending, timeout=grace)
    for task in still:
        task.cancel()
    if still:
        await asyncio.wait(still, timeout=5)


class JobLimit(Exception):
    """A job was refused: ``pending_jobs`` (the tenant's unfinished jobs) or ``jobs_full`` (all jobs)."""

    def __init__(self, reason: Literal["pending_jobs", "jobs_full"]) -> None:
        self.reason = reason
        super().__init__(reason)


def new_job_id() -> str:
    return "ex_" + secrets.token_urlsafe(18)


class JobBackend(ABC):
    """Where async jobs live and who runs them."""

    def __init__(self, run: Runner, secret_of: SecretOf, webhooks: WebhookSender, ttl: float) -> None:
        self.run, self.secret_of, self.webhooks, self.ttl = run, secret_of, webhooks, ttl

    async def start(self) -> None:  # noqa: B027 - optional
        """Begin taking work (called once the service is ready)."""

    @abstractmethod
    async def submit(
        self, tenant: str, request: ExecutionRequest, callback_url: str | None, retries: int, max_pending: int
    ) -> str:
        """Accept a job (its id), or raise JobLimit."""

    @abstractmethod
    async def get(self, tenant: str, job_id: str) -> ExecutionJob | None: ...

    @abstractmethod
    async def wait(self, tenant: str, job_id: str, timeout: float) -> ExecutionJob | None:
        """The job once finished, or as it is after ``timeout`` seconds; None if unknown."""

    @abstractmethod
    async def shutdown(self, grace: float) -> None:
        """Stop taking work; let running jobs finish within ``grace`` seconds."""

    @abstractmethod
    def stored(self) -> int:
        """Jobs held (for the metrics gauge)."""


@dataclass
class Job:
    id: str
    tenant: str
    request: ExecutionRequest
    created_at: float
    callback_url: str | None = None
    retries: int = 0
    status: JobStatus = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    result: ExecutionResult | None = None
    error: ErrorBody | None = None
    callback_status: Literal["pending", "delivered", "failed"] | None = None
    callback_attempts: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self, ttl: float) -> ExecutionJob:
        return ExecutionJob(
            id=self.id,
            status=self.status,
            language=self.request.language,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            expires_at=self.finished_at + ttl if self.finished_at is not None else None,
            result=self.result,
            error=self.error,
            callback_url=self.callback_url,
            callback_status=self.callback_status,
            callback_attempts=self.callback_attempts,
            attempts=0 if self.started_at is None else 1,
            retries=self.retries,
        )


class JobStore:
    """Jobs by (tenant, id) in memory; bounded in number, finished ones expire."""

    def __init__(self, ttl: float, max_jobs: int, clock: Callable[[], float] = time.time) -> None:
        self.ttl, self.max_jobs, self.clock = ttl, max_jobs, clock
        self._jobs: dict[tuple[str, str], Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def new_id(self) -> str:
        return new_job_id()

    def has_room(self) -> bool:
        self.purge()
        return len(self._jobs) < self.max_jobs

    def add(self, job: Job) -> None:
        self._jobs[(job.tenant, job.id)] = job

    def get(self, tenant: str, job_id: str) -> Job | None:
        job = self._jobs.get((tenant, job_id))
        if job is not None and self._expired(job, self.clock()):
            del self._jobs[(tenant, job_id)]
            return None
        return job

    def pending(self, tenant: str) -> int:
        return sum(1 for (t, _), j in self._jobs.items() if t == tenant and j.finished_at is None)

    def purge(self) -> int:
        now = self.clock()
        dead = [k for k, j in self._jobs.items() if self._expired(j, now)]
        for k in dead:
            del self._jobs[k]
        return len(dead)

    def _expired(self, job: Job, now: float) -> bool:
        return job.finished_at is not None and job.finished_at + self.ttl <= now


class LocalJobs(JobBackend):
    """The embedded backend: jobs are tasks of this process; on shutdown queued ones fail."""

    def __init__(self, run: Runner, secret_of: SecretOf, webhooks: WebhookSender, ttl: float, max_jobs: int) -> None:
        super().__init__(run, secret_of, webhooks, ttl)
        self.store = JobStore(ttl, max_jobs)
        self._tasks: dict[asyncio.Task[None], Job] = {}

    def stored(self) -> int:
        return len(self.store)

    async def submit(
        self, tenant: str, request: ExecutionRequest, callback_url: str | None, retries: int, max_pending: int
    ) -> str:
        if not self.store.has_room():
            raise JobLimit("jobs_full")
        if self.store.pending(tenant) >= max_pending:
            raise JobLimit("pending_jobs")
        job = Job(self.store.new_id(), tenant, request, time.time(), callback_url=callback_url, retries=retries)
        self.store.add(job)
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks[task] = job
        task.add_done_callback(lambda t: self._tasks.pop(t, None))
        return job.id

    async def get(self, tenant: str, job_id: str) -> ExecutionJob | None:
        job = self.store.get(tenant, job_id)
        return None if job is None else job.view(self.ttl)

    async def wait(self, tenant: str, job_id: str, timeout: float) -> ExecutionJob | None:
        job = self.store.get(tenant, job_id)
        if job is not None and job.finished_at is None:
            try:
                await asyncio.wait_for(job.done.wait(), timeout)
            except TimeoutError:
                pass
        return None if job is None else job.view(self.ttl)

    async def _run(self, job: Job) -> None:
        async def on_start() -> None:
            job.status, job.started_at = "running", time.time()

        try:
            job.result, job.error = await self.run(job.tenant, job.request, on_start)
        except asyncio.CancelledError:
            job.result, job.error = None, SHUTDOWN_ERROR
        job.status = "completed" if job.result is not None else "failed"
        job.finished_at = time.time()
        job.done.set()
        secret = self.secret_of(job.tenant)
        if job.callback_url is not None and secret is not None:
            job.callback_status = "pending"
            body = job.view(self.ttl).model_dump_json(exclude={"callback_status", "callback_attempts"}).encode()
            for n in range(1, self.webhooks.attempts + 1):
                job.callback_attempts = n
                outcome = await self.webhooks.attempt(job.callback_url, body, secret, job.id, n)
                if outcome != "retry":
                    break
                await asyncio.sleep(self.webhooks.delay(n))
            job.callback_status = "delivered" if outcome == "delivered" else "failed"

    async def shutdown(self, grace: float) -> None:
        for task, job in list(self._tasks.items()):
            if job.status == "queued":
                task.cancel()
        await drain(set(self._tasks), grace, "async executions")
