"""SQLite implementation of ``StateStore``: the embedded default (one file)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .base import PutMode, StateConflictError, StateStore, StoredState

__all__ = ["SQLiteStateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    tenant TEXT NOT NULL, user TEXT NOT NULL, value TEXT NOT NULL,
    version INTEGER NOT NULL, updated REAL NOT NULL, expires REAL,
    PRIMARY KEY (tenant, user));
CREATE TABLE IF NOT EXISTS locks (
    tenant TEXT NOT NULL, user TEXT NOT NULL, token TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (tenant, user));
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (kind, key));
"""


class SQLiteStateStore(StateStore):
    def __init__(self, path: str | Path, max_bytes: int = 1 << 20, ttl: float | None = 30 * 86400) -> None:
        super().__init__(max_bytes, ttl)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type: object, *rest: object) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> SQLiteStateStore._Tx:
        return self._Tx(self._db())

    def get(self, tenant: str, user: str) -> StoredState | None:
        row = (
            self._db()
            .execute(
                "SELECT value, version, updated FROM state"
                " WHERE tenant=? AND user=? AND (expires IS NULL OR expires>?)",
                (tenant, user, time.time()),
            )
            .fetchone()
        )
        return None if row is None else StoredState(json.loads(row[0]), int(row[1]), float(row[2]))

    def put(self, tenant: str, user: str, value: Any, expected_version: int | None = None) -> int:
        data = self.encode(value)
        now = time.time()
        expires = None if self.ttl is None else now + self.ttl
        with self._tx() as db:
            row = db.execute("SELECT version, expires FROM state WHERE tenant=? AND user=?", (tenant, user)).fetchone()
            live = row is not None and (row[1] is None or row[1] > now)
            current = int(row[0]) if live else 0
            if expected_version is not None and expected_version != current:
                raise StateConflictError(f"state of {user!r} changed since version {expected_version}")
            db.execute(
                "INSERT INTO state (tenant, user, value, version, updated, expires) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT(tenant, user) DO UPDATE SET value=excluded.value, version=excluded.version,"
                " updated=excluded.updated, expires=excluded.expires",
                (tenant, user, data, current + 1, now, expires),
            )
            return current + 1

    def delete(self, tenant: str, user: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM state WHERE tenant=? AND user=?", (tenant, user)).rowcount > 0

    def _try_lock(self, tenant: str, user: str, token: str, lease: float) -> bool:
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM locks WHERE tenant=? AND user=? AND expires<=?", (tenant, user, now))
            cur = db.execute(
                "INSERT OR IGNORE INTO locks (tenant, user, token, expires) VALUES (?,?,?,?)",
                (tenant, user, token, now + lease),
            )
            return cur.rowcount == 1

    def _unlock(self, tenant: str, user: str, token: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM locks WHERE tenant=? AND user=? AND token=?", (tenant, user, token))

    def put_record(self, kind: str, key: str, value: Any, ttl: float, mode: PutMode = "any") -> bool:
        data = self.encode_record(value)
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT expires FROM records WHERE kind=? AND key=?", (kind, key)).fetchone()
            live = row is not None and row[0] > now
            if (mode == "create" and live) or (mode == "update" and not live):
                return False
            db.execute(
                "INSERT INTO records (kind, key, value, expires) VALUES (?,?,?,?)"
                " ON CONFLICT(kind, key) DO UPDATE SET value=excluded.value, expires=excluded.expires",
                (kind, key, data, now + ttl),
            )
            return True

    def get_record(self, kind: str, key: str) -> Any | None:
        row = (
            self._db()
            .execute("SELECT value FROM records WHERE kind=? AND key=? AND expires>?", (kind, key, time.time()))
            .fetchone()
        )
        return None if row is None else json.loads(row[0])

    def delete_record(self, kind: str, key: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM records WHERE kind=? AND key=?", (kind, key)).rowcount > 0

    def list_records(self, kind: str, prefix: str = "") -> dict[str, Any]:
        rows = (
            self._db()
            .execute(
                "SELECT key, value FROM records WHERE kind=? AND substr(key, 1, ?)=? AND expires>?",
                (kind, len(prefix), prefix, time.time()),
            )
            .fetchall()
        )
        return {str(k): json.loads(v) for k, v in rows}

    def purge_expired(self) -> int:
        with self._tx() as db:
            now = time.time()
            db.execute("DELETE FROM records WHERE expires<=?", (now,))
            return db.execute("DELETE FROM state WHERE expires IS NOT NULL AND expires<=?", (now,)).rowcount

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
