"""``LocalBackend``: the MCP tools over the library in this process (``execbox mcp`` without --server)."""

from __future__ import annotations

import functools
from typing import Any

import anyio.to_thread

from ..executor import Executor
from ..models import ExecutionResult
from ..sessions import SessionInfo, SessionResult, Sessions
from .backend import McpBackend

__all__ = ["LocalBackend"]


class LocalBackend(McpBackend):
    """An ``Executor`` for runs and ``Sessions`` for sessions, on the local engine.

    The library is synchronous: each call runs in a worker thread. Sessions are made for
    ``user_id`` under ``tenant``; ``close()`` of the backend leaves them alive (the next
    ``execbox mcp`` or ``execbox session`` over the same registry adopts them).
    """

    def __init__(
        self, executor: Executor, sessions: Sessions, *, user_id: str = "mcp", tenant: str = "default"
    ) -> None:
        self.executor, self.sessions = executor, sessions
        self.user_id, self.tenant = user_id, tenant

    async def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kw))

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
        fields: dict[str, Any] = {"files": files, "collect": collect, "tenant": self.tenant}
        fields |= {
            k: v for k, v in {"timeout": timeout, "image": image, "isolation": isolation}.items() if v is not None
        }
        result: ExecutionResult = await self._call(self.executor.execute, code, env, language=language, **fields)
        return result

    async def create_session(
        self, language: str, image: str | None, isolation: str | None = None, pause_after: float | None = None
    ) -> SessionInfo:
        info: SessionInfo = await self._call(
            self.sessions.create,
            self.user_id,
            language,
            image,
            tenant=self.tenant,
            isolation=isolation,
            pause_after=pause_after,
        )
        return info

    async def session_call(
        self,
        session_id: str,
        code: str | None,
        *,
        timeout: float | None = None,
        files: dict[str, bytes] | None = None,
        collect: list[str] | None = None,
    ) -> SessionResult:
        call = functools.partial(
            self.sessions.execute,
            session_id,
            code,
            timeout=timeout,
            tenant=self.tenant,
            files=dict(files or {}),
            collect=collect,
        )
        result: SessionResult = await anyio.to_thread.run_sync(call)
        return result

    async def close_session(self, session_id: str) -> None:
        await self._call(self.sessions.delete, session_id, tenant=self.tenant)

    async def list_sessions(self) -> list[SessionInfo]:
        found: list[SessionInfo] = await self._call(self.sessions.list, self.tenant)
        return found

    async def pause_session(self, session_id: str) -> SessionInfo:
        info: SessionInfo = await self._call(self.sessions.pause, session_id, tenant=self.tenant)
        return info

    async def resume_session(self, session_id: str) -> SessionInfo:
        info: SessionInfo = await self._call(self.sessions.resume, session_id, tenant=self.tenant)
        return info

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.sessions.close)
        await anyio.to_thread.run_sync(self.executor.close)
