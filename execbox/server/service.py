"""What the routes call: tenant policy, admission, running on the executor, async jobs, shutdown.

The executor is synchronous; runs go to a bounded thread pool. Everything else
runs on the event loop, so admission state needs no locks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import anyio.to_thread

from ..config import ExecutorConfig
from ..egress import NetworkPolicy
from ..engine.base import Isolation
from ..exceptions import ExecboxError, InvalidRequestError
from ..executor import Executor, OutputCallback
from ..images import default_image
from ..models import ExecutionRequest, ExecutionResult, Limits, resolve_limits
from ..runtimes import Runtime, get_runtime
from ..sessions import Sessions
from ..settings import Settings
from ..state.base import StateStore
from .auth import Tenant
from .dispatch import Dispatcher
from .dispatch_sessions import SessionDispatcher
from .errors import ApiError, from_library
from .jobs import JobBackend, JobLimit, LocalJobs, Outcome, drain
from .logging import bind
from .metrics import Metrics, outcome_of
from .node_metrics import NodeCollector
from .quota import Gate, QueueFull, QuotaExceeded, TenantQuotas
from .schemas import ErrorBody, JobRequest
from .webhooks import WebhookSender, resolve_callback

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
        # Nodes mode: no executor here (the nodes run everything, and this host may have no engine);
        # requests are checked against this configuration, state read from this store.
        self.config: ExecutorConfig | None = None
        self.state_store: StateStore | None = None
        self.sessions: Sessions | None = None  # set at start-up unless settings.sessions is off
        self.gate = Gate(settings.max_concurrent, settings.max_queue)
        self.quotas = TenantQuotas()
        self.tenants: Callable[[str], Tenant | None] | None = None  # tenant by name (set by create_app)
        self.webhooks = WebhookSender(
            settings.webhook_timeout,
            settings.webhook_attempts,
            settings.allow_private_callbacks,
            metrics.webhook,
            backoff=settings.webhook_backoff,
        )
        self.jobs: JobBackend = self._job_backend()
        # With a queue URL, runs go to `execbox node` workers (dispatch.py) instead of this process.
        self.dispatcher: Dispatcher | None = Dispatcher(settings.queue_url) if settings.queue_url else None
        if self.dispatcher is not None:  # per-node series from what nodes publish
            nodes = NodeCollector(self.dispatcher.nodes)
            metrics.collector(nodes, nodes.refresh)
        # ... and sessions live on nodes (dispatch_sessions.py): this process opens no Sessions.
        self.session_nodes = (
            SessionDispatcher(self.dispatcher.r) if self.dispatcher is not None and settings.sessions else None
        )
        self.accepting = True
        self._threads = anyio.CapacityLimiter(settings.max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()
        metrics.gauge("execbox_queue_waiting", "Requests waiting for an execution slot.", lambda: self.gate.waiting)
        metrics.gauge(
            "execbox_jobs_stored",
            "Async executions held: any status (embedded), or unfinished ones of every replica (Redis queue).",
            lambda: self.jobs.stored(),
        )
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

    def _job_backend(self) -> JobBackend:
        s = self.settings
        url = s.job_queue()
        if url is None:
            return LocalJobs(self.run_job, self._secret_of, self.webhooks, s.job_ttl, s.max_jobs)
        from .redisjobs import RedisJobs

        return RedisJobs(
            url,
            self.run_job,
            self._secret_of,
            self.webhooks,
            s.job_ttl,
            s.max_jobs,
            slots=s.max_concurrent,
            heartbeat_ttl=s.job_heartbeat_ttl,
        )

    # -- policy -------------------------------------------------------------------------------

    @property
    def ex(self) -> Executor:
        if self.executor is None:
            raise ApiError(503, "starting", "the service is starting", retry_after=1)
        return self.executor

    @property
    def defaults(self) -> ExecutorConfig:
        """What requests are checked against: the executor's configuration, or (nodes mode) the service's."""
        if self.executor is not None:
            return self.executor.config
        if self.config is None:
            raise ApiError(503, "starting", "the service is starting", retry_after=1)
        return self.config

    @property
    def default_image(self) -> str:
        if self.executor is not None:
            return self.executor.image
        return self.defaults.image or default_image()

    @property
    def store(self) -> StateStore | None:
        """Where users' state is kept (the executor's store, or in nodes mode the service's own)."""
        return self.executor.state_store if self.executor is not None else self.state_store

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
        runtime = self.permit(tenant, request.language, request.image, request.network)
        isolation = self.isolation(tenant, request.isolation)
        limits = self.resolve_limits(tenant, request)
        update = {"language": runtime.name, "limits": limits, "timeout": None, "isolation": isolation}
        return request.model_copy(update=update)

    def isolation(self, tenant: Tenant, requested: Isolation | None) -> Isolation:
        """The isolation the tenant's request runs under; 403 naming ``isolation`` if it may not use it."""
        isolation = tenant.isolation_for(requested, self.defaults.isolation)
        if isolation is None:
            raise ApiError(403, "forbidden", f"this tenant may not use isolation {requested!r}", field="isolation")
        return isolation

    def permit(self, tenant: Tenant, language: str, image: str | None, network: NetworkPolicy | None) -> Runtime:
        """The runtime of ``language`` if the tenant may use it, that image and that network; else a 403."""
        runtime = get_runtime(language)
        if runtime.name not in tenant.policy.languages:
            raise ApiError(403, "forbidden", f"this tenant may not use {runtime.name}", field="language")
        if image is not None and not tenant.image_allowed(image, self.default_image):
            raise ApiError(403, "forbidden", "this tenant may not use this image", field="image")
        if network is not None and network.mode != "none" and not tenant.policy.network:
            raise ApiError(403, "forbidden", "this tenant may not use the network", field="network.mode")
        return runtime

    def resolve_limits(self, tenant: Tenant, request: ExecutionRequest) -> Limits:
        """Defaults (capped at the tenant's maximum), then the request's values, checked against that maximum."""
        cap, defaults = tenant.max_limits, self.defaults.default_limits
        base = Limits(**{k: min(getattr(defaults, k), getattr(cap, k)) for k in Limits.model_fields})
        limits = resolve_limits(base, cap, request.limits, request.timeout, whose="this tenant's maximum")
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
        executor = self.ex if self.dispatcher is None else None
        self.metrics.started()
        started = time.monotonic()
        outcome = "failed"
        try:
            if executor is None:  # on a node; its output streamed through Redis when asked
                assert self.dispatcher is not None
                result = await self.dispatcher.run(tenant.name, request, tenant.policy.egress, on_output)
            else:
                call = functools.partial(
                    executor.run, request, on_output, tenant=tenant.name, network_ceiling=tenant.policy.egress
                )
                result = await anyio.to_thread.run_sync(call, limiter=self._threads)
            bind(execution_id=result.id)  # for the request's access log line
            outcome = outcome_of(result)
            return result
        finally:
            self.metrics.finished(request.language, outcome, time.monotonic() - started)

    async def execute(self, tenant: Tenant, request: ExecutionRequest) -> ExecutionResult:
        """One execution as the API answers it: checked against the tenant's policy, admitted (or
        refused: 429/503), run, and its slots released."""
        prepared = self.prepare(tenant, request)
        admission = await self.admit(tenant)
        try:
            return await self.run(tenant, prepared)
        finally:
            admission.release()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in the background; shutdown waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- async jobs ---------------------------------------------------------------------------

    def tenant(self, name: str) -> Tenant | None:
        return self.tenants(name) if self.tenants is not None else None

    def _secret_of(self, name: str) -> str | None:
        tenant = self.tenant(name)
        return tenant.policy.webhook_secret if tenant is not None else None

    async def submit(self, tenant: Tenant, body: JobRequest) -> str:
        """Accept an async execution (its id), or raise the ApiError that refuses it."""
        self._check_accepting()
        exclude = {"callback_url", "retries"}
        request = ExecutionRequest.model_validate(body.model_dump(exclude=exclude, exclude_unset=True))
        prepared = self.prepare(tenant, request)
        if body.callback_url is not None:
            if tenant.policy.webhook_secret is None:
                raise InvalidRequestError("callback_url", "this tenant has no webhook secret configured")
            await resolve_callback(body.callback_url, self.settings.allow_private_callbacks)
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
        try:
            job_id = await self.jobs.submit(
                tenant.name, prepared, body.callback_url, body.retries, self.settings.max_pending_jobs_per_tenant
            )
        except JobLimit as exc:
            st.rate.refund()
            if exc.reason == "jobs_full":
                raise ApiError(
                    503,
                    "server_busy",
                    "too many async executions held",
                    retry_after=self.settings.retry_after,
                    reason="jobs_full",
                ) from None
            raise ApiError(
                429,
                "quota_exceeded",
                "too many unfinished async executions for this tenant",
                retry_after=1,
                reason="pending_jobs",
            ) from None
        except BaseException:
            st.rate.refund()
            raise
        log.info("execution queued", extra={"job_id": job_id, "language": prepared.language})
        return job_id

    async def run_job(
        self, tenant_name: str, request: ExecutionRequest, on_start: Callable[[], Awaitable[None]]
    ) -> Outcome:
        """Run a job under the tenant's and the global slots; ``on_start`` once they are held."""
        bind(tenant=tenant_name)
        tenant = self.tenant(tenant_name)
        if tenant is None:
            return None, ErrorBody(type="forbidden", message="the tenant of this execution no longer exists")
        st = self.quotas.state(tenant.name, tenant.policy.max_concurrent, tenant.policy.executions_per_minute)
        await st.slots.acquire(bounded=False)
        try:
            await self.gate.acquire(bounded=False)
            try:
                await on_start()
                try:
                    return await self.run(tenant, request), None
                except ExecboxError as exc:
                    err = from_library(exc)
                    return None, ErrorBody(type=err.type, message=err.message, field=err.field)
                except Exception as exc:  # never lose a job silently
                    log.exception("async execution failed")
                    return None, ErrorBody(type="internal_error", message=type(exc).__name__)
            finally:
                self.gate.release()
        finally:
            st.slots.release()

    # -- shutdown -----------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Refuse new work, let running executions finish within ``grace`` seconds; queued jobs fail
        (embedded) or stay queued for another replica (Redis)."""
        self.accepting = False
        jobs = asyncio.get_running_loop().create_task(self.jobs.shutdown(grace))
        await drain(set(self._tasks), grace, "background executions")
        await jobs
