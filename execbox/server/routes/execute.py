"""``POST /v1/execute`` (JSON, or server-sent events) and the seed's ``POST /execute``."""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ...exceptions import ExecboxError
from ...models import ExecutionRequest, ExecutionResult
from ..auth import Tenant
from ..deps import ServiceDep, TenantDep
from ..errors import ERROR_RESPONSES, ApiError, from_library, invalid_from
from ..schemas import SeedRequest, SeedResponse
from ..service import Admission, ExecutionService

__all__ = ["router"]

log = logging.getLogger("execbox.server")
router = APIRouter(tags=["execute"])

KEEPALIVE_SECONDS = 15.0

_SSE_DOC = (
    "With `Accept: text/event-stream` or `?stream=true` the answer is a stream of server-sent events: "
    '`stdout` and `stderr` events (`{"data": "<text>"}`) as the program writes, then one `result` event '
    "(the result object) or one `error` event (an error object) and the end of the stream."
)

_SSE_SCHEMA = {
    "type": "object",
    "description": "One server-sent event.",
    "properties": {
        "event": {
            "type": "string",
            "enum": ["stdout", "stderr", "result", "error"],
            "description": "Output chunk, the final result, or the error that ended the execution.",
        },
        "data": {
            "type": "string",
            "description": 'JSON: {"data": "<text>"} for output, the result object, or {type, message, field}.',
        },
    },
    "required": ["data"],
}


@router.post(
    "/v1/execute",
    response_model=ExecutionResult,
    summary="Run code once and return (or stream) its result",
    description="Runs the code in a fresh sandbox that is removed afterwards. " + _SSE_DOC,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"text/event-stream": {"schema": _SSE_SCHEMA}}, "description": "The result."},
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
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        return _stream(service, tenant, prepared, admission)
    try:
        return await service.run(tenant, prepared)
    finally:
        admission.release()


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


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _stream(
    service: ExecutionService, tenant: Tenant, prepared: ExecutionRequest, admission: Admission
) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_output(stream: str, chunk: bytes) -> None:
        # Called on the executor's thread; output is capped by limits.output_bytes, so the queue is bounded.
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (stream, chunk))
        except RuntimeError:  # the loop is gone (shutdown): the result still completes
            pass

    async def work() -> None:
        try:
            result = await service.run(tenant, prepared, on_output)
            queue.put_nowait(("result", result))
        except ExecboxError as exc:
            queue.put_nowait(("error", from_library(exc)))
        except Exception as exc:
            log.exception("streamed execution failed")
            queue.put_nowait(("error", ApiError(500, "internal_error", type(exc).__name__)))
        finally:
            admission.release()

    # The run is a task of its own: if the client goes away, it still finishes and frees its slots.
    service.spawn(work())

    async def events() -> AsyncIterator[bytes]:
        decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
        while True:
            try:
                kind, item = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if kind in decoders:
                text = decoders[kind].decode(item)
                if text:
                    yield _sse(kind, {"data": text})
                continue
            for name, dec in decoders.items():
                tail = dec.decode(b"", final=True)
                if tail:
                    yield _sse(name, {"data": tail})
            if kind == "result":
                yield _sse("result", item.model_dump(mode="json"))
            else:
                err: ApiError = item
                body = {"type": err.type, "message": err.message, "field": err.field}
                yield _sse("error", body)
            return

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
