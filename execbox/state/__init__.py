"""State that survives runs: env-var state, and ``StateStore`` implementations."""

from .base import StateBusyError, StateConflictError, StateStore, StoredState, check_id
from .envvars import extract_state, state_env

__all__ = [
    "StateBusyError",
    "StateConflictError",
    "StateStore",
    "StoredState",
    "check_id",
    "extract_state",
    "open_store",
    "state_env",
]


def open_store(url: str, **options: object) -> StateStore:
    """A store from a URL: ``redis://...`` or ``sqlite:///path/to/file.db``."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStateStore

        return RedisStateStore(url, **options)  # type: ignore[arg-type]
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteStateStore

        return SQLiteStateStore(url.removeprefix("sqlite://"), **options)  # type: ignore[arg-type]
    from ..exceptions import ConfigurationError

    raise ConfigurationError(f"unsupported state store URL {url!r}: use redis://... or sqlite:///path")
