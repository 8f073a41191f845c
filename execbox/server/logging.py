"""Structured JSON logs: one object per line, with the execution id and tenant bound from context.

Only whitelisted fields are written, so a value that happens to ride along on a
record (an env dict, a request body, a header) never reaches the log. Messages
themselves are execbox's own format strings: the service never logs request
bodies, env values, API keys or webhook secrets.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "bind", "configure_logging", "execution_id_var", "tenant_var"]

tenant_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("execbox_tenant", default=None)
execution_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("execbox_execution_id", default=None)
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("execbox_request_id", default=None)

# Extra attributes that may appear in a log line; anything else on a record is dropped.
SAFE_FIELDS = frozenset(
    {
        "execution_id",
        "job_id",
        "tenant",
        "request_id",
        "language",
        "exit_code",
        "timed_out",
        "oom_killed",
        "duration_ms",
        "method",
        "path",
        "status",
        "reason",
        "attempt",
        "host",
        "port",
        "in_flight",
        "outcome",
    }
)


def bind(tenant: str | None = None, execution_id: str | None = None) -> None:
    """Attach tenant/execution id to every log line of the current task (and threads it starts)."""
    if tenant is not None:
        tenant_var.set(tenant)
    if execution_id is not None:
        execution_id_var.set(execution_id)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in (("tenant", tenant_var), ("execution_id", execution_id_var), ("request_id", request_id_var)):
            value = var.get()
            if value is not None:
                line[key] = value
        for key in SAFE_FIELDS:
            if key in record.__dict__:
                line[key] = record.__dict__[key]
        if record.exc_info and record.exc_info[0] is not None:
            # The type and message only: tracebacks may show locals of user requests.
            line["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(line, default=str)


def configure_logging(level: str = "info", json_format: bool = True) -> None:
    """Send execbox's and uvicorn's logs to stderr, as JSON lines unless ``json_format`` is False."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("execbox", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # Access lines are written by execbox's own middleware (no query strings, no headers).
    logging.getLogger("uvicorn.access").disabled = True
