"""The one exception tree of execbox.

::

    ExecboxError
    ├── InvalidRequestError     bad input; ``field`` names the offending field
    ├── ConfigurationError      bad executor/service configuration
    ├── EngineError             the container engine failed or refused
    │   ├── EngineUnavailableError   no engine answers (dockerd down, bad DOCKER_HOST)
    │   ├── ImageNotFoundError       the sandbox image is not built / not present
    │   └── VolumeBusyError          a user's volume is in use (a run holds it); try again
    ├── SandboxError            a sandbox broke the protocol or died before reporting
    ├── SessionError            a persistent session (``Sessions``) could not be used
    │   ├── SessionNotFoundError     no such session for this tenant (ended, expired, another tenant's)
    │   ├── SessionLimitError        a cap on live sessions is reached (per user or in all); ``retry_after``
    │   ├── SessionBusyError         another call kept the session busy for too long
    │   └── SessionStateError        not possible for this session (e.g. pausing one not under gvisor); ``field``
    └── ServiceError            the execbox HTTP service failed or could not be reached
        ├── AuthenticationError      401: missing or unknown API key
        ├── PermissionDeniedError    403: the tenant may not use this language/image
        ├── NotFoundError            404: no such execution (or another tenant's)
        ├── QuotaExceededError       429: the tenant's rate or concurrency quota; ``retry_after``
        ├── ServerBusyError          503: the service's queue is full; ``retry_after``
        ├── NodeLostError            410/503 node_lost: the node holding the session (or running the call) died
        └── WaitTimeoutError         an async execution did not finish within ``wait(timeout=)``

The client (``execbox.Client``) raises the same classes as the library for the
same causes (``InvalidRequestError`` for a 413/422 naming the field,
``EngineUnavailableError``, ``ImageNotFoundError``, ``SandboxError``), and a
``ServiceError`` subclass for what only a service can answer (a session that is
not found is ``NotFoundError``, one over the caps ``QuotaExceededError``, a busy
one a ``ServiceError`` with status 409).

A timeout or an out-of-memory kill of the user's code is not an exception: it is
reported on the result (``timed_out``, ``oom_killed``). Errors of the docker SDK
never reach callers; they are translated at the engine boundary with ``from``.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "EngineError",
    "EngineUnavailableError",
    "ExecboxError",
    "ImageNotFoundError",
    "InvalidRequestError",
    "NodeLostError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "SandboxError",
    "ServerBusyError",
    "ServiceError",
    "SessionBusyError",
    "SessionError",
    "SessionLimitError",
    "SessionNotFoundError",
    "SessionStateError",
    "VolumeBusyError",
    "WaitTimeoutError",
]


class ExecboxError(Exception):
    """Root of every error execbox raises."""


class InvalidRequestError(ExecboxError, ValueError):
    """A request (or a part of it) is invalid; nothing was started."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ConfigurationError(ExecboxError):
    """The configuration is invalid or inconsistent."""


class EngineError(ExecboxError):
    """The container engine failed."""


class EngineUnavailableError(EngineError):
    """No container engine answers."""


class ImageNotFoundError(EngineError):
    """The requested sandbox image does not exist on the engine."""


class SandboxError(ExecboxError):
    """The sandbox did not follow the agent protocol (crashed, garbled, silent)."""


class SessionError(ExecboxError):
    """A persistent session could not be created or used."""


class SessionNotFoundError(SessionError):
    """No such session for this tenant: never created, ended, expired, or another tenant's."""


class SessionLimitError(SessionError):
    """A cap on live sessions is reached: the user's own (``scope="user"``) or all (``"total"``)."""

    def __init__(self, message: str, scope: str, retry_after: float | None = None) -> None:
        self.scope = scope
        self.retry_after = retry_after
        super().__init__(message)


class SessionBusyError(SessionError):
    """Another call on the same session did not finish in time for this one to start."""


class SessionStateError(SessionError):
    """The session cannot do that: ``field`` names what decides it (e.g. ``isolation``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class ServiceError(ExecboxError):
    """The execbox HTTP service answered with an error, or could not be reached.

    ``status_code`` is the HTTP status (None when no answer arrived).
    """

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class AuthenticationError(ServiceError):
    """The API key is missing or unknown (HTTP 401)."""


class PermissionDeniedError(ServiceError):
    """The tenant may not do this, e.g. use this language or image (HTTP 403); ``field`` says which."""

    def __init__(self, message: str, status_code: int | None = None, field: str | None = None) -> None:
        super().__init__(message, status_code)
        self.field = field


class NotFoundError(ServiceError):
    """No such resource for this tenant (HTTP 404)."""


class QuotaExceededError(ServiceError):
    """The tenant's rate or concurrency quota is used up (HTTP 429); retry after ``retry_after`` s."""

    def __init__(self, message: str, status_code: int | None = 429, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message, status_code)


class ServerBusyError(ServiceError):
    """The service's execution queue is full (HTTP 503); retry after ``retry_after`` s."""

    def __init__(self, message: str, status_code: int | None = 503, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message, status_code)


class NodeLostError(ServiceError):
    """The node that held the session, the user's volume or the call is not live (error type ``node_lost``):
    410 for a session whose node is gone, 503 for a call or run lost with its node. ``node`` names it."""

    def __init__(
        self, message: str, status_code: int | None = None, retry_after: float | None = None, node: str | None = None
    ) -> None:
        self.retry_after = retry_after
        self.node = node
        super().__init__(message, status_code)


class WaitTimeoutError(ServiceError, TimeoutError):
    """An asynchronous execution was not finished when ``wait()`` gave up."""


class VolumeBusyError(EngineError):
    """The user's volume is in use by a running sandbox (or a backup/restore of it)."""
