"""Python clients of the execbox HTTP service: ``Client`` and ``AsyncClient`` (httpx).

``Client`` sends its plain JSON requests to an ``http://`` service over one kept-alive
connection of its own (``client_lane.py``: measurably faster per call) wherever that
cannot differ from httpx; HTTPS, proxies, custom transports and streams go through httpx.

>>> with Client("http://127.0.0.1:8080", api_key="xbx_...") as c:
...     r = c.execute("print(1)", language="python")

Errors map onto execbox's exception tree: a 422/413 raises ``InvalidRequestError``
with the field, as the library would; 401/403/404/429/503 raise the matching
``ServiceError`` subclass (429 and 503 carry ``retry_after``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pydantic

from .client_lane import Answer, Lane, LaneError
from .client_sessions import AsyncSessionsMixin, SessionsMixin
from .exceptions import (
    AuthenticationError,
    EngineError,
    EngineUnavailableError,
    ExecboxError,
    ImageNotFoundError,
    InvalidRequestError,
    NodeLostError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    SandboxError,
    ServerBusyError,
    ServiceError,
    SessionStateError,
    WaitTimeoutError,
)
from .models import ExecutionRequest, ExecutionResult, invalid_request
from .server.schemas import ExecutionJob, Submitted
from .sessions import SessionResult

__all__ = ["AsyncClient", "Client", "StreamEvent"]

# Time allowed on top of an execution's own timeout for queueing, container start and transfer.
DEFAULT_SLACK = 60.0
_DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class StreamEvent:
    """One event of ``stream()``: output text as it arrives, then the result."""

    kind: str  # "stdout" | "stderr" | "result"
    data: str = ""
    result: ExecutionResult | SessionResult | None = None  # SessionResult from session_stream()


def _request(code: str, env: dict[str, str] | None, language: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The JSON body for ``code``: validated here first, like ``Executor.execute`` (same errors, same fields)."""
    files = fields.get("files")
    if isinstance(files, dict):  # text is welcome here; the wire carries base64
        fields["files"] = {p: c.encode() if isinstance(c, str) else c for p, c in files.items()}
    try:
        req = ExecutionRequest.model_validate({"code": code, "language": language, "env": env or {}, **fields})
    except pydantic.ValidationError as exc:
        raise invalid_request(exc) from None
    body = req.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    if req.secrets:  # model_dump masks their values
        body["secrets"] = {name: secret.wire() for name, secret in req.secrets.items()}
    return body


def _read_timeout(body: dict[str, Any], slack: float) -> float:
    t = body.get("timeout") or (body.get("limits") or {}).get("timeout") or _DEFAULT_TIMEOUT
    return float(t) + slack


def _retry_after(response: httpx.Response | Answer) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def raise_for_response(response: httpx.Response | Answer) -> None:
    """Raise the execbox exception for an error answer; return for a 2xx."""
    if response.is_success:
        return
    status = response.status_code
    try:
        err = response.json().get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    if not isinstance(err, dict):
        err = {}
    message = str(err.get("message") or response.reason_phrase or f"HTTP {status}")
    kind, field = err.get("type"), err.get("field")
    node = err.get("node") if isinstance(err.get("node"), str) else None
    raise error_from(status, kind, message, field, _retry_after(response), node)


def error_from(
    status: int | None,
    kind: str | None,
    message: str,
    field: str | None = None,
    retry_after: float | None = None,
    node: str | None = None,
) -> ExecboxError:
    if status in (413, 422) or kind in ("invalid_request", "payload_too_large"):
        return InvalidRequestError(field or "request", message)
    if kind == "image_not_found":
        return ImageNotFoundError(message)
    if kind == "engine_unavailable":
        return EngineUnavailableError(message)
    if kind == "engine_error":
        return EngineError(message)
    if kind == "sandbox_error":
        return SandboxError(message)
    if kind == "node_lost":
        named = re.search(r"\bnode ([\w.@:-]+)", message)  # answers without the node field (runs)
        return NodeLostError(message, status, retry_after, node or (named.group(1) if named else None))
    if kind == "session_state":
        return SessionStateError(field or "session_id", message)
    if status == 401:
        return AuthenticationError(message, status)
    if status == 403:
        return PermissionDeniedError(message, status, field)
    if status == 404:
        return NotFoundError(message, status)
    if status == 429:
        return QuotaExceededError(message, status, retry_after)
    if status == 503:
        return ServerBusyError(message, status, retry_after)
    return ServiceError(message, status)


def _transport_error(exc: httpx.HTTPError) -> ServiceError:
    return ServiceError(f"cannot reach the execbox service: {type(exc).__name__}: {exc}")


class _SSEParser:
    """Server-sent events, line by line; the ``result`` event as a ``model``."""

    def __init__(self, model: type[ExecutionResult] | type[SessionResult] = ExecutionResult) -> None:
        self.model = model
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> StreamEvent | None:
        if line == "":
            if not self.data:
                return None
            event, payload = self.event, json.loads("\n".join(self.data))
            self.event, self.data = "message", []
            if event == "result":
                return StreamEvent("result", result=self.model.model_validate(payload))
            if event == "error":
                raise error_from(None, payload.get("type"), payload.get("message", "error"), payload.get("field"))
            return StreamEvent(event, data=str(payload.get("data", "")))
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


class _Base:
    def __init__(self, base_url: str, api_key: str | None, slack: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.slack = slack
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _timeout(self, read: float | None) -> httpx.Timeout:
        return httpx.Timeout(_DEFAULT_TIMEOUT, read=read)


class Client(SessionsMixin, _Base):
    """Synchronous client of an execbox service."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        slack: float = DEFAULT_SLACK,
        transport: httpx.BaseTransport | None = None,
        trust_env: bool = True,
    ) -> None:
        super().__init__(base_url, api_key, slack)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, transport=transport, trust_env=trust_env
        )
        self._lane = Lane.for_client(self.base_url, self.headers, transport, trust_env)

    def close(self) -> None:
        if self._lane is not None:
            self._lane.close()
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, read: float | None, **kw: Any) -> httpx.Response | Answer:
        response: httpx.Response | Answer | None = None
        if self._lane is not None and kw.keys() <= {"json", "params"}:
            try:
                response = self._lane.request(method, path, read, kw.get("json"), kw.get("params"))
            except LaneError as exc:
                raise ServiceError(f"cannot reach the execbox service: {exc}") from exc
        if response is None:
            try:
                response = self._http.request(method, path, timeout=self._timeout(read), **kw)
            except httpx.HTTPError as exc:
                raise _transport_error(exc) from exc
        raise_for_response(response)
        return response

    def execute(
        self,
        code: str,
        env: dict[str, str] | None = None,
        *,
        language: str = "javascript",
        **fields: Any,
    ) -> ExecutionResult:
        """Run ``code`` on the service and return its result.

        ``fields`` are those of ``ExecutionRequest`` (stdin, files, timeout, limits, image, state, user_id, ...),
        as for ``Executor.execute``.
        """
        body = _request(code, env, language, fields)
        response = self._send("POST", "/v1/execute", _read_timeout(body, self.slack), json=body)
        return ExecutionResult.model_validate_json(response.content)

    def stream(
        self,
        code: str,
        env: dict[str, str] | None = None,
        *,
        language: str = "javascript",
        **fields: Any,
    ) -> Iterator[StreamEvent]:
        """Run ``code`` and yield its output as it is produced; the last event is the result."""
        body = _request(code, env, language, fields)
        return self._events("/v1/execute", body, _read_timeout(body, self.slack), ExecutionResult)

    def _events(
        self, path: str, body: dict[str, Any], read: float, model: type[ExecutionResult] | type[SessionResult]
    ) -> Iterator[StreamEvent]:
        headers = {"Accept": "text/event-stream"}
        try:
            with self._http.stream("POST", path, json=body, headers=headers, timeout=self._timeout(read)) as response:
                if not response.is_success:
                    response.read()
                    raise_for_response(response)
                parser = _SSEParser(model)
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
                        if event.kind == "result":
                            return
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc
        raise ServiceError("the stream ended without a result")

    def submit(
        self,
        code: str,
        env: dict[str, str] | None = None,
        *,
        language: str = "javascript",
        callback_url: str | None = None,
        retries: int = 0,
        **fields: Any,
    ) -> str:
        """Start an execution in the background; return its id (see ``wait``/``get``).

        ``retries``: times it may be started again if the server running it dies mid-run (default never).
        """
        body = _request(code, env, language, fields)
        if callback_url is not None:
            body["callback_url"] = callback_url
        if retries:
            body["retries"] = retries
        return Submitted.model_validate(self._send("POST", "/v1/executions", None, json=body).json()).id

    def get(self, execution_id: str, wait: float = 0) -> ExecutionJob:
        """The async execution's status (waiting up to ``wait`` s, at most 60, for it to finish)."""
        params = {"wait": wait} if wait else None
        response = self._send("GET", f"/v1/executions/{execution_id}", wait + _DEFAULT_TIMEOUT, params=params)
        return ExecutionJob.model_validate(response.json())

    def wait(self, execution_id: str, timeout: float | None = None) -> ExecutionResult:
        """Block until the async execution finished; its result, or the error it failed with."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 30.0 if deadline is None else max(0.0, deadline - time.monotonic())
            job = self.get(execution_id, wait=min(30.0, remaining))
            if job.status in ("completed", "failed"):
                return _job_result(job)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"execution {execution_id} still {job.status} after {timeout} s")


def _job_result(job: ExecutionJob) -> ExecutionResult:
    if job.result is not None:
        return job.result
    err = job.error
    raise error_from(None, err.type if err else None, err.message if err else "failed", err.field if err else None)


class AsyncClient(AsyncSessionsMixin, _Base):
    """Asynchronous client of an execbox service (the same methods as ``Client``, awaitable)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        slack: float = DEFAULT_SLACK,
        transport: httpx.AsyncBaseTransport | None = None,
        trust_env: bool = True,
    ) -> None:
        super().__init__(base_url, api_key, slack)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, transport=transport, trust_env=trust_env
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, read: float | None, **kw: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, timeout=self._timeout(read), **kw)
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc
        raise_for_response(response)
        return response

    async def execute(
        self,
        code: str,
        env: dict[str, str] | None = None,
        *,
        language: str = "javascript",
        **fields: Any,
    ) -> ExecutionResult:
        body = _request(code, env, language, fields)
        response = await self._send("POST", "/v1/execute", _read_timeout(body, self.slack), json=body)
        return ExecutionResult.model_validate_json(response.content)

    async def stream(
        self,
        code: str,
        env: dict[str, str] | None = None,
        *,
        language: str = "javascript",
        **fields: Any,
    ) -> AsyncIterator[StreamEvent]:
        body = _request(code, env, language, fields)
        async for event in self._events("/v1/execute", body, _read_timeout(body, self.slack), ExecutionResult):
            yield event

    async def _events(
        self, path: str, body: dict[str, Any], read: float, model: type[ExecutionResult] | type[SessionResult]
    ) -> AsyncIterator[StreamEvent]:
        headers = {"Accept": "text/event-stream"}
        try:
            async with self._http.stream(
                "POST", path, json=body, headers=headers, timeout=self._timeout(read)
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise_for_response(response)
                parser = _SSEParser(model)
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
                        if event.kind == "result":
                            return
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc
        raise ServiceError("the stream ended without a result")

    async def submit(
        self,
        code: str,
        env: dict[str, str] | None = None,
        *,
        language: str = "javascript",
        callback_url: str | None = None,
        retries: int = 0,
        **fields: Any,
    ) -> str:
        body = _request(code, env, language, fields)
        if callback_url is not None:
            body["callback_url"] = callback_url
        if retries:
            body["retries"] = retries
        response = await self._send("POST", "/v1/executions", None, json=body)
        return Submitted.model_validate(response.json()).id

    async def get(self, execution_id: str, wait: float = 0) -> ExecutionJob:
        params = {"wait": wait} if wait else None
        response = await self._send("GET", f"/v1/executions/{execution_id}", wait + _DEFAULT_TIMEOUT, params=params)
        return ExecutionJob.model_validate(response.json())

    async def wait(self, execution_id: str, timeout: float | None = None) -> ExecutionResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 30.0 if deadline is None else max(0.0, deadline - time.monotonic())
            job = await self.get(execution_id, wait=min(30.0, remaining))
            if job.status in ("completed", "failed"):
                return _job_result(job)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"execution {execution_id} still {job.status} after {timeout} s")
