"""What the routes call: tenant policy, admission, running on the executor, async jobs, shutdown.

The executor is synchronous; runs go to a bounded thread pool. Everything else
runs on the event loop, so admission state needs no locks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Coroutine
from typing import Any

import anyio
import anyio.to_thread

from ..exceptions import ExecboxError, InvalidRequestError
from ..executor import Executor, OutputCallback
from ..models import ExecutionRequest, ExecutionResult, Limits
from ..runtimes import get_runtime
from ..sessions import Sessions
from ..settings import Settings
from .auth import Tenant
from .errors import ApiError, from_library
from .jobs import Job, JobStore, WebhookSender, resolve_callback
from .logging import bind
from .metrics import Metrics, outcome_of
from .quota import Gate, QueueFull, QuotaExceeded, TenantQuotas
from .schemas import ErrorBody, JobRequest

__all__ = ["Admission", "ExecutionService"]

log = logging.getLogger("execbox.server")


class Admission:
    """The slots one execution holds (tenant + global); ``release()`` is idempotent."""

    def __init__(self, service: ExecutionService, tenant_gate: Gate) -> None:
        self._service, self._tenant_gate = service, tenant_gate
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._service.gate.release()
            self._tenant_gate.release()


class ExecutionService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.executor: Executor | None = None
        self.sessions: Sessions | None = None  # set at start-up unless settings.sessions is off
        self.gate = Gate(settings.max_concurrent, settings.max_queue)
        self.quotas = TenantQuotas()
        self.jobs = JobStore(settings.job_ttl, settings.max_jobs)
        self.webhooks = WebhookSender(
            settings.webhook_timeout, settings.webhook_attempts, settings.allow_private_callbacks, metrics.webhook
        )
        self.accepting = True
        self._threads = anyio.CapacityLimiter(settings.max_concurrent)
        self._tasks: dict[asyncio.Task[None], Job | None] = {}
        metrics.gauge("execbox_queue_waiting", "Requests waiting for an execution slot.", lambda: self.gate.waiting)
        metrics.gauge("execbox_jobs_stored", "Async executions held (any status).", lambda: len(self.jobs))
        for field, help_ in (
            ("hits", "Runs served by a ready pooled sandbox (since start)."),
            ("misses", "Runs that waited for a fresh sandbox (since start)."),
            ("miss_wait_ms", "Milliseconds runs spent waiting for fresh sandboxes (since start)."),
            ("created", "Pooled sandboxes created by the refiller (since start)."),
            ("create_failures", "Failed pooled sandbox creations (since start)."),
            ("expired", "Pooled sandboxes replaced for age (since start)."),
            ("dead", "Pooled sandboxes found dead when handed out (since start)."),
            ("ready", "Pooled sandboxes ready now."),
        ):
            metrics.gauge(f"execbox_pool_{field}", help_, functools.partial(self._pool_stat, field))
        for field, help_ in (
            ("live", "Live sessions in the registry (every replica's)."),
            ("creating", "Sessions whose container is being created."),
            ("attached", "Sessions this process holds a connection to."),
            ("created", "Sessions this process created (since start)."),
            ("ended", "Sessions this process ended: deleted, idle, expired or dead (since start)."),
        ):
            metrics.gauge(f"execbox_sessions_{field}", help_, functools.partial(self._session_stat, field))
        self._session_stats: tuple[float, dict[str, int]] = (0.0, {})

    # -- policy -------------------------------------------------------------------------------

    @property
    def ex(self) -> Executor:
        if self.executor is None:
            raise ApiError(503, "starting", "the service is starting", retry_after=1)
        return self.executor

    def _pool_stat(self, field: str) -> float:
        stats = self.executor.pool_stats() if self.executor is not None else None
        return float(getattr(stats, field)) if stats is not None else 0.0

    def _session_stat(self, field: str) -> float:
        if self.sessions is None:
            return 0.0
        at, stats = self._session_stats
        if time.monotonic() - at > 1.0:  # one registry scan per scrape, not one per gauge
            stats = self.sessions.stats()
            self._session_stats = (time.monotonic(), stats)
        return float(stats.get(field, 0))

    def prepare(self, tenant: Tenant, request: ExecutionRequest) -> ExecutionRequest:
        """The request as it will run: checked against the tenant's policy, limits fully resolved."""
        if len(request.code.encode()) > self.settings.max_code_bytes:
            raise ApiError(
                413,
                "payload_too_large",
                f"larger than {self.settings.max_code_bytes} bytes",
                field="code",
                reason="too_large",
            )
        runtime = get_runtime(request.language)
        if runtime.name not in tenant.policy.languages:
            raise ApiError(403, "forbidden", f"this tenant may not use {runtime.name}", field="language")
        if request.image is not None and not tenant.image_allowed(request.image, self.ex.image):
            raise ApiError(403, "forbidden", "this tenant may not use this image", field="image")
        if request.network is not None and request.network.mode != "none" and not tenant.policy.network:
            raise ApiError(403, "forbidden", "this tenant may not use the network", field="network.mode")
        limits = self.resolve_limits(tenant, request)
        return request.model_copy(update={"language": runtime.name, "limits": limits, "timeout": None})

    def resolve_limits(self, tenant: Tenant, request: ExecutionRequest) -> Limits:
        """Defaults (capped at the tenant's maximum), then the request's values, checked against that maximum."""
        cap, defaults = tenant.max_limits, self.ex.config.default_limits
        base = Limits(**{k: min(getattr(defaults, k), getattr(cap, k)) for k in Limits.model_fields})
        limits = base.merged(request.limits)
        if request.timeout is not None:
            limits = limits.model_copy(update={"timeout": request.timeout})
        for name in limits.exceeding(cap):
            field = "timeout" if name == "timeout" and request.timeout is not None else f"limits.{name}"
            raise InvalidRequestError(
                field, f"{getattr(limits, name)} exceeds this tenant's maximum {getattr(cap, name)}"
            )
        # Every field explicitly set, so that the executor's own defaults do not apply again.
        return Limits(**limits.model_dump())

    # -- admission ----------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise ApiError(503, "shutting_down", "the server is shutting down", retry_after=self.settings.retry_after)

    async def admit(self, tenant: Tenant) -> Admission:
        """Take the tenant's and a global slot (waiting in the bounded queue), or raise 429/503."""
        self._check_accepting()
        st = self.quotas.state(tenant.name, tenant.policy.max_concurrent, tenant.policy.executions_per_minute)
        try:
            self.quotas.admit_now(st)
        except QuotaExceeded as q:
            raise ApiError(429, "quota_exceeded", q.message, retry_after=q.retry_after, reason=q.reason) from None
        try:
            await self.gate.acquire(self.settings.queue_timeout)
        except (QueueFull, TimeoutError) as exc:
            st.slots.release()
            st.rate.refund()
            full = isinstance(exc, QueueFull)
            raise ApiError(
                503,
                "server_busy",
                "too many executions queued" if full else "no execution slot became free in time",
                retry_after=self.settings.retry_after,
                reason="queue_full" if full else "queue_timeout",
            ) from None
        except BaseException:
            st.slots.release()
            st.rate.refund()
            raise
        return Admission(self, st.slots)

    # -- running ------------------------------------------------------------------------------

    async def run(
        self, tenant: Tenant, request: ExecutionRequest, on_output: OutputCallback | None = None
    ) -> ExecutionResult:
        """Run on the executor in a worker thread; not cancellable once started (the run always finishes).

        The tenant's name namespaces everything the run may store (state of ``user_id``, volumes).
        """
        executor = self.ex
        self.metrics.started()
        started = time.monotonic()
        outcome = "failed"
        try:
            call = functools.partial(
                executor.run, request, on_output, tenant=tenant.name, network_ceiling=tenant.policy.egress
            )
            result = await anyio.to_thread.run_sync(call, limiter=self._threads)
            bind(execution_id=result.id)  # for the request's access log line
            outcome = outcome_of(result)
            return result
        finally:
            self.metrics.finished(request.language, outcome, time.monotonic() - started)

    def spawn(self, coro: Coroutine[Any, Any, None], job: Job | None = None) -> asyncio.Task[None]:
        """Run ``coro`` in the background; shutdown waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks[task] = job
        task.add_done_callback(lambda t: self._tasks.pop(t, None))
        return task

    # -- async jobs ---------------------------------------------------------------------------

    async def submit(self, tenant: Tenant, body: JobRequest) -> Job:
        self._check_accepting()
        request = ExecutionRequest.model_validate(body.model_dump(exclude={"callback_url"}, exclude_unset=True))
        prepared = self.prepare(tenant, request)
        if body.callback_url is not None:
            if tenant.policy.webhook_secret is None:
                raise InvalidRequestError("callback_url", "this tenant has no webhook secret configured")
            await resolve_callback(body.callback_url, self.settings.allow_private_callbacks)
        if not self.jobs.has_room():
            raise ApiError(
                503,
                "server_busy",
                "too many async executions held",
                retry_after=self.settings.retry_after,
                reason="jobs_full",
            )
        if self.jobs.pending(tenant.name) >= self.settings.max_pending_jobs_per_tenant:
            raise ApiError(
                429,
                "quota_exceeded",
                "too many unfinished async executions for this tenant",
                retry_after=1,
                reason="pending_jobs",
            )
        st = self.quotas.state(tenant.name, tenant.policy.max_concurrent, tenant.policy.executions_per_minute)
        wait = st.rate.take()
        if wait:
            raise ApiError(
                429,
                "quota_exceeded",
                f"at most {st.rate.per_minute} executions per minute for this tenant",
                retry_after=wait,
                reason="rate_limited",
            )
        job = Job(self.jobs.new_id(), tenant.name, prepared, time.time(), callback_url=body.callback_url)
        self.jobs.add(job)
        self.spawn(self._run_job(tenant, st.slots, job), job)
        log.info("execution queued", extra={"job_id": job.id, "language": prepared.language})
        return job

    async def _run_job(self, tenant: Tenant, tenant_gate: Gate, job: Job) -> None:
        bind(tenant=tenant.name)
        try:
            await tenant_gate.acquire(bounded=False)
            try:
                await self.gate.acquire(bounded=False)
                try:
                    job.status, job.started_at = "running", time.time()
                    job.result = await self.run(tenant, job.request)
                    job.status = "completed"
                finally:
                    self.gate.release()
            finally:
                tenant_gate.release()
        except asyncio.CancelledError:
            job.status = "failed"
            job.error = ErrorBody(type="shutting_down", message="the server shut down before the execution ran")
        except ExecboxError as exc:
            err = from_library(exc)
            job.status, job.error = "failed", ErrorBody(type=err.type, message=err.message, field=err.field)
        except Exception as exc:  # never lose a job silently
            log.exception("async execution failed")
            job.status = "failed"
            job.error = ErrorBody(type="internal_error", message=type(exc).__name__)
        job.finished_at = time.time()
        job.done.set()
        if job.callback_url is not None and tenant.policy.webhook_secret is not None:
            job.callback_status = "pending"
            payload = job.view(self.jobs.ttl).model_dump_json(exclude={"callback_status"}).encode()
            ok = await self.webhooks.deliver(job.callback_url, payload, tenant.policy.webhook_secret)
            job.callback_status = "delivered" if ok else "failed"

    # -- shutdown -----------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Refuse new work, fail queued jobs, let running ones finish within ``grace`` seconds."""
        self.accepting = False
        for task, job in list(self._tasks.items()):
            if job is not None and job.status == "queued":
                task.cancel()
        pending = set(self._tasks)
        if pending:
            log.info("waiting for %d background executions", len(pending), extra={"in_flight": len(pending)})
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
