"""``POST /v1/execute`` (JSON, or server-sent events) and the seed's ``POST /execute``."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Query, Request, Response

from ...models import ExecutionRequest, ExecutionResult
from ..deps import ServiceDep, TenantDep
from ..errors import ERROR_RESPONSES, invalid_from
from ..schemas import SeedRequest, SeedResponse
from ..sse import SSE_SCHEMA, sse_doc, stream_events, wants_stream

__all__ = ["router"]

log = logging.getLogger("execbox.server")
router = APIRouter(tags=["execute"])


@router.post(
    "/v1/execute",
    response_model=ExecutionResult,
    summary="Run code once and return (or stream) its result",
    description="Runs the code in a fresh sandbox that is removed afterwards. " + sse_doc("the program"),
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"text/event-stream": {"schema": SSE_SCHEMA}}, "description": "The result."},
    },
)
async def execute(
    body: ExecutionRequest,
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    stream: Annotated[bool, Query(description="Stream server-sent events (as Accept: text/event-stream).")] = False,
) -> Any:
    prepared = service.prepare(tenant, body)
    admission = await service.admit(tenant)
    if wants_stream(stream, request.headers.get("accept")):
        return stream_events(service, lambda on_output: service.run(tenant, prepared, on_output), admission.release)
    try:
        result = await service.run(tenant, prepared)
    finally:
        admission.release()
    # Serialized once, here: returned as a model, FastAPI would validate it again against
    # the response model and encode it twice (the schema in the docs is the same).
    return Response(result.model_dump_json(), media_type="application/json")


@router.post(
    "/execute",
    response_model=SeedResponse,
    summary="The seed's endpoint: {code, env} in, {output, ...} out",
    description="JavaScript unless `language` says otherwise; `output` is the program's stdout.",
    responses=ERROR_RESPONSES,
)
async def execute_seed(body: SeedRequest, tenant: TenantDep, service: ServiceDep) -> SeedResponse:
    try:
        request = ExecutionRequest(code=body.code, env=body.env, language=body.language)
    except pydantic.ValidationError as exc:  # the same checks as /v1/execute
        raise invalid_from(exc) from None
    prepared = service.prepare(tenant, request)
    admission = await service.admit(tenant)
    try:
        result = await service.run(tenant, prepared)
    finally:
        admission.release()
    return SeedResponse(**result.model_dump(), output=result.stdout)

