"""Persistent sessions: ``/v1/sessions`` (create, list), ``/v1/sessions/{id}`` (get, delete),
``/v1/sessions/{id}/execute`` (JSON or server-sent events). The tenant's policy is applied by
``TenantSessions`` (shared with the MCP tools), the logic lives in ``execbox.sessions.Sessions``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from ...exceptions import SessionBusyError, SessionLimitError, SessionNotFoundError, SessionStateError
from ...executor import OutputCallback
from ...sessions import SessionCreateRequest, SessionExecuteRequest, SessionInfo, SessionList, SessionResult
from ..deps import ServiceDep, SessionsDep, TenantDep
from ..errors import ERROR_RESPONSES, ApiError
from ..schemas import ErrorResponse
from ..sse import SSE_SCHEMA, sse_doc, stream_events, wants_stream
from ..tenant_nodes import tenant_sessions

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
    except SessionStateError as exc:
        raise ApiError(409, "session_state", str(exc), field=exc.field, reason="session_state") from None


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
    with _mapped():
        return await tenant_sessions(service, sessions, tenant).create(body)


@router.get(
    "/v1/sessions",
    response_model=SessionList,
    summary="The tenant's live sessions",
    responses={401: ERROR_RESPONSES[401]},
)
async def list_sessions(tenant: TenantDep, service: ServiceDep, sessions: SessionsDep) -> SessionList:
    return SessionList(sessions=await tenant_sessions(service, sessions, tenant).list())


@router.get(
    "/v1/sessions/{session_id}",
    response_model=SessionInfo,
    summary="One session",
    description="Another tenant's session answers 404, exactly like an unknown id.",
    responses=_RESPONSES,
)
async def get_session(
    session_id: SessionId, tenant: TenantDep, service: ServiceDep, sessions: SessionsDep
) -> SessionInfo:
    with _mapped():
        return await tenant_sessions(service, sessions, tenant).get(session_id)


@router.post(
    "/v1/sessions/{session_id}/execute",
    response_model=SessionResult,
    summary="Run code in a session (or move files in and out)",
    description="Runs in the session's container; stdout and stderr are this call's only. `files` are written "
    "into /work before the code runs (they stay); files matching `collect` come back in `files`; without `code` "
    "the call only moves files. At `timeout` the call is interrupted (the session and, where the runtime allows, "
    "its variables survive: see `repl_reset`). Counts against the tenant's execution quotas like any execution. "
    + sse_doc("the code"),
    responses={
        **_RESPONSES,
        200: {"content": {"text/event-stream": {"schema": SSE_SCHEMA}}, "description": "The result."},
        409: {"model": ErrorResponse, "description": "Another call kept the session busy for too long."},
        413: ERROR_RESPONSES[413],
        429: ERROR_RESPONSES[429],
        503: ERROR_RESPONSES[503],
    },
)
async def execute_in_session(
    session_id: SessionId,
    body: SessionExecuteRequest,
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    sessions: SessionsDep,
    stream: Annotated[bool, Query(description="Stream server-sent events (as Accept: text/event-stream).")] = False,
) -> Any:
    mine = tenant_sessions(service, sessions, tenant)
    admission = await mine.admit(body)
    if wants_stream(stream, request.headers.get("accept")):

        async def work(on_output: OutputCallback) -> SessionResult:
            with _mapped():
                return await mine.run_admitted(session_id, body, on_output)

        return stream_events(service, work, admission.release)
    try:
        with _mapped():
            return await mine.run_admitted(session_id, body)
    finally:
        admission.release()


@router.post(
    "/v1/sessions/{session_id}/pause",
    response_model=SessionInfo,
    summary="Pause a session to disk (isolation gvisor)",
    description="Its memory (variables, imports) and files are checkpointed and its container stops: it holds"
    " no memory or CPU until resumed, by `/resume` or by its next call. A running call is waited for (then 409"
    " `session_busy`). 409 naming `isolation` for a session that is not under gvisor, or `checkpoint_quota` when"
    " the tenant's paused sessions would hold more disk than its quota (the session runs on).",
    responses=_RESPONSES,
)
async def pause_session(
    session_id: SessionId, tenant: TenantDep, service: ServiceDep, sessions: SessionsDep
) -> SessionInfo:
    with _mapped():
        return await tenant_sessions(service, sessions, tenant).pause(session_id)


@router.post(
    "/v1/sessions/{session_id}/resume",
    response_model=SessionInfo,
    summary="Resume a paused session where it was",
    responses=_RESPONSES,
)
async def resume_session(
    session_id: SessionId, tenant: TenantDep, service: ServiceDep, sessions: SessionsDep
) -> SessionInfo:
    with _mapped():
        return await tenant_sessions(service, sessions, tenant).resume(session_id)


@router.delete(
    "/v1/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    summary="End a session now",
    description="Its container is removed with everything in it; a call running in it ends too.",
    responses=_RESPONSES,
)
async def delete_session(
    session_id: SessionId, tenant: TenantDep, service: ServiceDep, sessions: SessionsDep
) -> Response:
    with _mapped():
        await tenant_sessions(service, sessions, tenant).delete(session_id)
    return Response(status_code=204)
