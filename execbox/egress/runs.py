"""Per-run state shared by the proxy's addons (proxy thread) and ``Egress`` (caller threads)."""

from __future__ import annotations

import hmac
import secrets as _secrets
import threading
from dataclasses import dataclass, field

from .models import DEFAULT_REDACT, NetworkLogEntry
from .policy import NetworkPolicy, host_matches

__all__ = ["BoundSecret", "RunRegistry", "RunState"]


@dataclass(frozen=True)
class BoundSecret:
    name: str
    placeholder: str
    value: str
    hosts: tuple[str, ...]

    def bound_to(self, host: str) -> bool:
        return any(host_matches(p, host) for p in self.hosts)


@dataclass
class RunState:
    """Everything the proxy knows about one run."""

    run_id: str
    username: str
    password: str
    policies: tuple[NetworkPolicy, ...]
    secrets: tuple[BoundSecret, ...] = ()
    tenant: str | None = None
    user_id: str | None = None
    max_log: int = 1000
    log: list[NetworkLogEntry] = field(default_factory=list)
    dropped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def redact(self) -> frozenset[str]:
        extra = {h for p in self.policies for h in p.redact_headers}
        return frozenset(DEFAULT_REDACT) | extra

    @property
    def strip_response_headers(self) -> bool:
        return any(p.strip_response_headers for p in self.policies)

    def scrub(self, text: str) -> str:
        """``text`` with every real secret value replaced by its placeholder."""
        for s in self.secrets:
            if s.value in text:
                text = text.replace(s.value, s.placeholder)
        return text

    def record(self, entry: NetworkLogEntry) -> None:
        with self._lock:
            if len(self.log) < self.max_log:
                self.log.append(entry)
            else:
                self.dropped += 1

    def entries(self) -> list[NetworkLogEntry]:
        with self._lock:
            return list(self.log)

    def take(self) -> tuple[list[NetworkLogEntry], int]:
        """The entries so far and how many were dropped, and a fresh log."""
        with self._lock:
            taken, dropped = self.log, self.dropped
            self.log, self.dropped = [], 0
            return taken, dropped


class RunRegistry:
    """Runs by id and by proxy credential. Thread-safe."""

    def __init__(self) -> None:
        self._by_id: dict[str, RunState] = {}
        self._by_user: dict[str, RunState] = {}
        self._lock = threading.Lock()

    @staticmethod
    def new_credential(run_id: str) -> tuple[str, str]:
        return f"run-{_secrets.token_hex(8)}", _secrets.token_urlsafe(24)

    def add(self, state: RunState) -> None:
        with self._lock:
            if state.run_id in self._by_id:
                raise ValueError(f"run {state.run_id} is already registered")
            self._by_id[state.run_id] = state
            self._by_user[state.username] = state

    def authenticate(self, username: str, password: str) -> RunState | None:
        with self._lock:
            state = self._by_user.get(username)
        if state is None or not hmac.compare_digest(state.password.encode(), password.encode()):
            return None
        return state

    def get(self, run_id: str) -> RunState | None:
        with self._lock:
            return self._by_id.get(run_id)

    def is_live(self, state: RunState) -> bool:
        with self._lock:
            return self._by_id.get(state.run_id) is state

    def pop(self, run_id: str) -> RunState | None:
        with self._lock:
            state = self._by_id.pop(run_id, None)
            if state is not None:
                self._by_user.pop(state.username, None)
            return state

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)
