"""Dependencies of the routes, as ``Annotated`` aliases.

All are ``async def``: they only look things up, and FastAPI runs a plain ``def``
dependency in a worker thread (a thread hop each, per request).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..sessions import Sessions
from ..settings import Settings
from .auth import Tenant
from .errors import ApiError
from .metrics import Metrics
from .middleware import TENANT_SCOPE_KEY
from .service import ExecutionService

__all__ = ["MetricsDep", "ServiceDep", "SessionsDep", "SettingsDep", "TenantDep"]

# Declared for the OpenAPI document; the key itself is checked by the Guard middleware before the body is read.
_bearer = HTTPBearer(auto_error=False, description="An API key of a tenant: `Authorization: Bearer <key>`.")


async def _service(request: Request) -> ExecutionService:
    service: ExecutionService = request.app.state.service
    return service


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def _sessions(request: Request) -> Sessions | None:
    """The service's own ``Sessions``; None in nodes mode (the nodes hold them: see tenant_nodes.py)."""
    service: ExecutionService = request.app.state.service
    if service.session_nodes is not None:
        return None
    if service.sessions is None:
        if not request.app.state.settings.sessions:
            raise ApiError(404, "not_found", "sessions are disabled on this server", reason="not_found")
        raise ApiError(503, "starting", "the service is starting", retry_after=1)
    return service.sessions


async def _tenant(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Tenant:
    tenant = request.scope.get(TENANT_SCOPE_KEY)
    if not isinstance(tenant, Tenant):
        raise ApiError(401, "unauthorized", "missing or unknown API key")
    return tenant


ServiceDep = Annotated[ExecutionService, Depends(_service)]
SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
TenantDep = Annotated[Tenant, Depends(_tenant)]
SessionsDep = Annotated[Sessions | None, Depends(_sessions)]
