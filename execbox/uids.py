"""Sandbox UIDs leased from a registry, so that no two live holders share one.

The kernel counts some budgets per UID, whatever the container: RLIMIT_NPROC,
inotify instances and watches, user-namespace and mqueue counts. Two sandboxes
with one UID are coupled through them (one user's 118 processes made another's
``fork()`` fail). So every UID a sandbox runs as is leased here first:

- a run's sandbox leases a UID for its lifetime (released when it is removed);
- a session leases one for its lifetime;
- a volume leases one for as long as the volume exists (renewed on every use).

A lease is a record in the state store (``put_record(..., mode="create")``: the
store makes the claim atomic, across threads, processes and, with Redis, every
replica), with a TTL so that a crashed holder's lease runs out: its sandboxes
carry a label expiry no later than the lease, and the reaper removes them. The
ranges of runs, sessions and volumes are disjoint by default.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import uuid
from pathlib import Path

from .exceptions import ConfigurationError
from .state.base import StateStore

__all__ = ["LEASE_KIND", "UidLease", "UidRegistry", "host_store"]

log = logging.getLogger("execbox.uids")

LEASE_KIND = "uid"  # record kind: key = the UID, value = {"holder": ...}
_ATTEMPTS = 10_000


class UidLease:
    """One leased UID and the token that proves who holds it."""

    __slots__ = ("holder", "uid")

    def __init__(self, uid: int, holder: str) -> None:
        self.uid = uid
        self.holder = holder

    def __repr__(self) -> str:
        return f"UidLease({self.uid}, {self.holder!r})"


class UidRegistry:
    """Leases UIDs in ``[base, base + count)`` from ``store`` (None: this process only)."""

    def __init__(self, store: StateStore | None, base: int, count: int) -> None:
        self.store = store
        self.base, self.count = base, count
        self._rand = random.Random()
        self._local: dict[int, str] = {}  # the lease table when there is no store
        self._lock = threading.Lock()

    def lease(self, ttl: float, purpose: str = "run", holder: str | None = None) -> UidLease:
        """A UID no other live holder has, leased for ``ttl`` seconds (to ``holder``, default a new token)."""
        holder = holder or f"{purpose}:{uuid.uuid4().hex}"
        for _ in range(min(_ATTEMPTS, 20 * self.count)):
            uid = self.base + self._rand.randrange(self.count)
            if self.claim(uid, holder, ttl):
                return UidLease(uid, holder)
        raise ConfigurationError(f"no free UID in {self.base}-{self.base + self.count - 1}: too many live sandboxes")

    def claim(self, uid: int, holder: str, ttl: float) -> bool:
        """Lease exactly ``uid`` for ``holder``; True if it was free or already theirs (then renewed)."""
        if self.store is None:
            with self._lock:
                if self._local.setdefault(uid, holder) != holder:
                    return False
                return True
        if self.store.put_record(LEASE_KIND, str(uid), {"holder": holder}, ttl, "create"):
            return True
        current = self.store.get_record(LEASE_KIND, str(uid))
        if current is not None and current.get("holder") == holder:
            return self.store.put_record(LEASE_KIND, str(uid), {"holder": holder}, ttl, "update")
        return False

    def renew(self, lease: UidLease, ttl: float) -> bool:
        return self.claim(lease.uid, lease.holder, ttl)

    def holder(self, uid: int) -> str | None:
        """Who holds ``uid`` now (None: nobody)."""
        if self.store is None:
            with self._lock:
                return self._local.get(uid)
        current = self.store.get_record(LEASE_KIND, str(uid))
        return None if current is None else str(current.get("holder"))

    def release(self, lease: UidLease) -> None:
        """End the lease (no error if it already ran out or was never granted)."""
        if self.store is None:
            with self._lock:
                if self._local.get(lease.uid) == lease.holder:
                    del self._local[lease.uid]
            return
        try:
            if self.holder(lease.uid) == lease.holder:
                self.store.delete_record(LEASE_KIND, str(lease.uid))
        except Exception as exc:  # the lease runs out by itself
            log.warning("could not release UID %d (its lease will expire): %s", lease.uid, exc)


def host_store(data_dir: str | Path) -> StateStore | None:
    """The lease table of this host: a SQLite file in the data directory, shared by every
    execbox process that uses that directory (UIDs are a per-host resource). None, with
    a warning, when the directory is not writable: leases then hold in this process only."""
    from .state.sqlite import SQLiteStateStore

    path = Path(data_dir) / "uids.db"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return SQLiteStateStore(path)
    except (OSError, sqlite3.Error) as exc:
        log.warning("UID leases held in this process only (%s is not usable: %s)", path, exc)
        return None
