"""execbox: run untrusted JavaScript, Python and shell code in fresh, locked-down containers."""

from .client import AsyncClient, Client
from .config import ExecutorConfig
from .exceptions import (
    AuthenticationError,
    ConfigurationError,
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
    SessionBusyError,
    SessionError,
    SessionLimitError,
    SessionNotFoundError,
    WaitTimeoutError,
)
from .executor import Executor
from .models import ExecutionRequest, ExecutionResult, Limits
from .runtimes import RUNTIMES, Runtime
from .sessions import SessionInfo, SessionResult, Sessions, SessionsConfig

__version__ = "0.1.0"

__all__ = [
    "RUNTIMES",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ConfigurationError",
    "EngineError",
    "EngineUnavailableError",
    "ExecboxError",
    "ExecutionRequest",
    "ExecutionResult",
    "Executor",
    "ExecutorConfig",
    "ImageNotFoundError",
    "InvalidRequestError",
    "Limits",
    "NodeLostError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "Runtime",
    "SandboxError",
    "ServerBusyError",
    "ServiceError",
    "SessionBusyError",
    "SessionError",
    "SessionInfo",
    "SessionLimitError",
    "SessionNotFoundError",
    "SessionResult",
    "Sessions",
    "SessionsConfig",
    "WaitTimeoutError",
    "__version__",
]
