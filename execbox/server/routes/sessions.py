"""Persistent sessions: ``/v1/sessions`` (create, list), ``/v1/sessions/{id}`` (get, delete),
``/v1/sessions/{id}/execute``. The logic lives in ``execbox.sessions.Sessions``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Path, Response

from ...exceptions import InvalidRequestError, SessionBusyError, SessionLimitError, SessionNotFoundError
from ...models import ExecutionRequest
from ...runtimes import get_runtime
from ...sessions import SessionCreateRequest, SessionExecuteRequest, SessionInfo, SessionList, SessionResult
from ..deps import ServiceDep, SessionsDep, TenantDep
from ..errors import ERROR_RESPONSES, ApiError
from ..schemas import ErrorResponse

__all__ = ["router"]

router = APIRouter(tags=["sessions"])

SessionId = Annotated[str, Path(max_length=64, description="The id returned when the session was created.")]

_NOT_FOUND = {"model": ErrorResponse, "description": "No such session for this tenant (ended, expired, or never)."}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: ERROR_RESPONSES[401],
    404: _NOT_FOUND,
    422: ERROR_RESPONSES[422],
}


@contextmanager
def _mapped() -> Iterator[None]:
    """Session errors as API errors (the rest goes to the app's library error handler)."""
    try:
        yield
    except SessionNotFoundError as exc:
        raise ApiError(404, "not_found", str(exc), field="session_id", reason="not_found") from None
    except SessionLimitError as exc:
        retry = max(1, math.ceil(exc.retry_after or 1))
        raise ApiError(429, "quota_exceeded", str(exc), retry_after=retry, reason=f"sessions_{exc.scope}") from None
    except SessionBusyError as exc:
        raise ApiError(409, "session_busy", str(exc), retry_after=1, reason="session_busy") from None


@router.post(
    "/v1/sessions",
    status_code=201,
    response_model=SessionInfo,
    summary="Start a persistent session",
    description="A long-lived sandbox for one user: files in /work persist between calls and, with `repl` "
    "(python and javascript by default), so do variables and imports. It ends after `idle_timeout` seconds "
    "unused, `max_lifetime` seconds after creation, or on DELETE. Beyond the per-user or total cap of live "
    "sessions: 429.",
    responses={**ERROR_RESPONSES, 429: {"model": ErrorResponse, "description": "Too many live sessions."}},
)
async def create_session(
    body: SessionCreateRequest, tenant: TenantDep, service: ServiceDep, sessions: SessionsDep
) -> SessionInfo:
    runtime = get_runtime(body.language)
    if runtime.name not in tenant.policy.languages:
        raise ApiError(403, "forbidden", f"this tenant may not use {runtime.name}", field="language")
    if body.image is not None and not tenant.image_allowed(body.image, service.ex.image):
        raise ApiError(403, "forbidden", "this tenant may not use this image", field="image")
    # The service's defaults capped at the tenant's maximum, then the request's (checked against it).
    limits = service.resolve_limits(tenant, ExecutionRequest.model_construct(code="", limits=body.limits, timeout=None))

    def create() -> SessionInfo:
        return sessions.create(
            body.user_id,
            runtime.name,
            image=body.image,
            limits=limits,
            network=body.network,
            idle_timeout=body.idle_timeout,
            max_lifetime=body.max_lifetime,
            tenant=tenant.name,
            repl=body.repl,
        )

    with _mapped():
        return await anyio.to_thread.run_sync(create)


@router.get(
    "/v1/sessions",
    response_model=SessionList,
    summary="The tenant's live sessions",
    responses={401: ERROR_RESPONSES[401]},
)
async def list_sessions(tenant: TenantDep, sessions: SessionsDep) -> SessionList:
    found = await anyio.to_thread.run_sync(lambda: sessions.list(tenant.name))
    return SessionList(sessions=found)


@router.get(
    "/v1/sessions/{session_id}",
    response_model=SessionInfo,
    summary="One session",
    description="Another tenant's session answers 404, exactly like an unknown id.",
    responses=_RESPONSES,
)
async def get_session(session_id: SessionId, tenant: TenantDep, sessions: SessionsDep) -> SessionInfo:
    with _mapped():
        return await anyio.to_thread.run_sync(lambda: sessions.get(session_id, tenant=tenant.name))


@router.post(
    "/v1/sessions/{session_id}/execute",
    response_model=SessionResult,
    summary="Run code in a session",
    description="Runs in the session's container; stdout and stderr are this call's only. At `timeout` the "
    "call is interrupted (the session and, where the runtime allows, its variables survive: see `repl_reset`). "
    "Counts against the tenant's execution quotas like any execution.",
    responses={
        **_RESPONSES,
        409: {"model": ErrorResponse, "description": "Another call kept the session busy for too long."},
        413: ERROR_RESPONSES[413],
        429: ERROR_RESPONSES[429],
        503: ERROR_RESPONSES[503],
    },
)
async def execute_in_session(
    session_id: SessionId,
    body: SessionExecuteRequest,
    tenant: TenantDep,
    service: ServiceDep,
    sessions: SessionsDep,
) -> SessionResult:
    if len(body.code.encode()) > service.settings.max_code_bytes:
        raise ApiError(413, "payload_too_large", f"larger than {service.settings.max_code_bytes} bytes", field="code")
    if body.timeout is not None and body.timeout > tenant.max_limits.timeout:
        cap = tenant.max_limits.timeout
        raise InvalidRequestError("timeout", f"{body.timeout} exceeds this tenant's maximum {cap}")
    admission = await service.admit(tenant)
    try:

        def run() -> SessionResult:
            return sessions.execute(session_id, body.code, body.env, body.timeout, tenant=tenant.name)

        with _mapped():
            return await anyio.to_thread.run_sync(run)
    finally:
        admission.release()


@router.delete(
    "/v1/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    summary="End a session now",
    description="Its container is removed with everything in it; a call running in it ends too.",
    responses=_RESPONSES,
)
async def delete_session(session_id: SessionId, tenant: TenantDep, sessions: SessionsDep) -> Response:
    with _mapped():
        await anyio.to_thread.run_sync(lambda: sessions.delete(session_id, tenant=tenant.name))
    return Response(status_code=204)
