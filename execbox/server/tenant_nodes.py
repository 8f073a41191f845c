"""A tenant's sessions when nodes hold them (``execbox serve --queue-url``): the same policy and
quotas as ``TenantSessions``, the work sent to the nodes by ``SessionDispatcher``.

``tenant_sessions()`` picks the face for the service: this one in nodes mode (the replica
opens no ``Sessions`` and needs no engine for them), else ``TenantSessions`` over the
service's own ``Sessions``.
"""

from __future__ import annotations

from ..executor import OutputCallback
from ..sessions import SessionCreateRequest, SessionExecuteRequest, SessionInfo, SessionResult, Sessions
from .auth import Tenant
from .dispatch_sessions import SessionDispatcher
from .errors import ApiError
from .service import ExecutionService
from .tenant_sessions import TenantSessions

__all__ = ["NodeTenantSessions", "tenant_sessions"]


def tenant_sessions(service: ExecutionService, sessions: Sessions | None, tenant: Tenant) -> TenantSessions:
    """The tenant's sessions on this service: on nodes, or in this process."""
    if service.session_nodes is not None:
        return NodeTenantSessions(service, service.session_nodes, tenant)
    if sessions is None:
        raise ApiError(503, "starting", "the service is starting", retry_after=1)
    return TenantSessions(service, sessions, tenant)


class NodeTenantSessions(TenantSessions):
    """One tenant's sessions held by nodes (a call's output streamed from its node when asked)."""

    def __init__(self, service: ExecutionService, nodes: SessionDispatcher, tenant: Tenant) -> None:
        self.service, self.nodes, self.tenant = service, nodes, tenant

    async def create(self, body: SessionCreateRequest) -> SessionInfo:
        tenant, service = self.tenant, self.service
        runtime, limits, isolation = self.checked(body)
        payload = {
            "user_id": body.user_id,
            "language": runtime.name,
            "image": body.image,
            "limits": limits.model_dump(mode="json"),
            "network": body.network.model_dump(mode="json") if body.network is not None else None,
            "secrets": {name: secret.wire() for name, secret in body.secrets.items()},  # dumps mask values
            "idle_timeout": body.idle_timeout,
            "max_lifetime": body.max_lifetime,
            "repl": body.repl,
            "isolation": isolation,
            "pause_after": body.pause_after,
            "checkpoint_quota": tenant.policy.checkpoint_quota,  # the node counts the tenant's checkpoints
        }
        ceiling = tenant.policy.egress.model_dump_json() if tenant.policy.egress is not None else ""
        max_per_user = service.settings.session_max_per_user
        return await self.nodes.create(tenant.name, body.user_id, payload, ceiling, max_per_user)

    async def run_admitted(
        self, session_id: str, body: SessionExecuteRequest, on_output: OutputCallback | None = None
    ) -> SessionResult:
        return await self.nodes.execute(self.tenant.name, session_id, body.model_dump_json(), body.timeout, on_output)

    async def list(self) -> list[SessionInfo]:
        return await self.nodes.list(self.tenant.name)

    async def get(self, session_id: str) -> SessionInfo:
        return await self.nodes.info(self.tenant.name, session_id, "get")

    async def pause(self, session_id: str) -> SessionInfo:
        return await self.nodes.info(self.tenant.name, session_id, "pause")

    async def resume(self, session_id: str) -> SessionInfo:
        return await self.nodes.info(self.tenant.name, session_id, "resume")

    async def delete(self, session_id: str) -> None:
        await self.nodes.call(self.tenant.name, session_id, "delete")
