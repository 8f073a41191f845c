"""The ``StateStore`` interface: per-tenant, per-user JSON state with versions,
a size cap, a TTL, and a lease lock that serializes a user's stateful runs
(held in the store, so it holds across service replicas; a crashed holder's
lease simply expires).

It also keeps small records for execbox itself (the session registry): JSON
objects by (kind, key), each with a TTL, written unconditionally, only when
absent, or only when present."""

from __future__ import annotations

import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from ..exceptions import ExecboxError, InvalidRequestError

__all__ = ["PutMode", "StateBusyError", "StateConflictError", "StateStore", "StoredState", "check_id"]

PutMode = Literal["any", "create", "update"]
"""``put_record``: write always, only if no live record exists, or only if one does."""

MAX_RECORD_BYTES = 64 << 10

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


def check_id(field: str, value: str) -> str:
    """A tenant or user id that is safe in keys, file names and volume names."""
    if not isinstance(value, str) or not _ID_RE.match(value) or ".." in value:
        raise InvalidRequestError(
            field, "must be 1-128 characters: letters, digits, '_', '.', '@', '-', starting with a letter or digit"
        )
    return value


class StateConflictError(ExecboxError):
    """The stored state changed since it was read (optimistic write refused)."""


class StateBusyError(ExecboxError):
    """Another stateful run of the same user held the lock for too long."""


@dataclass(frozen=True)
class StoredState:
    value: Any
    version: int
    updated: float


class StateStore(ABC):
    """Where state lives between runs."""

    def __init__(self, max_bytes: int = 1 << 20, ttl: float | None = 30 * 86400) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl

    def encode(self, value: Any) -> str:
        try:
            data = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError("state", f"not JSON-serializable: {exc}") from None
        if len(data.encode()) > self.max_bytes:
            raise InvalidRequestError("state", f"larger than the store's limit of {self.max_bytes} bytes")
        return data

    @abstractmethod
    def get(self, tenant: str, user: str) -> StoredState | None: ...

    @abstractmethod
    def put(self, tenant: str, user: str, value: Any, expected_version: int | None = None) -> int:
        """Store ``value``; return the new version. With ``expected_version``, refuse
        (StateConflictError) unless the stored version is that one (0: nothing stored)."""

    @abstractmethod
    def delete(self, tenant: str, user: str) -> bool: ...

    @abstractmethod
    def _try_lock(self, tenant: str, user: str, token: str, lease: float) -> bool: ...

    @abstractmethod
    def _unlock(self, tenant: str, user: str, token: str) -> None: ...

    # -- small records of execbox itself (e.g. the session registry) --------------------------

    def encode_record(self, value: Any) -> str:
        data = json.dumps(value, separators=(",", ":"), allow_nan=False)
        if len(data.encode()) > MAX_RECORD_BYTES:
            raise ValueError(f"a record is larger than {MAX_RECORD_BYTES} bytes")
        return data

    @abstractmethod
    def put_record(self, kind: str, key: str, value: Any, ttl: float, mode: PutMode = "any") -> bool:
        """Store a JSON value for ``ttl`` seconds; False if ``mode`` refused ("create": one
        exists, "update": none exists). Expired records count as absent."""

    @abstractmethod
    def get_record(self, kind: str, key: str) -> Any | None:
        """The live record's value, or None."""

    @abstractmethod
    def delete_record(self, kind: str, key: str) -> bool: ...

    @abstractmethod
    def list_records(self, kind: str, prefix: str = "") -> dict[str, Any]:
        """Every live record of ``kind`` whose key starts with ``prefix``: key -> value."""

    @contextmanager
    def lock(self, tenant: str, user: str, lease: float, wait: float) -> Iterator[None]:
        """Hold the user's lock (for at most ``lease`` seconds) while the block runs."""
        import uuid

        token = uuid.uuid4().hex
        deadline = time.monotonic() + wait
        delay = 0.005
        while not self._try_lock(tenant, user, token, lease):
            if time.monotonic() >= deadline:
                raise StateBusyError(f"user {user!r} is busy with another stateful run")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        try:
            yield
        finally:
            self._unlock(tenant, user, token)

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""
