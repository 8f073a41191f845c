"""UID leases: unique among live holders, across threads and processes, on SQLite and on Redis."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox.state import open_store
from execbox.state.base import StateStore
from execbox.uids import UidLease, UidRegistry


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'uids.db'}"
        return
    url = request.getfixturevalue("redis_url")
    store = open_store(url)
    for uid in range(1000, 1000 + 256):
        store.delete_record("uid", str(uid))
    store.close()
    yield url


def _lease_many(url: str, n: int, out: queue.Queue[list[int]]) -> None:
    store = open_store(url)
    reg = UidRegistry(store, 1000, 256)
    out.put([reg.lease(60).uid for _ in range(n)])
    store.close()


def test_leases_are_unique_across_threads_and_processes(store_url: str) -> None:
    # 4 processes x 2 threads x 30 leases = 240 of 256 UIDs: a crowded range, no duplicate.
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_threads, args=(store_url, results)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [uid for _ in procs for uid in results.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert len(got) == 240 and len(set(got)) == 240
    assert all(1000 <= uid < 1256 for uid in got)


def _threads(url: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    inner: queue.Queue[list[int]] = queue.Queue()
    ts = [threading.Thread(target=_lease_many, args=(url, 30, inner)) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(inner.get() + inner.get())


def test_release_renew_and_holder(store_url: str) -> None:
    store: StateStore = open_store(store_url)
    reg = UidRegistry(store, 1000, 4)
    a = reg.lease(60)
    assert reg.holder(a.uid) == a.holder
    assert not reg.claim(a.uid, "someone-else", 60)  # held: nobody else gets it
    assert reg.renew(a, 60)  # its holder may renew it
    reg.release(UidLease(a.uid, "someone-else"))  # a stranger's release is ignored
    assert reg.holder(a.uid) == a.holder
    reg.release(a)
    assert reg.holder(a.uid) is None
    assert reg.claim(a.uid, "someone-else", 60)
    store.close()


def test_a_lease_runs_out(store_url: str) -> None:
    store = open_store(store_url)
    reg = UidRegistry(store, 1000, 1)
    first = reg.lease(0.2)
    with pytest.raises(Exception, match="no free UID"):
        reg.lease(60)
    # A crashed holder's lease expires: the UID is free again.
    deadline = time.monotonic() + 10
    while reg.holder(first.uid) is not None:
        assert time.monotonic() < deadline, "the lease never ran out"
        time.sleep(0.02)
    assert reg.lease(60).uid == first.uid
    store.close()


def test_without_a_store_leases_hold_in_this_process() -> None:
    reg = UidRegistry(None, 1000, 64)
    uids = [reg.lease(60) for _ in range(64)]
    assert len({lease.uid for lease in uids}) == 64
    reg.release(uids[0])
    assert reg.lease(60).uid == uids[0].uid


@pytest.mark.docker
def test_sessions_of_two_registries_never_share_a_uid(engine: object, tmp_path: Path) -> None:
    """Each registry keeps its own sessions' UIDs apart; the host's lease table keeps two registries apart."""
    from execbox.state.sqlite import SQLiteStateStore
    from tests.test_sessions import sessions_over

    data_dir = str(tmp_path / "host")
    stores = [SQLiteStateStore(tmp_path / f"registry-{i}.db") for i in range(2)]
    opts = {"uid_base": 250_000, "uid_count": 16, "max_per_user": 6, "data_dir": data_dir, "start_reaper": False}
    with sessions_over(engine, stores[0], **opts) as a, sessions_over(engine, stores[1], **opts) as b:  # type: ignore[arg-type]
        made = [(s, s.create("alice", "bash")) for s in (a, b) for _ in range(6)]
        uids = [s.execute(info.id, "id -u").stdout.strip() for s, info in made]
        assert len(set(uids)) == 12, uids  # 6 + 6 of 16: without the shared lease table, almost surely a clash
        first_sessions, first = made[0]
        holder = first_sessions.uids.holder(int(uids[0]))
        assert holder is not None and first.id in holder
        first_sessions.delete(first.id)
        assert first_sessions.uids.holder(int(uids[0])) is None  # released when the session ended
    for s in stores:
        s.close()
