"""A tenant's view of the sessions: its policy and quotas applied, the library doing the work.

The HTTP routes (``routes/sessions.py``) and the MCP tools mounted at ``/mcp`` both go
through this, so that a session call is checked and counted the same way whichever
face it came in by.
"""

from __future__ import annotations

import anyio.to_thread

from ..engine.base import Isolation
from ..exceptions import InvalidRequestError
from ..executor import OutputCallback
from ..models import ExecutionRequest, Limits
from ..runtimes import Runtime
from ..sessions import SessionCreateRequest, SessionExecuteRequest, SessionInfo, SessionResult, Sessions
from .auth import Tenant
from .errors import ApiError
from .service import Admission, ExecutionService

__all__ = ["TenantSessions"]


class TenantSessions:
    """One tenant's sessions on this service (raises library errors and ``ApiError``)."""

    def __init__(self, service: ExecutionService, sessions: Sessions, tenant: Tenant) -> None:
        self.service, self.sessions, self.tenant = service, sessions, tenant

    def checked(self, body: SessionCreateRequest) -> tuple[Runtime, Limits, Isolation]:
        """The tenant's policy applied to a creation: its runtime, its limits (the service's defaults
        capped at the tenant's maximum, then the request's, checked against it), its isolation."""
        tenant, service = self.tenant, self.service
        runtime = service.permit(tenant, body.language, body.image, body.network)
        request = ExecutionRequest.model_construct(code="", limits=body.limits, timeout=None)
        return runtime, service.resolve_limits(tenant, request), service.isolation(tenant, body.isolation)

    async def create(self, body: SessionCreateRequest) -> SessionInfo:
        tenant = self.tenant
        runtime, limits, isolation = self.checked(body)

        def create() -> SessionInfo:
            return self.sessions.create(
                body.user_id,
                runtime.name,
                image=body.image,
                limits=limits,
                network=body.network,
                idle_timeout=body.idle_timeout,
                max_lifetime=body.max_lifetime,
                tenant=tenant.name,
                repl=body.repl,
                secrets=body.secrets,
                network_ceiling=tenant.policy.egress,
                isolation=isolation,
                pause_after=body.pause_after,
                checkpoint_quota=tenant.policy.checkpoint_quota,
            )

        return await anyio.to_thread.run_sync(create)

    async def execute(
        self, session_id: str, body: SessionExecuteRequest, on_output: OutputCallback | None = None
    ) -> SessionResult:
        """One call, admitted like an execution (the tenant's concurrency and rate, the global queue)."""
        admission = await self.admit(body)
        try:
            return await self.run_admitted(session_id, body, on_output)
        finally:
            admission.release()

    async def admit(self, body: SessionExecuteRequest) -> Admission:
        """Check the call against the tenant's policy and take its slots (``release()`` them after)."""
        settings, tenant = self.service.settings, self.tenant
        if body.code is not None and len(body.code.encode()) > settings.max_code_bytes:
            message = f"larger than {settings.max_code_bytes} bytes"
            raise ApiError(413, "payload_too_large", message, field="code", reason="too_large")
        if body.timeout is not None and body.timeout > tenant.max_limits.timeout:
            cap = tenant.max_limits.timeout
            raise InvalidRequestError("timeout", f"{body.timeout} exceeds this tenant's maximum {cap}")
        return await self.service.admit(tenant)

    async def run_admitted(
        self, session_id: str, body: SessionExecuteRequest, on_output: OutputCallback | None = None
    ) -> SessionResult:
        def run() -> SessionResult:
            return self.sessions.execute(
                session_id,
                body.code,
                body.env,
                body.timeout,
                tenant=self.tenant.name,
                files=dict(body.files),
                collect=body.collect,
                on_output=on_output,
            )

        return await anyio.to_thread.run_sync(run)

    async def list(self) -> list[SessionInfo]:
        return await anyio.to_thread.run_sync(lambda: self.sessions.list(self.tenant.name))

    async def get(self, session_id: str) -> SessionInfo:
        return await anyio.to_thread.run_sync(lambda: self.sessions.get(session_id, tenant=self.tenant.name))

    async def pause(self, session_id: str) -> SessionInfo:
        return await anyio.to_thread.run_sync(lambda: self.sessions.pause(session_id, tenant=self.tenant.name))

    async def resume(self, session_id: str) -> SessionInfo:
        return await anyio.to_thread.run_sync(lambda: self.sessions.resume(session_id, tenant=self.tenant.name))

    async def delete(self, session_id: str) -> None:
        await anyio.to_thread.run_sync(lambda: self.sessions.delete(session_id, tenant=self.tenant.name))
