"""Errors as HTTP answers: one JSON shape, ``{"error": {type, message, field, retry_after}}``.

Library exceptions are translated here, at the service boundary, so that routes
can simply let them propagate.
"""

from __future__ import annotations

import logging
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..exceptions import (
    EngineError,
    EngineUnavailableError,
    ExecboxError,
    ImageNotFoundError,
    InvalidRequestError,
    SandboxError,
)
from ..state.base import StateBusyError, StateConflictError
from ..volumes import VolumeBusyError
from .schemas import ErrorResponse

__all__ = [
    "ERROR_RESPONSES",
    "ApiError",
    "answer_error",
    "error_response",
    "from_library",
    "install_error_handlers",
    "invalid_from",
]

log = logging.getLogger("execbox.server")


class ApiError(Exception):
    """An error answer of the API."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        field: str | None = None,
        retry_after: int | None = None,
        reason: str | None = None,
        node: str | None = None,
    ) -> None:
        self.status, self.type, self.message = status, type_, message
        self.field, self.retry_after = field, retry_after
        self.node = node  # node_lost: which node
        self.reason = reason or type_  # label of the rejections metric
        super().__init__(message)


def error_response(err: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"type": err.type, "message": err.message}
    if err.field is not None:
        body["field"] = err.field
    if err.node is not None:
        body["node"] = err.node
    headers = {}
    if err.retry_after is not None:
        body["retry_after"] = err.retry_after
        headers["Retry-After"] = str(err.retry_after)
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="execbox"'
    return JSONResponse({"error": body}, status_code=err.status, headers=headers)


def from_library(exc: ExecboxError, image_requested: bool = False) -> ApiError:
    """The API error for a library exception."""
    if isinstance(exc, InvalidRequestError):
        return ApiError(422, "invalid_request", exc.message, field=exc.field, reason="invalid")
    if isinstance(exc, ImageNotFoundError):
        if image_requested:
            return ApiError(422, "image_not_found", str(exc), field="image", reason="invalid")
        return ApiError(503, "image_not_found", "the sandbox image is not built on this server", retry_after=30)
    if isinstance(exc, EngineUnavailableError):
        return ApiError(503, "engine_unavailable", "the container engine does not answer", retry_after=5)
    if isinstance(exc, StateBusyError):
        return ApiError(409, "state_busy", str(exc), field="user_id", retry_after=5)
    if isinstance(exc, VolumeBusyError):
        return ApiError(409, "volume_busy", str(exc), field="user_id", retry_after=5)
    if isinstance(exc, StateConflictError):
        return ApiError(409, "state_conflict", str(exc), field="user_id")
    if isinstance(exc, EngineError):
        return ApiError(503, "engine_error", f"the container engine failed: {exc}", retry_after=5)
    if isinstance(exc, SandboxError):
        return ApiError(500, "sandbox_error", str(exc))
    return ApiError(500, "internal_error", f"{type(exc).__name__}: {exc}")


def invalid_from(exc: pydantic.ValidationError) -> InvalidRequestError:
    """The first error of a pydantic validation as an InvalidRequestError naming the field."""
    first = exc.errors()[0]
    return InvalidRequestError(
        _field_of(first.get("loc", ())), str(first.get("msg", "invalid")).removeprefix("Value error, ")
    )


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] if parts[0] == "body" else parts
    return ".".join(parts) or "body"


def answer_error(exc: ApiError | ExecboxError, on_reject: Any) -> JSONResponse:
    """The answer to an ApiError or a library exception; ``on_reject(reason)`` counts a refusal."""
    err = exc if isinstance(exc, ApiError) else from_library(exc)
    if err.status >= 500 and not isinstance(exc, ApiError):
        log.error("request failed: %s", err.type, exc_info=exc)
    else:
        on_reject(err.reason)
    return error_response(err)


def install_error_handlers(app: FastAPI, on_reject: Any) -> None:
    """Register the handlers; ``on_reject(reason)`` counts refused requests."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return answer_error(exc, on_reject)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
        first: dict[str, Any] = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            field, message = "body", f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        else:
            field = _field_of(first.get("loc", ()))
            message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        on_reject("invalid")
        # Never echo the offending input back: it may be an env value.
        details = [
            {"field": _field_of(e.get("loc", ())), "message": e.get("msg"), "type": e.get("type")} for e in errors
        ]
        body = {"error": {"type": "invalid_request", "message": message, "field": field}, "errors": details}
        return JSONResponse(body, status_code=422)

    async def library_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ExecboxError)
        return answer_error(exc, on_reject)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # FastAPI's "error parsing the body" (e.g. not UTF-8): malformed input, like invalid JSON.
            on_reject("invalid")
            return error_response(ApiError(422, "invalid_request", f"malformed body: {exc.detail}", field="body"))
        types = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return error_response(ApiError(exc.status_code, types.get(exc.status_code, "http_error"), str(exc.detail)))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ExecboxError, library_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _doc("Missing or unknown API key."),
    403: _doc("The tenant may not use this language or image."),
    409: _doc("Another stateful run of the same user holds its state (persist_state)."),
    413: _doc("The request body or the code is too large."),
    422: _doc("Malformed JSON, a wrong type, an unknown field, or limits above the tenant's maximum."),
    429: _doc("Over the tenant's concurrency or per-minute quota; see Retry-After."),
    503: _doc("The execution queue is full, or the engine is unavailable; see Retry-After."),
}
