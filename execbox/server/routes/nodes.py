"""``GET /v1/nodes``: the live nodes (``execbox node`` workers) runs go to."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ..deps import ServiceDep, TenantDep
from ..errors import ERROR_RESPONSES

__all__ = ["router"]

router = APIRouter(tags=["nodes"])


class NodeInfo(BaseModel):
    name: str = Field(description="The node's name (results carry it as `node`).")
    slots: int = Field(description="Runs it takes at once.")
    running: int = Field(description="Runs it is running now.")
    healthy: bool = Field(True, description="Its engine answers (else it takes no work).")
    ready: dict[str, int] = Field(description="Warm sandboxes ready, by language (`+egress`: on the egress network).")
    sessions: int = Field(0, description="Live sessions it holds (as of its last pass).")
    last_seen: float = Field(description="Unix time of its last status (it refreshes it every few seconds).")


class NodeList(BaseModel):
    nodes: list[NodeInfo] = Field(description="Live nodes; empty when runs are not dispatched to nodes.")


@router.get("/v1/nodes", response_model=NodeList, summary="The live nodes", responses=ERROR_RESPONSES)
async def list_nodes(tenant: TenantDep, service: ServiceDep) -> NodeList:
    if service.dispatcher is None:
        return NodeList(nodes=[])
    return NodeList(nodes=[NodeInfo.model_validate(n) for n in await service.dispatcher.nodes()])
