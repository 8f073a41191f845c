"""Sessions with egress: a policy and secrets per session, the tenant's ceiling, a network log per
call, REPLs (python, javascript) and fresh runs that keep their egress for every call.

A real proxy, real session containers, a real upstream on loopback mapped to test hostnames.
One proxy per process: the Egress is module-scoped (restarts: test_sessions_egress_api.py)."""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox import InvalidRequestError, Sessions
from execbox.egress import Egress, EgressSettings, NetworkPolicy
from execbox.engine.base import Engine
from execbox.sessions import RECORD_KIND
from execbox.state import StateStore
from execbox.state.sqlite import SQLiteStateStore

from .egress_support import OTHER_HOST, PLAIN_HOST, Upstream, start_upstream
from .test_sessions import end_all, registry_containers

pytestmark = pytest.mark.docker

SECRET = "sk_live_session_secret_42"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def egress_settings(upstream: Upstream, port: int | None = None, name: str | None = None) -> EgressSettings:
    target = f"127.0.0.1:{upstream.port}"
    return EgressSettings(
        host_map={PLAIN_HOST: target, OTHER_HOST: target},
        network_name=name or f"execbox-test-sesegress-{secrets.token_hex(4)}",
        proxy_port=port or free_port(),
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = start_upstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StateStore]:
    st = SQLiteStateStore(tmp_path_factory.mktemp("sesegress") / "registry.db")
    yield st
    st.close()


@pytest.fixture(scope="module")
def sessions(engine: Engine, store: StateStore, upstream: Upstream) -> Iterator[Sessions]:
    egress = Egress(engine, egress_settings(upstream))
    s = Sessions(engine, store, egress=egress)
    try:
        yield s
    finally:
        s.close()
        left = end_all(engine, store)
        egress.close()  # after the sessions: the network goes with its last sandbox
        assert not left, f"sessions leaked {len(left)} containers"
        assert not [n for n in engine.list_resources("execbox.kind=egress-network") if n.id == egress.network]


FETCH = """
import json, os, urllib.request, urllib.error
def get(url, headers={}):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get('x-execbox-denied')
"""


def test_policy_secrets_and_a_network_log_per_call(sessions: Sessions, store: StateStore, upstream: Upstream) -> None:
    s = sessions.create(
        "alice",
        "python",
        network={"mode": "proxy", "allow": [PLAIN_HOST]},
        secrets={"STRIPE_KEY": {"value": SECRET, "hosts": [PLAIN_HOST]}},
    )
    assert s.network == "proxy" and s.network_policy is not None and s.network_policy.allow[0].host == PLAIN_HOST
    assert sessions.execute(s.id, FETCH).exit_code == 0  # the REPL keeps get() for later calls
    before = len(upstream.hits)
    r = sessions.execute(
        s.id,
        "print(json.dumps([get('http://plain.example.test/a', {'Authorization': 'Bearer ' + os.environ['STRIPE_KEY']}),"
        " get('http://other.example.test/b')]))",
    )
    assert r.exit_code == 0, r.stderr
    (ok, echoed), (denied, reason) = json.loads(r.stdout)
    assert ok == 200 and denied == 403 and reason
    # The upstream got the real value; the session only ever held a placeholder.
    assert upstream.hits[before]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert echoed["headers"]["authorization"].startswith("Bearer execbox-secret-")
    assert len(upstream.hits) == before + 1  # the denied request never left the proxy
    assert [(e.url, e.decision) for e in r.network_log] == [
        ("http://plain.example.test/a", "allowed"),
        ("http://other.example.test/b", "denied"),
    ]
    assert r.network_log[0].request_headers.get("authorization") == "[REDACTED]"
    assert SECRET not in r.model_dump_json()
    # Each call sees its own requests only.
    second = sessions.execute(s.id, "print(get('http://plain.example.test/c')[0])")
    assert second.stdout == "200\n" and [e.url for e in second.network_log] == ["http://plain.example.test/c"]
    assert sessions.execute(s.id, "print(os.environ['STRIPE_KEY'][:15])").network_log == []
    leak = sessions.execute(s.id, "print(open('/proc/self/environ','rb').read().count(b'sk_live'))")
    assert leak.stdout == "0\n"
    # The registry keeps what re-establishes the grant (so it must be private); the public view does not.
    record = store.get_record(RECORD_KIND, f"default/{s.id}")
    assert record["egress"]["secrets"][0]["value"] == SECRET and record["egress"]["password"]
    assert SECRET not in sessions.get(s.id).model_dump_json() and "password" not in sessions.get(s.id).model_dump_json()
    sessions.delete(s.id)
    assert not sessions.egress.serves(s.id)  # the grant ended with the session


def test_javascript_repl_and_fresh_python_runs_keep_their_egress(sessions: Sessions) -> None:
    js = sessions.create("bob", "javascript", network={"mode": "proxy", "allow": [PLAIN_HOST]})
    r = sessions.execute(
        js.id, "await fetch('http://plain.example.test/js').then((r) => r.json()).then((j) => console.log(j.path))"
    )
    assert (r.exit_code, r.stdout) == (0, "/js\n"), r.stderr
    # fetch tunnels through the proxy, which refuses the tunnel to a denied host.
    again = sessions.execute(
        js.id, "await fetch('http://other.example.test/x').then((r) => console.log(r.status), () => console.log('no'))"
    )
    assert again.stdout == "no\n" and [e.decision for e in again.network_log] == ["denied"], again.stderr
    py = sessions.create("bob", "python", network="proxy", repl=False)  # no allow rule: everything denied
    run = sessions.execute(py.id, FETCH + "print(get('http://plain.example.test/')[0])")
    assert run.stdout == "403\n" and [e.rule for e in run.network_log] == ["default-deny"]
    for s in (js, py):
        sessions.delete(s.id)


def test_a_session_without_network_reaches_nothing(sessions: Sessions) -> None:
    s = sessions.create("carol", "python")
    assert s.network == "none" and s.network_policy is None
    r = sessions.execute(
        s.id,
        "import urllib.request\ntry:\n urllib.request.urlopen('http://plain.example.test/', timeout=3)\n"
        " print('reached')\nexcept Exception:\n print('failed')",
    )
    assert (r.stdout, r.network_log) == ("failed\n", [])
    sessions.delete(s.id)


def test_the_tenants_ceiling_caps_the_sessions_policy(sessions: Sessions) -> None:
    s = sessions.create(
        "dave",
        "python",
        network={"mode": "proxy", "allow": [PLAIN_HOST, OTHER_HOST]},
        network_ceiling=NetworkPolicy(mode="proxy", allow=[PLAIN_HOST]),
        tenant="acme",
    )
    r = sessions.execute(
        s.id, FETCH + "print(get('http://plain.example.test/')[0], get('http://other.example.test/')[0])", tenant="acme"
    )
    assert r.stdout == "200 403\n", r.stderr
    assert [e.decision for e in r.network_log] == ["allowed", "denied"]
    sessions.delete(s.id, tenant="acme")


def test_bad_network_requests_make_nothing(engine: Engine, sessions: Sessions, tmp_path: Path) -> None:
    key = {"value": SECRET, "hosts": [PLAIN_HOST]}
    cases = [
        ({"network": "bridge"}, "network"),
        ({"network": {"mode": "proxy", "allow": ["no host!"]}}, "network.allow.0"),
        ({"secrets": {"K": key}}, "secrets"),  # secrets without a proxy
        ({"network": "proxy", "secrets": {"1K": key}}, "secrets.1K"),
        ({"network": "proxy", "secrets": {"K": {"value": "short", "hosts": [PLAIN_HOST]}}}, "secrets.K.value"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidRequestError) as info:
            sessions.create("erin", "python", **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field, kwargs
    assert registry_containers(engine, sessions.registry_id) == []
