"""``GET /healthz`` (the process answers), ``GET /readyz`` (engine and image ready), ``GET /metrics``."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from ...exceptions import ExecboxError
from ..deps import MetricsDep, ServiceDep
from ..metrics import CONTENT_TYPE

__all__ = ["router"]

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = Field(description="ok, ready or not_ready.")
    checks: dict[str, str] = Field(default_factory=dict, description="Each check's outcome (ok or what failed).")


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="The container engine answers and the sandbox image is present",
    responses={503: {"model": Health, "description": "Not ready; `checks` says why."}},
)
async def readyz(service: ServiceDep) -> JSONResponse:
    checks: dict[str, str] = {}
    executor = service.executor
    if service.dispatcher is not None:  # runs go to nodes: ready while one is live
        try:
            live = await service.dispatcher.nodes()
            checks["nodes"] = "ok" if live else "no live node"
        except Exception as exc:  # Redis down: not ready
            checks["nodes"] = f"queue unavailable: {exc}"
    elif executor is None:
        checks["executor"] = "starting"
    else:
        try:
            await anyio.to_thread.run_sync(executor.engine.ping)
            checks["engine"] = "ok"
            present = await anyio.to_thread.run_sync(executor.engine.image_exists, executor.image)
            checks["image"] = "ok" if present else f"missing: {executor.image} (execbox images build)"
        except ExecboxError as exc:
            checks["engine"] = f"unavailable: {exc}"
    if not service.accepting:
        checks["accepting"] = "shutting down"
    ready = all(v == "ok" for v in checks.values())
    body = Health(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "Metrics."}},
)
async def metrics(metrics: MetricsDep) -> PlainTextResponse:
    await metrics.refresh()  # node statuses (nodes mode), read on the loop
    # In a thread: the session gauges read the registry (a store query).
    return PlainTextResponse(await anyio.to_thread.run_sync(metrics.render), media_type=CONTENT_TYPE)
