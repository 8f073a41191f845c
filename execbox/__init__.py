"""execbox: run untrusted JavaScript, Python and shell code in fresh, locked-down containers."""

from .config import ExecutorConfig
from .exceptions import (
    ConfigurationError,
    EngineError,
    EngineUnavailableError,
    ExecboxError,
    ImageNotFoundError,
    InvalidRequestError,
    SandboxError,
)
from .executor import Executor
from .models import ExecutionRequest, ExecutionResult, Limits
from .runtimes import RUNTIMES, Runtime

__version__ = "0.1.0"

__all__ = [
    "RUNTIMES",
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
    "Runtime",
    "SandboxError",
    "__version__",
]
