"""``RemoteBackend``: the MCP tools over a running execbox service (``execbox mcp --server URL``)."""

from __future__ import annotations

from typing import Any

from ..client import AsyncClient
from ..models import ExecutionResult
from ..sessions import SessionInfo, SessionResult
from .backend import McpBackend

__all__ = ["RemoteBackend"]


class RemoteBackend(McpBackend):
    """Every tool call is a request to the service, authenticated by the tenant's API key:
    the service applies the tenant's policy and quotas, and its sessions are the tenant's."""

    def __init__(self, client: AsyncClient, *, user_id: str = "mcp") -> None:
        self.client, self.user_id = client, user_id

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
        fields: dict[str, Any] = {"files": files, "collect": collect}
        fields |= {
            k: v for k, v in {"timeout": timeout, "image": image, "isolation": isolation}.items() if v is not None
        }
        return await self.client.execute(code, env, language=language, **fields)

    async def create_session(
        self, language: str, image: str | None, isolation: str | None = None, pause_after: float | None = None
    ) -> SessionInfo:
        return await self.client.create_session(
            self.user_id, language, image=image, isolation=isolation, pause_after=pause_after
        )

    async def session_call(
        self,
        session_id: str,
        code: str | None,
        *,
        timeout: float | None = None,
        files: dict[str, bytes] | None = None,
        collect: list[str] | None = None,
    ) -> SessionResult:
        return await self.client.session_execute(
            session_id, code, timeout=timeout, files=dict(files or {}), collect=collect
        )

    async def close_session(self, session_id: str) -> None:
        await self.client.delete_session(session_id)

    async def list_sessions(self) -> list[SessionInfo]:
        return await self.client.list_sessions()

    async def pause_session(self, session_id: str) -> SessionInfo:
        return await self.client.pause_session(session_id)

    async def resume_session(self, session_id: str) -> SessionInfo:
        return await self.client.resume_session(session_id)

    async def aclose(self) -> None:
        await self.client.aclose()
