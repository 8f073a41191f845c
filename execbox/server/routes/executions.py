"""Async executions: ``POST /v1/executions`` and ``GET /v1/executions/{id}``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from ..deps import ServiceDep, TenantDep
from ..errors import ERROR_RESPONSES, ApiError
from ..schemas import ErrorResponse, ExecutionJob, JobRequest, Submitted

__all__ = ["router"]

router = APIRouter(tags=["executions"])


@router.post(
    "/v1/executions",
    status_code=202,
    response_model=Submitted,
    summary="Start an execution in the background",
    description="Answers at once with the execution's id; any replica sharing the queue answers for it. The "
    "result is kept for the server's job TTL after the execution finishes. With `callback_url`, the finished job "
    "is also POSTed there, signed with `X-Execbox-Signature: sha256=<hex HMAC-SHA256 of the body under the "
    "tenant's webhook secret>` and identified by `X-Execbox-Delivery: <id>` (the same on every retry).",
    responses=ERROR_RESPONSES,
)
async def submit(body: JobRequest, tenant: TenantDep, service: ServiceDep) -> Submitted:
    return Submitted(id=await service.submit(tenant, body), status="queued")


@router.get(
    "/v1/executions/{execution_id}",
    response_model=ExecutionJob,
    summary="Status and, once finished, result of an async execution",
    description="Another tenant's execution answers 404, exactly like an unknown id.",
    responses={
        401: ERROR_RESPONSES[401],
        404: {"model": ErrorResponse, "description": "No such execution for this tenant."},
        422: ERROR_RESPONSES[422],
    },
)
async def get_execution(
    execution_id: Annotated[str, Path(max_length=64, description="The id returned at submission.")],
    tenant: TenantDep,
    service: ServiceDep,
    wait: Annotated[
        float, Query(ge=0, le=60, description="Wait up to this many seconds for the execution to finish.")
    ] = 0,
) -> ExecutionJob:
    if wait > 0:
        job = await service.jobs.wait(tenant.name, execution_id, wait)
    else:
        job = await service.jobs.get(tenant.name, execution_id)
    if job is None:
        raise ApiError(404, "not_found", "no such execution", field="execution_id", reason="not_found")
    return job
