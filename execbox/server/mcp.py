"""The MCP tools at ``/mcp`` (streamable HTTP), served by ``execbox serve``.

The ``Guard`` authenticates every request to ``/mcp`` with the tenant's bearer key, as for
``/v1/...``; each tool call then goes through the same policy and admission as the API
(``ExecutionService.prepare``/``admit``/``run`` for runs, ``TenantSessions`` for sessions),
so it counts against the tenant's quotas and shows in the same metrics. The transport is
stateless: an API replica keeps nothing an MCP client needs after it dies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any

import pydantic
from starlette.routing import Route

from ..client import error_from
from ..exceptions import AuthenticationError, ExecboxError, NotFoundError
from ..mcp.backend import McpBackend
from ..mcp.tools import build_server
from ..models import ExecutionRequest, ExecutionResult
from ..sessions import SessionCreateRequest, SessionExecuteRequest, SessionInfo, SessionResult
from ..settings import Settings
from .auth import Tenant
from .errors import ApiError, from_library, invalid_from
from .middleware import TENANT_SCOPE_KEY
from .service import ExecutionService
from .tenant_nodes import tenant_sessions
from .tenant_sessions import TenantSessions

__all__ = ["MCP_PATH", "ServiceBackend", "mcp_route"]

MCP_PATH = "/mcp"


@contextmanager
def _answered(service: ExecutionService) -> Iterator[None]:
    """A tool call's refusals as the exceptions the client would raise (the tools name the field),
    each counted in ``rejections_total`` as the API counts it."""
    try:
        yield
    except pydantic.ValidationError as exc:
        service.metrics.rejected("invalid")
        raise invalid_from(exc) from None
    except ApiError as exc:
        service.metrics.rejected(exc.reason)
        raise error_from(exc.status, exc.type, exc.message, exc.field, exc.retry_after, exc.node) from None
    except ExecboxError as exc:
        err = from_library(exc)
        if err.status < 500:
            service.metrics.rejected(err.reason)
        raise


class ServiceBackend(McpBackend):
    """One tool call's view of the service, as ``tenant``."""

    def __init__(self, service: ExecutionService, tenant: Tenant) -> None:
        self.service, self.tenant = service, tenant

    def _sessions(self) -> TenantSessions:
        if self.service.sessions is None and self.service.session_nodes is None:
            raise NotFoundError("sessions are disabled on this server", 404)
        return tenant_sessions(self.service, self.service.sessions, self.tenant)

    async def run(
        self,
        code: str,
        language: str,
        *,
        env: dict[str, str],
        timeout: float | None,
        files: dict[str, bytes],
        collect: list[str],
        image: str | None,
        isolation: str | None = None,
    ) -> ExecutionResult:
        fields: dict[str, Any] = {"code": code, "language": language, "env": env, "files": files, "collect": collect}
        fields |= {
            k: v for k, v in {"timeout": timeout, "image": image, "isolation": isolation}.items() if v is not None
        }
        with _answered(self.service):
            request = ExecutionRequest.model_validate(fields)
            return await self.service.execute(self.tenant, request)

    async def create_session(
        self, language: str, image: str | None, isolation: str | None = None, pause_after: float | None = None
    ) -> SessionInfo:
        fields = {"user_id": self.user_id, "language": language, "image": image, "isolation": isolation}
        with _answered(self.service):
            body = SessionCreateRequest.model_validate({**fields, "pause_after": pause_after})
            return await self._sessions().create(body)

    async def session_call(
        self,
        session_id: str,
        code: str | None,
        *,
        timeout: float | None = None,
        files: dict[str, bytes] | None = None,
        collect: list[str] | None = None,
    ) -> SessionResult:
        fields = {"code": code, "timeout": timeout, "files": files or {}, "collect": collect or []}
        with _answered(self.service):
            body = SessionExecuteRequest.model_validate(fields)
            return await self._sessions().execute(session_id, body)

    async def close_session(self, session_id: str) -> None:
        with _answered(self.service):
            await self._sessions().delete(session_id)

    async def list_sessions(self) -> list[SessionInfo]:
        with _answered(self.service):
            return await self._sessions().list()

    async def pause_session(self, session_id: str) -> SessionInfo:
        with _answered(self.service):
            return await self._sessions().pause(session_id)

    async def resume_session(self, session_id: str) -> SessionInfo:
        with _answered(self.service):
            return await self._sessions().resume(session_id)


def mcp_route(service: ExecutionService, settings: Settings) -> tuple[Route, AbstractAsyncContextManager[Any]]:
    """The ``/mcp`` route and the context manager that runs its session manager (enter it in the lifespan)."""
    from mcp.server.fastmcp.server import StreamableHTTPASGIApp

    async def backend_for(ctx: Any) -> McpBackend:
        request = ctx.request_context.request
        tenant = request.scope.get(TENANT_SCOPE_KEY) if request is not None else None
        if not isinstance(tenant, Tenant):  # the Guard authenticates /mcp: never without a tenant
            raise AuthenticationError("missing or unknown API key", 401)
        return ServiceBackend(service, tenant)

    # host: FastMCP turns on its DNS-rebinding protection (Host/Origin checks) for loopback binds.
    server = build_server(backend_for, host=settings.host, stateless_http=True, log_level="WARNING")
    server.streamable_http_app()  # creates the session manager
    manager = server.session_manager
    return Route(MCP_PATH, endpoint=StreamableHTTPASGIApp(manager)), manager.run()
