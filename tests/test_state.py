"""State: env-var state, OUTPUT_STATE parsing, real SQLite and real Redis stores,
and stateful runs in real sandboxes (the seed's Option 1 and Option 3 flows)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox import Executor, InvalidRequestError
from execbox.engine.base import Engine
from execbox.state import StateConflictError, StateStore, extract_state, state_env
from execbox.state.redis import RedisStateStore
from execbox.state.sqlite import SQLiteStateStore


def test_state_env_gives_json_and_flat_scalars() -> None:
    env = state_env({"counter": 1, "name": "x", "ok": True, "nested": {"a": 1}, "bad key": 2}, 1000)
    assert env == {
        "EXECBOX_STATE": '{"counter":1,"name":"x","ok":true,"nested":{"a":1},"bad key":2}',
        "STATE_COUNTER": "1",
        "STATE_NAME": "x",
        "STATE_OK": "true",
    }
    with pytest.raises(InvalidRequestError) as info:
        state_env({"x": "y" * 100}, 50)
    assert info.value.field == "state"
    with pytest.raises(InvalidRequestError):
        state_env({"x": float("nan")}, 1000)


def test_extract_state_last_line_wins_and_bad_json_leaves_output() -> None:
    out = 'a\nOUTPUT_STATE:{"n":1}\nb\nOUTPUT_STATE:{"n":2}\n'
    assert extract_state(out) == ("a\nb\n", {"n": 2}, None, True)
    bad = 'a\nOUTPUT_STATE:{"n":\n'
    clean, state, err, found = extract_state(bad)
    assert (clean, state, found) == (bad, None, True) and err is not None and "invalid JSON" in err
    assert extract_state("no state here\n") == ("no state here\n", None, None, False)
    assert extract_state("x OUTPUT_STATE:{}\n") == ("x OUTPUT_STATE:{}\n", None, None, False)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    s: StateStore
    if request.param == "sqlite":
        s = SQLiteStateStore(tmp_path / "state.db")
    else:
        s = RedisStateStore(request.getfixturevalue("redis_url"))
    yield s
    s.close()


def _ns() -> str:
    return "t" + uuid.uuid4().hex[:8]


def test_store_roundtrip_versions_conflicts_and_isolation(store: StateStore) -> None:
    tenant = _ns()
    assert store.get(tenant, "u1") is None
    assert store.put(tenant, "u1", {"counter": 1}) == 1
    assert store.put(tenant, "u1", {"counter": 2}, expected_version=1) == 2
    with pytest.raises(StateConflictError):
        store.put(tenant, "u1", {"counter": 99}, expected_version=1)
    got = store.get(tenant, "u1")
    assert got is not None and got.value == {"counter": 2} and got.version == 2
    assert store.get(tenant, "u2") is None and store.get(_ns(), "u1") is None  # users and tenants isolated
    assert store.delete(tenant, "u1") and store.get(tenant, "u1") is None


def test_store_size_cap_and_ttl(store: StateStore) -> None:
    tenant = _ns()
    store.max_bytes = 100
    with pytest.raises(InvalidRequestError):
        store.put(tenant, "u", {"x": "y" * 200})
    store.ttl = 0.3
    store.put(tenant, "u", {"x": 1})
    assert store.get(tenant, "u") is not None
    time.sleep(0.6)
    assert store.get(tenant, "u") is None


def test_store_lock_serializes_and_lease_expires(store: StateStore) -> None:
    tenant = _ns()
    order: list[str] = []
    with store.lock(tenant, "u", lease=10, wait=1):
        t = threading.Thread(target=lambda: (store.lock(tenant, "u", lease=10, wait=5).__enter__(), order.append("2")))
        t.start()
        time.sleep(0.3)
        order.append("1")
    t.join()
    assert order == ["1", "2"]
    # A crashed holder (never released) blocks only until its lease ends.
    assert store._try_lock(tenant, "v", "crashed", lease=0.3)
    with store.lock(tenant, "v", lease=5, wait=5):
        pass


# -- stateful runs in real sandboxes ------------------------------------------------------

COUNTER_JS = """
const counter = parseInt(process.env.STATE_COUNTER || '0') + 1;
console.log('Counter:', counter);
console.log('OUTPUT_STATE:' + JSON.stringify({ counter }));
"""


@pytest.mark.docker
def test_seed_option1_env_state_round_trip(executor: Executor) -> None:
    user_state = {"counter": 0}
    for expected in (1, 2):
        r = executor.execute(COUNTER_JS, state=user_state)
        assert r.stdout == f"Counter: {expected}\n"  # the state line is not in the output
        assert r.state == {"counter": expected}
        user_state = r.state


@pytest.mark.docker
def test_state_helpers_in_both_languages(executor: Executor) -> None:
    py = executor.execute(
        "from execbox_state import load_state, save_state\ns = load_state({'n': 0})\ns['n'] += 1\nsave_state(s)",
        language="python",
        state={"n": 41},
    )
    assert py.state == {"n": 42} and py.stdout == ""
    js = executor.execute(
        "const { loadState, saveState } = require('execbox-state');\n"
        "const s = loadState({n: 0}); s.n += 1; saveState(s)"
    )
    assert js.state == {"n": 1}
    bad = executor.execute("console.log('OUTPUT_STATE:{broken')")
    assert bad.state is None and bad.state_error and bad.stdout == "OUTPUT_STATE:{broken\n"


@pytest.fixture
def stateful(request: pytest.FixtureRequest, engine: Engine, tmp_path: Path) -> Iterator[Executor]:
    store: StateStore = (
        RedisStateStore(request.getfixturevalue("redis_url"))
        if getattr(request, "param", "sqlite") == "redis"
        else SQLiteStateStore(tmp_path / "s.db")
    )
    ex = Executor(engine=engine, state_store=store, pool=True, pool_min_ready=1)
    yield ex
    ex.close()
    store.close()


@pytest.mark.docker
@pytest.mark.parametrize("stateful", ["sqlite", "redis"], indirect=True)
def test_seed_option3_store_counter_runs_twice(stateful: Executor) -> None:
    tenant = _ns()
    outs = [stateful.execute(COUNTER_JS, user_id="user-1", persist_state=True, tenant=tenant).stdout for _ in range(2)]
    assert outs == ["Counter: 1\n", "Counter: 2\n"]
    # Another user and another tenant start from nothing.
    assert stateful.execute(COUNTER_JS, user_id="user-2", persist_state=True, tenant=tenant).stdout == "Counter: 1\n"
    other = stateful.execute(COUNTER_JS, user_id="user-1", persist_state=True, tenant=_ns())
    assert other.stdout == "Counter: 1\n"
    assert stateful.state_store is not None
    stored = stateful.state_store.get(tenant, "user-1")
    assert stored is not None and stored.value == {"counter": 2}


@pytest.mark.docker
@pytest.mark.parametrize("stateful", ["sqlite", "redis"], indirect=True)
def test_failed_runs_do_not_save(stateful: Executor) -> None:
    tenant = _ns()
    ok = stateful.execute(COUNTER_JS, user_id="u", persist_state=True, tenant=tenant)
    assert ok.state_saved
    fail = stateful.execute(
        "console.log('OUTPUT_STATE:' + JSON.stringify({counter: 100})); process.exit(1)",
        user_id="u",
        persist_state=True,
        tenant=tenant,
    )
    timeout = stateful.execute(
        "console.log('OUTPUT_STATE:' + JSON.stringify({counter: 200})); while (true) {}",
        user_id="u",
        persist_state=True,
        tenant=tenant,
        timeout=0.5,
    )
    assert fail.state == {"counter": 100} and not fail.state_saved
    assert timeout.timed_out and not timeout.state_saved
    assert stateful.execute(COUNTER_JS, user_id="u", persist_state=True, tenant=tenant).stdout == "Counter: 2\n"


@pytest.mark.docker
@pytest.mark.parametrize("stateful", ["redis"], indirect=True)
def test_twenty_concurrent_increments_lose_nothing(stateful: Executor) -> None:
    tenant = _ns()
    results = []
    lock = threading.Lock()

    def one() -> None:
        r = stateful.execute(COUNTER_JS, user_id="racer", persist_state=True, tenant=tenant, timeout=20)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.state_saved for r in results)
    assert sorted(r.stdout for r in results) == sorted(f"Counter: {i}\n" for i in range(1, 21))
    assert stateful.state_store is not None
    stored = stateful.state_store.get(tenant, "racer")
    assert stored is not None and stored.value == {"counter": 20}


@pytest.mark.docker
@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 200, "..", "a:b", " a"])
def test_bad_user_ids_are_refused(stateful: Executor, bad: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        stateful.execute(COUNTER_JS, user_id=bad, persist_state=True)
    assert info.value.field == "user_id"


def test_persist_state_needs_user_and_store(engine: Engine) -> None:
    with Executor(engine=engine, pool=False, sweep_on_start=False) as ex:
        with pytest.raises(InvalidRequestError) as info:
            ex.execute("1", persist_state=True)
        assert info.value.field == "user_id"
        with pytest.raises(InvalidRequestError) as info:
            ex.execute("1", persist_state=True, user_id="u")
        assert info.value.field == "persist_state"
