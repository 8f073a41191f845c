"""A user's stored state and volume: ``/v1/users/{user_id}/state`` and ``.../volume``."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field

from ...state.base import check_id
from ..deps import ServiceDep, TenantDep
from ..dispatch_volumes import VolumeDispatcher
from ..errors import ERROR_RESPONSES, ApiError

__all__ = ["router"]

router = APIRouter(tags=["users"])

UserId = Annotated[str, Path(max_length=128, description="The end user's id (letters, digits, '_', '.', '@', '-').")]


class StateBody(BaseModel):
    value: Any = Field(description="The user's state (any JSON value).")


class StoredStateView(BaseModel):
    value: Any = Field(description="The user's state.")
    version: int = Field(description="Increases by one at each write.")
    updated: float = Field(description="Unix time of the last write.")


class VolumeImported(BaseModel):
    entries: int = Field(description="Entries restored from the archive.")


def _store(service: Any) -> Any:
    store = service.store
    if store is None:
        raise ApiError(422, "invalid_request", "this server has no state store", field="user_id", reason="invalid")
    return store


@router.get(
    "/v1/users/{user_id}/state",
    response_model=StoredStateView,
    summary="The user's stored state",
    responses={**ERROR_RESPONSES, 404: {"description": "No state stored for this user (in this tenant)."}},
)
async def get_state(user_id: UserId, tenant: TenantDep, service: ServiceDep) -> StoredStateView:
    check_id("user_id", user_id)
    got = await anyio.to_thread.run_sync(_store(service).get, tenant.name, user_id)
    if got is None:
        raise ApiError(404, "not_found", "no state stored for this user", field="user_id", reason="not_found")
    return StoredStateView(value=got.value, version=got.version, updated=got.updated)


@router.put(
    "/v1/users/{user_id}/state",
    response_model=StoredStateView,
    summary="Replace the user's stored state",
    responses=ERROR_RESPONSES,
)
async def put_state(user_id: UserId, body: StateBody, tenant: TenantDep, service: ServiceDep) -> StoredStateView:
    check_id("user_id", user_id)
    store = _store(service)
    version = await anyio.to_thread.run_sync(store.put, tenant.name, user_id, body.value)
    got = await anyio.to_thread.run_sync(store.get, tenant.name, user_id)
    return StoredStateView(value=body.value, version=version, updated=got.updated if got else 0.0)


@router.delete(
    "/v1/users/{user_id}/state", status_code=204, summary="Forget the user's stored state", responses=ERROR_RESPONSES
)
async def delete_state(user_id: UserId, tenant: TenantDep, service: ServiceDep) -> Response:
    check_id("user_id", user_id)
    await anyio.to_thread.run_sync(_store(service).delete, tenant.name, user_id)
    return Response(status_code=204)


@router.delete(
    "/v1/users/{user_id}/volume",
    status_code=204,
    summary="Remove the user's volume and its files now",
    responses={**ERROR_RESPONSES, 409: {"description": "The volume is in use by a running execution."}},
)
async def delete_volume(user_id: UserId, tenant: TenantDep, service: ServiceDep) -> Response:
    check_id("user_id", user_id)
    if service.dispatcher is not None:  # nodes mode: the node holding the volume does it
        await VolumeDispatcher(service.dispatcher.r).delete(tenant.name, user_id)
        return Response(status_code=204)
    await anyio.to_thread.run_sync(service.ex.volumes.delete, tenant.name, user_id)
    return Response(status_code=204)


@router.get(
    "/v1/users/{user_id}/volume/export",
    summary="The user's volume as a tar archive (backup)",
    response_class=Response,
    responses={200: {"content": {"application/x-tar": {}}}, **ERROR_RESPONSES},
)
async def export_volume(user_id: UserId, tenant: TenantDep, service: ServiceDep) -> Response:
    check_id("user_id", user_id)
    if service.dispatcher is not None:
        data = await VolumeDispatcher(service.dispatcher.r).export(tenant.name, user_id)
    else:
        data = await anyio.to_thread.run_sync(service.ex.volumes.export_tar, tenant.name, user_id)
    return Response(data, media_type="application/x-tar")


@router.put(
    "/v1/users/{user_id}/volume/import",
    response_model=VolumeImported,
    summary="Replace the user's volume with a tar archive (restore)",
    description="Absolute paths, '..', links out of the volume and device files are refused (422).",
    responses=ERROR_RESPONSES,
)
async def import_volume(user_id: UserId, request: Request, tenant: TenantDep, service: ServiceDep) -> VolumeImported:
    check_id("user_id", user_id)
    data = await request.body()
    if service.dispatcher is not None:
        entries = await VolumeDispatcher(service.dispatcher.r).restore(tenant.name, user_id, data)
    else:
        entries = await anyio.to_thread.run_sync(service.ex.volumes.import_tar, tenant.name, user_id, data)
    return VolumeImported(entries=entries)
