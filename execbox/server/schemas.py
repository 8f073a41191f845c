"""Wire models of the HTTP API that the library's models do not cover (shared with the client).

Only pydantic here, so that ``execbox.client`` can import it without FastAPI.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..models import ExecutionRequest, ExecutionResult

__all__ = [
    "ErrorBody",
    "ErrorResponse",
    "ExecutionJob",
    "FieldError",
    "JobRequest",
    "SeedRequest",
    "SeedResponse",
    "Submitted",
]

JobStatus = Literal["queued", "running", "completed", "failed"]


class SeedRequest(BaseModel):
    """The seed's ``POST /execute`` body: code and env, JavaScript unless told otherwise."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, description="Program source text.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for this run only.")
    language: str = Field("javascript", description="javascript, python or bash.")


class SeedResponse(ExecutionResult):
    """The result, plus ``output`` (= stdout) as the seed's callers expect."""

    output: str = Field(description="Standard output of the program (the same as stdout).")


class JobRequest(ExecutionRequest):
    """An execution to run in the background, with an optional webhook."""

    callback_url: str | None = Field(
        None,
        max_length=2048,
        description="http(s) URL that receives the finished job by POST, signed with "
        "X-Execbox-Signature: sha256=HMAC-SHA256(tenant webhook secret, body), with X-Execbox-Delivery: <job id> "
        "(the same on every attempt: de-duplicate on it).",
    )
    retries: int = Field(
        0,
        ge=0,
        le=5,
        description="Times the execution may be started again if the server running it dies mid-run (code is "
        "not assumed idempotent: by default such a job ends failed). A job still queued is never lost either way.",
    )


class Submitted(BaseModel):
    id: str = Field(description="Id of the async execution; poll GET /v1/executions/{id}.")
    status: JobStatus = Field(description="Always queued at submission.")


class ErrorBody(BaseModel):
    type: str = Field(
        description="invalid_request, payload_too_large, unauthorized, forbidden, not_found, quota_exceeded, "
        "server_busy, engine_unavailable, engine_error, image_not_found, sandbox_error, shutting_down, "
        "queue_unavailable, interrupted (the server running an async execution died mid-run) or internal_error."
    )
    message: str = Field(description="What went wrong, for a person.")
    field: str | None = Field(None, description="The offending request field (dotted path), if one is to blame.")
    retry_after: int | None = Field(None, description="Seconds to wait before retrying (429 and 503).")
    node: str | None = Field(None, description="node_lost: the node that is not live.")


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field.")
    message: str = Field(description="What is wrong with it.")
    type: str = Field(description="Pydantic's error type, e.g. missing, extra_forbidden, int_parsing.")


class ErrorResponse(BaseModel):
    error: ErrorBody = Field(description="The error.")
    errors: list[FieldError] | None = Field(None, description="Every invalid field (422 answers only).")


class ExecutionJob(BaseModel):
    """An async execution as its tenant sees it."""

    id: str = Field(description="Id of the async execution.")
    status: JobStatus = Field(description="queued, running, completed (the program ran) or failed (it could not).")
    language: str = Field(description="Language of the execution.")
    created_at: float = Field(description="Unix time of submission.")
    started_at: float | None = Field(None, description="Unix time the execution started.")
    finished_at: float | None = Field(None, description="Unix time the execution finished.")
    expires_at: float | None = Field(None, description="Unix time after which the job is forgotten (404).")
    result: ExecutionResult | None = Field(None, description="The result once completed.")
    error: ErrorBody | None = Field(None, description="Why the execution failed, if it did.")
    callback_url: str | None = Field(None, description="The webhook URL given at submission.")
    callback_status: Literal["pending", "delivered", "failed"] | None = Field(
        None, description="Delivery state of the webhook, when there is one."
    )
    callback_attempts: int = Field(0, description="Webhook delivery attempts made so far.")
    attempts: int = Field(0, description="Times the execution was started (more than 1 only with retries).")
    retries: int = Field(0, description="Restarts allowed if the server running it dies (from the request).")
