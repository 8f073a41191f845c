"""The session methods of ``Client`` and ``AsyncClient`` (``/v1/sessions``), as mixins."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pydantic

from .models import invalid_request
from .sessions import SessionCreateRequest, SessionExecuteRequest, SessionInfo, SessionList, SessionResult

if TYPE_CHECKING:
    from .client import StreamEvent
    from .client_lane import Answer
    from .models import ExecutionResult

__all__ = ["AsyncSessionsMixin", "SessionsMixin"]

_DEFAULT_TIMEOUT = 10.0


def _validated(model: type[pydantic.BaseModel], fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` checked as the service will check them (same errors as the library), as JSON."""
    try:
        req = model.model_validate({k: v for k, v in fields.items() if v is not None})
    except pydantic.ValidationError as exc:
        raise invalid_request(exc) from None
    body = req.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    if isinstance(req, SessionCreateRequest) and req.secrets:  # model_dump masks their values
        body["secrets"] = {name: secret.wire() for name, secret in req.secrets.items()}
    return body


def _session_call(
    code: str | None,
    env: dict[str, str] | None,
    timeout: float | None,
    files: dict[str, bytes | str] | None,
    collect: list[str] | None,
) -> dict[str, Any]:
    encoded = {p: c.encode() if isinstance(c, str) else c for p, c in (files or {}).items()}
    fields = {"code": code, "env": env, "timeout": timeout, "files": encoded or None, "collect": collect or None}
    return _validated(SessionExecuteRequest, fields)


def _create_body(
    user_id: str,
    language: str,
    image: str | None,
    limits: dict[str, Any] | None,
    idle_timeout: float | None,
    max_lifetime: float | None,
    repl: bool | None,
    network: str | dict[str, Any] | None,
    secrets: dict[str, dict[str, Any]] | None,
    isolation: str | None = None,
    pause_after: float | None = None,
) -> dict[str, Any]:
    fields = {
        "user_id": user_id,
        "language": language,
        "image": image,
        "limits": limits,
        "idle_timeout": idle_timeout,
        "max_lifetime": max_lifetime,
        "repl": repl,
        "network": network,
        "secrets": secrets,
        "isolation": isolation,
        "pause_after": pause_after,
    }
    return _validated(SessionCreateRequest, fields)


# Session calls: the session's own timeout is not known here, so allow for the largest.
_SESSION_CREATE_READ = 90.0
_SESSION_CALL_READ = 300.0


def _sid(session_id: str) -> str:
    return urllib.parse.quote(session_id, safe="")


class SessionsMixin:
    """Session methods of the synchronous ``Client``."""

    slack: float

    if TYPE_CHECKING:

        def _send(self, method: str, path: str, read: float | None, **kw: Any) -> httpx.Response | Answer: ...

        def _events(
            self, path: str, body: dict[str, Any], read: float, model: type[ExecutionResult] | type[SessionResult]
        ) -> Iterator[StreamEvent]: ...

    def create_session(
        self,
        user_id: str,
        language: str = "python",
        *,
        image: str | None = None,
        limits: dict[str, Any] | None = None,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
        repl: bool | None = None,
        network: str | dict[str, Any] | None = None,
        secrets: dict[str, dict[str, Any]] | None = None,
        isolation: str | None = None,
        pause_after: float | None = None,
    ) -> SessionInfo:
        """Start a persistent session for ``user_id`` (QuotaExceededError over the caps).

        ``pause_after``: paused to disk after that many seconds unused (gvisor only).
        ``network`` ("proxy" or a policy: allow/deny) and ``secrets`` (name -> {"value", "hosts"})
        give the session egress through the service's proxy, for every call; ``isolation``:
        ``"container"`` or ``"gvisor"`` (default: the service's)."""
        body = _create_body(
            user_id,
            language,
            image,
            limits,
            idle_timeout,
            max_lifetime,
            repl,
            network,
            secrets,
            isolation,
            pause_after,
        )
        response = self._send("POST", "/v1/sessions", _SESSION_CREATE_READ, json=body)
        return SessionInfo.model_validate(response.json())

    def session_execute(
        self,
        session_id: str,
        code: str | None,
        env: dict[str, str] | None = None,
        *,
        timeout: float | None = None,
        files: dict[str, bytes | str] | None = None,
        collect: list[str] | None = None,
    ) -> SessionResult:
        """Run ``code`` in the session (NotFoundError once it ended); ``files`` in, ``collect`` out."""
        body = _session_call(code, env, timeout, files, collect)
        read = (timeout or _SESSION_CALL_READ) + self.slack
        response = self._send("POST", f"/v1/sessions/{_sid(session_id)}/execute", read, json=body)
        return SessionResult.model_validate(response.json())

    def session_stream(
        self,
        session_id: str,
        code: str | None,
        env: dict[str, str] | None = None,
        *,
        timeout: float | None = None,
        files: dict[str, bytes | str] | None = None,
        collect: list[str] | None = None,
    ) -> Iterator[StreamEvent]:
        """``session_execute``, yielding the output as it is produced; the last event holds the SessionResult."""
        body = _session_call(code, env, timeout, files, collect)
        path = f"/v1/sessions/{_sid(session_id)}/execute"
        return self._events(path, body, (timeout or _SESSION_CALL_READ) + self.slack, SessionResult)

    def list_sessions(self) -> list[SessionInfo]:
        """This tenant's live sessions."""
        return SessionList.model_validate(self._send("GET", "/v1/sessions", _DEFAULT_TIMEOUT).json()).sessions

    def get_session(self, session_id: str) -> SessionInfo:
        response = self._send("GET", f"/v1/sessions/{_sid(session_id)}", _DEFAULT_TIMEOUT)
        return SessionInfo.model_validate(response.json())

    def pause_session(self, session_id: str) -> SessionInfo:
        """Pause the session to disk (isolation gvisor; ServiceError 409 otherwise)."""
        return SessionInfo.model_validate(self._send("POST", f"/v1/sessions/{_sid(session_id)}/pause", 120.0).json())

    def resume_session(self, session_id: str) -> SessionInfo:
        """Resume a paused session (its next call would too)."""
        return SessionInfo.model_validate(self._send("POST", f"/v1/sessions/{_sid(session_id)}/resume", 120.0).json())

    def delete_session(self, session_id: str) -> None:
        """End the session now (NotFoundError if there is none)."""
        self._send("DELETE", f"/v1/sessions/{_sid(session_id)}", 30.0)


class AsyncSessionsMixin:
    """Session methods of ``AsyncClient``."""

    slack: float

    if TYPE_CHECKING:

        async def _send(self, method: str, path: str, read: float | None, **kw: Any) -> httpx.Response: ...

        def _events(
            self, path: str, body: dict[str, Any], read: float, model: type[ExecutionResult] | type[SessionResult]
        ) -> AsyncIterator[StreamEvent]: ...

    async def create_session(
        self,
        user_id: str,
        language: str = "python",
        *,
        image: str | None = None,
        limits: dict[str, Any] | None = None,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
        repl: bool | None = None,
        network: str | dict[str, Any] | None = None,
        secrets: dict[str, dict[str, Any]] | None = None,
        isolation: str | None = None,
        pause_after: float | None = None,
    ) -> SessionInfo:
        """Start a persistent session for ``user_id`` (QuotaExceededError over the caps).

        ``pause_after``: paused to disk after that many seconds unused (gvisor only).
        ``network`` ("proxy" or a policy: allow/deny) and ``secrets`` (name -> {"value", "hosts"})
        give the session egress through the service's proxy, for every call; ``isolation``:
        ``"container"`` or ``"gvisor"`` (default: the service's)."""
        body = _create_body(
            user_id,
            language,
            image,
            limits,
            idle_timeout,
            max_lifetime,
            repl,
            network,
            secrets,
            isolation,
            pause_after,
        )
        response = await self._send("POST", "/v1/sessions", _SESSION_CREATE_READ, json=body)
        return SessionInfo.model_validate(response.json())

    async def session_execute(
        self,
        session_id: str,
        code: str | None,
        env: dict[str, str] | None = None,
        *,
        timeout: float | None = None,
        files: dict[str, bytes | str] | None = None,
        collect: list[str] | None = None,
    ) -> SessionResult:
        """Run ``code`` in the session (NotFoundError once it ended); ``files`` in, ``collect`` out."""
        body = _session_call(code, env, timeout, files, collect)
        read = (timeout or _SESSION_CALL_READ) + self.slack
        response = await self._send("POST", f"/v1/sessions/{_sid(session_id)}/execute", read, json=body)
        return SessionResult.model_validate(response.json())

    async def session_stream(
        self,
        session_id: str,
        code: str | None,
        env: dict[str, str] | None = None,
        *,
        timeout: float | None = None,
        files: dict[str, bytes | str] | None = None,
        collect: list[str] | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """``session_execute``, yielding the output as it is produced; the last event holds the SessionResult."""
        body = _session_call(code, env, timeout, files, collect)
        path = f"/v1/sessions/{_sid(session_id)}/execute"
        async for event in self._events(path, body, (timeout or _SESSION_CALL_READ) + self.slack, SessionResult):
            yield event

    async def list_sessions(self) -> list[SessionInfo]:
        """This tenant's live sessions."""
        response = await self._send("GET", "/v1/sessions", _DEFAULT_TIMEOUT)
        return SessionList.model_validate(response.json()).sessions

    async def get_session(self, session_id: str) -> SessionInfo:
        response = await self._send("GET", f"/v1/sessions/{_sid(session_id)}", _DEFAULT_TIMEOUT)
        return SessionInfo.model_validate(response.json())

    async def pause_session(self, session_id: str) -> SessionInfo:
        """Pause the session to disk (isolation gvisor; ServiceError 409 otherwise)."""
        response = await self._send("POST", f"/v1/sessions/{_sid(session_id)}/pause", 120.0)
        return SessionInfo.model_validate(response.json())

    async def resume_session(self, session_id: str) -> SessionInfo:
        """Resume a paused session (its next call would too)."""
        response = await self._send("POST", f"/v1/sessions/{_sid(session_id)}/resume", 120.0)
        return SessionInfo.model_validate(response.json())

    async def delete_session(self, session_id: str) -> None:
        """End the session now (NotFoundError if there is none)."""
        await self._send("DELETE", f"/v1/sessions/{_sid(session_id)}", 30.0)
