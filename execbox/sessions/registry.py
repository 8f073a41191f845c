"""The session registry: records in the state store (shared by replicas), the caps checked
under the registry's lock, and this store's registry id."""

from __future__ import annotations

import builtins
import logging
import random
import secrets
import threading
import time
from pathlib import Path

import pydantic

from ..engine.base import Engine
from ..exceptions import ConfigurationError, SessionBusyError, SessionLimitError, SessionNotFoundError
from ..state import StateBusyError, StateStore
from ..uids import UidLease, UidRegistry
from .link import SessionLink
from .models import ID_RE, LOCKS, RECORD_KIND, Record, SessionsConfig

__all__ = ["SessionsBase", "default_store"]

log = logging.getLogger("execbox.sessions")


def default_store() -> StateStore:
    from ..state.sqlite import SQLiteStateStore

    return SQLiteStateStore(Path.home() / ".local" / "share" / "execbox" / "sessions.db")


def _holder(rec: Record) -> str:
    """The holder of a session's UID lease."""
    return f"session:{rec.registry}/{rec.key}"


class SessionsBase:
    """What every part of ``Sessions`` shares, and the registry."""

    engine: Engine
    store: StateStore
    config: SessionsConfig
    image: str
    registry_id: str
    _links: dict[str, SessionLink]
    _lock: threading.Lock
    _rand: random.Random
    _closed: bool
    _counts: dict[str, int]
    uids: UidRegistry

    def _release_uid(self, rec: Record) -> None:
        if rec.uid:
            self.uids.release(UidLease(rec.uid, _holder(rec)))

    def _registry_id(self) -> str:
        """This store's registry id (made once): labels tie containers to their registry."""
        for _ in range(3):
            found = self.store.get_record("meta", "session-registry")
            if isinstance(found, dict) and isinstance(found.get("id"), str):
                return str(found["id"])
            self.store.put_record("meta", "session-registry", {"id": secrets.token_hex(8)}, 10 * 365 * 86400, "create")
        raise ConfigurationError("the state store does not keep the session registry's id")

    def _records(self, prefix: str = "") -> builtins.list[Record]:
        out = []
        for key, value in self.store.list_records(RECORD_KIND, prefix).items():
            try:
                rec = Record.model_validate(value)
            except pydantic.ValidationError:
                log.warning("session registry: dropping unreadable record %s", key)
                self.store.delete_record(RECORD_KIND, key)
                continue
            if rec.registry == self.registry_id:
                out.append(rec)
        return out

    def _record_or_none(self, tenant: str, session_id: str, live: bool = True) -> Record | None:
        """The session's record; with ``live``, None once it expired (the reaper ends it soon)."""
        if not ID_RE.match(session_id or "") or not isinstance(tenant, str) or "/" in tenant:
            return None
        value = self.store.get_record(RECORD_KIND, f"{tenant}/{session_id}")
        if value is None:
            return None
        try:
            rec = Record.model_validate(value)
        except pydantic.ValidationError:
            return None
        if rec.tenant != tenant or (live and rec.expires_at() <= time.time()):
            return None  # expired: to callers it is already gone
        return rec

    def _record(self, tenant: str, session_id: str) -> Record:
        rec = self._record_or_none(tenant, session_id)
        if rec is None:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return rec

    def _reserve(self, rec: Record) -> None:
        """Check the caps and write the record (status creating), all under the registry's lock."""
        cfg = self.config
        try:
            with self.store.lock(LOCKS, "create", lease=30, wait=30):
                now = time.time()
                live = [r for r in self._records() if r.expires_at() > now]
                mine = sum(1 for r in live if r.tenant == rec.tenant and r.user_id == rec.user_id)
                if mine >= cfg.max_per_user:
                    raise SessionLimitError(
                        f"user {rec.user_id!r} has {mine} live sessions (at most {cfg.max_per_user}): end one first",
                        "user",
                        retry_after=self._retry_after(live, rec),
                    )
                if len(live) >= cfg.max_total:
                    raise SessionLimitError(
                        f"{len(live)} live sessions (at most {cfg.max_total} in all)",
                        "total",
                        retry_after=self._retry_after(live, None),
                    )
                # Unique among the registry's live sessions, and leased on this host (runs, volumes and
                # other registries' sessions lease there too): no live holder shares a session's UID.
                used = {r.uid for r in live}
                rec.uid = next(
                    uid
                    for uid in iter(lambda: cfg.uid_base + self._rand.randrange(cfg.uid_count), None)
                    if uid not in used and self.uids.claim(uid, _holder(rec), rec.record_ttl())
                )
                if not self.store.put_record(
                    RECORD_KIND, rec.key, rec.model_dump(mode="json"), rec.record_ttl(), "create"
                ):
                    raise SessionBusyError("session id collision; try again")  # 96 random bits: never
        except StateBusyError:
            raise SessionBusyError("the session registry is busy; try again") from None

    @staticmethod
    def _retry_after(live: builtins.list[Record], rec: Record | None) -> float:
        relevant = [r for r in live if rec is None or (r.tenant == rec.tenant and r.user_id == rec.user_id)]
        soonest = min((r.expires_at() for r in relevant), default=time.time() + 1)
        return max(1.0, round(soonest - time.time()))
