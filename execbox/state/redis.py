"""Redis implementation of ``StateStore`` (``redis://`` URL; keys in ``keys.py``)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
import redis.exceptions

from ..exceptions import EngineUnavailableError
from .base import PutMode, StateConflictError, StateStore, StoredState
from .keys import RECORD, lock_key, record_key, record_pattern, state_key

__all__ = ["RedisStateStore"]

# KEYS[1] state key; ARGV: value, expected version ("" = any), ttl ms ("" = none), now
_PUT = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= cur then return -1 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'ver', cur + 1, 'updated', ARGV[4])
if ARGV[3] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return cur + 1
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStateStore(StateStore):
    def __init__(self, url: str, max_bytes: int = 1 << 20, ttl: float | None = 30 * 86400) -> None:
        super().__init__(max_bytes, ttl)
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._put = self.r.register_script(_PUT)
        self._unlock_script = self.r.register_script(_UNLOCK)

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except redis.exceptions.ConnectionError as exc:
            raise EngineUnavailableError(f"Redis state store does not answer: {exc}") from exc

    def get(self, tenant: str, user: str) -> StoredState | None:
        raw = self._call(self.r.hgetall, state_key(tenant, user))
        if not raw:
            return None
        return StoredState(json.loads(raw[b"v"]), int(raw[b"ver"]), float(raw[b"updated"]))

    def put(self, tenant: str, user: str, value: Any, expected_version: int | None = None) -> int:
        data = self.encode(value)
        ttl = "" if self.ttl is None else str(int(self.ttl * 1000))
        expected = "" if expected_version is None else str(expected_version)
        ver = int(self._call(self._put, keys=[state_key(tenant, user)], args=[data, expected, ttl, time.time()]))
        if ver < 0:
            raise StateConflictError(f"state of {user!r} changed since version {expected_version}")
        return ver

    def delete(self, tenant: str, user: str) -> bool:
        return bool(self._call(self.r.delete, state_key(tenant, user)))

    def _try_lock(self, tenant: str, user: str, token: str, lease: float) -> bool:
        return bool(self._call(self.r.set, lock_key(tenant, user), token, nx=True, px=int(lease * 1000)))

    def _unlock(self, tenant: str, user: str, token: str) -> None:
        self._call(self._unlock_script, keys=[lock_key(tenant, user)], args=[token])

    def put_record(self, kind: str, key: str, value: Any, ttl: float, mode: PutMode = "any") -> bool:
        data = self.encode_record(value)
        flags = {"nx": mode == "create", "xx": mode == "update"}
        ok = self._call(self.r.set, record_key(kind, key), data, px=max(int(ttl * 1000), 1), **flags)
        return bool(ok)

    def get_record(self, kind: str, key: str) -> Any | None:
        raw = self._call(self.r.get, record_key(kind, key))
        return None if raw is None else json.loads(raw)

    def delete_record(self, kind: str, key: str) -> bool:
        return bool(self._call(self.r.delete, record_key(kind, key)))

    def list_records(self, kind: str, prefix: str = "") -> dict[str, Any]:
        names = list(self._call(lambda: list(self.r.scan_iter(match=record_pattern(kind, prefix), count=500))))
        if not names:
            return {}
        values = self._call(self.r.mget, names)
        strip = len(f"{RECORD}{kind}:")
        out: dict[str, Any] = {}
        for name, raw in zip(names, values, strict=True):
            if raw is not None:  # expired between SCAN and MGET
                out[name.decode()[strip:]] = json.loads(raw)
        return out

    def close(self) -> None:
        self.r.close()
