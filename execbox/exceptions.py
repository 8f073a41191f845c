"""The one exception tree of execbox.

::

    ExecboxError
    ├── InvalidRequestError     bad input; ``field`` names the offending field
    ├── ConfigurationError      bad executor/service configuration
    ├── EngineError             the container engine failed or refused
    │   ├── EngineUnavailableError   no engine answers (dockerd down, bad DOCKER_HOST)
    │   └── ImageNotFoundError       the sandbox image is not built / not present
    └── SandboxError            a sandbox broke the protocol or died before reporting

A timeout or an out-of-memory kill of the user's code is not an exception: it is
reported on the result (``timed_out``, ``oom_killed``). Errors of the docker SDK
never reach callers; they are translated at the engine boundary with ``from``.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "EngineError",
    "EngineUnavailableError",
    "ExecboxError",
    "ImageNotFoundError",
    "InvalidRequestError",
    "SandboxError",
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
