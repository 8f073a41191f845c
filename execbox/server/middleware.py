"""The ASGI guard in front of the app: authentication, body cap, request log.

It runs before FastAPI reads a body, so that an unauthenticated client gets 401
and an oversized body 413 without the service buffering or parsing it first.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import Authenticator
from .errors import ApiError, error_response
from .logging import request_id_var, tenant_var
from .metrics import Metrics

__all__ = ["TENANT_SCOPE_KEY", "Guard", "needs_auth"]

log = logging.getLogger("execbox.server.access")

TENANT_SCOPE_KEY = "execbox.tenant"


def needs_auth(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/execute", "/mcp") or path.startswith("/mcp/")


# ``POST /v1/execute`` in its common case, taken without the framework: (tenant, body, scope, receive, send)
# to True once answered, False to let the framework take the request (routes/execute.py: execute_plain).
PlainExecute = Callable[[Any, bytes, Scope, Receive, Send], Awaitable[bool]]


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        auth: Authenticator,
        metrics: Metrics,
        max_body_bytes: int,
        plain_execute: PlainExecute | None = None,
    ) -> None:
        self.app, self.auth, self.metrics, self.max_body = app, auth, metrics, max_body_bytes
        self.plain_execute = plain_execute

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = uuid.uuid4().hex[:16]
        request_id_var.set(request_id)
        tenant_var.set(None)
        status = 500

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self._handle(scope, receive, send_logged)
        finally:
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.monotonic() - started) * 1000, 2),
                },
            )

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        if needs_auth(scope["path"]):
            raw = headers.get(b"authorization")
            tenant = self.auth.authenticate(raw.decode("latin-1") if raw is not None else None)
            if tenant is None:
                await self._reject(scope, receive, send, ApiError(401, "unauthorized", "missing or unknown API key"))
                return
            scope[TENANT_SCOPE_KEY] = tenant
            tenant_var.set(tenant.name)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive, send, headers)
            if body is None:
                return
            receive = _replay(body, receive)
            if self.plain_execute is not None and _plain_execute(scope, headers):
                if await self.plain_execute(scope[TENANT_SCOPE_KEY], body, scope, receive, send):
                    return
        await self.app(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]) -> bytes | None:
        too_large = ApiError(
            413,
            "payload_too_large",
            f"request body larger than {self.max_body} bytes",
            field="body",
            reason="too_large",
        )
        # A refused body is read and dropped up to this size, so that the client, still sending,
        # can read the 413 instead of a connection reset; a larger one is cut off at once.
        drain_limit = 8 * self.max_body
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > drain_limit:
            await self._reject(scope, receive, send, too_large)
            return None
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            size += len(chunk)
            if size > drain_limit:
                break
            if size <= self.max_body:
                chunks.append(chunk)
        if size > self.max_body:
            chunks.clear()
            await self._reject(scope, receive, send, too_large)
            return None
        return b"".join(chunks)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, err: ApiError) -> None:
        self.metrics.rejected(err.reason)
        response = error_response(err)
        if err.status == 413:
            # Do not read the rest of a body we refuse: close the connection after answering.
            response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _plain_execute(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    """A JSON ``POST /v1/execute`` asking for no stream: what ``execute_plain`` takes."""
    return (
        scope["path"] == "/v1/execute"
        and scope["method"] == "POST"
        and not scope.get("query_string")
        and b"text/event-stream" not in headers.get(b"accept", b"")
        and headers.get(b"content-type", b"").split(b";")[0].strip().lower() == b"application/json"
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        message: dict[str, Any] = dict(await receive())
        return message

    return replay
