"""The state store's small records (the session registry), on real SQLite and real Redis."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox.state import StateStore
from execbox.state.keys import record_key, record_pattern
from execbox.state.redis import RedisStateStore
from execbox.state.sqlite import SQLiteStateStore


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    s: StateStore
    if request.param == "sqlite":
        s = SQLiteStateStore(tmp_path / "records.db")
    else:
        s = RedisStateStore(request.getfixturevalue("redis_url"))
    yield s
    s.close()


def _kind() -> str:
    return "test" + uuid.uuid4().hex[:8]  # a kind of its own: the Redis server may be shared


def test_records_roundtrip_and_modes(store: StateStore) -> None:
    kind = _kind()
    assert store.get_record(kind, "a") is None
    assert not store.put_record(kind, "a", {"v": 1}, 60, "update")  # nothing to update
    assert store.get_record(kind, "a") is None
    assert store.put_record(kind, "a", {"v": 1}, 60, "create")
    assert not store.put_record(kind, "a", {"v": 2}, 60, "create")  # exists
    assert store.get_record(kind, "a") == {"v": 1}
    assert store.put_record(kind, "a", {"v": 3}, 60, "update")
    assert store.put_record(kind, "a", {"v": 4}, 60)
    assert store.get_record(kind, "a") == {"v": 4}
    assert store.delete_record(kind, "a") and not store.delete_record(kind, "a")
    assert store.get_record(kind, "a") is None


def test_list_records_by_prefix_with_glob_characters(store: StateStore) -> None:
    kind = _kind()
    store.put_record(kind, "t1/a", {"n": 1}, 60)
    store.put_record(kind, "t1/b", {"n": 2}, 60)
    store.put_record(kind, "t2/a", {"n": 3}, 60)
    store.put_record(kind, "t*/x", {"n": 4}, 60)
    store.put_record(_kind(), "t1/c", {"n": 5}, 60)  # another kind
    assert store.list_records(kind, "t1/") == {"t1/a": {"n": 1}, "t1/b": {"n": 2}}
    assert store.list_records(kind, "t*") == {"t*/x": {"n": 4}}  # '*' is a character, not a pattern
    assert len(store.list_records(kind)) == 4


def test_records_expire(store: StateStore) -> None:
    kind = _kind()
    store.put_record(kind, "short", {"n": 1}, 0.3)
    store.put_record(kind, "long", {"n": 2}, 60)
    deadline = time.monotonic() + 10
    while store.get_record(kind, "short") is not None:
        assert time.monotonic() < deadline, "the record did not expire"
        time.sleep(0.05)
    assert store.list_records(kind) == {"long": {"n": 2}}
    assert store.put_record(kind, "short", {"n": 3}, 60, "create")  # an expired record counts as absent
    assert not store.put_record(kind, "gone", {"n": 0}, 60, "update")


def test_create_is_atomic_across_threads(store: StateStore) -> None:
    kind = _kind()
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        barrier.wait()
        if store.put_record(kind, "only", {"winner": i}, 60, "create"):
            wins.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1 and store.get_record(kind, "only") == {"winner": wins[0]}


def test_records_are_size_capped(store: StateStore) -> None:
    with pytest.raises(ValueError):
        store.put_record(_kind(), "big", {"x": "y" * (100 << 10)}, 60)


def test_redis_keys_are_prefixed_and_expire(redis_url: str) -> None:
    store = RedisStateStore(redis_url)
    try:
        kind = _kind()
        store.put_record(kind, "k", {"n": 1}, 30)
        key = record_key(kind, "k")
        assert key.startswith("execbox:rec:")
        assert 0 < store.r.pttl(key) <= 30_000  # every key has a TTL
        assert record_pattern("k", "a*[?]\\") == "execbox:rec:k:a\\*\\[\\?\\]\\\\*"
    finally:
        store.close()
