"""Egress through the Executor: `network=` and `secrets=` on a run, `result.network_log`.

A real proxy, real sandboxes, a real upstream on loopback mapped to a test hostname."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from execbox import Executor, InvalidRequestError
from execbox.engine.base import Engine
from tests.conftest import ours

from .egress_support import OTHER_HOST, PLAIN_HOST, Upstream, start_upstream

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = start_upstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def ex(engine: Engine, upstream: Upstream) -> Iterator[Executor]:
    target = f"127.0.0.1:{upstream.port}"
    executor = Executor(engine=engine, pool=False, proxy_host_map={PLAIN_HOST: target, OTHER_HOST: target})
    yield executor
    executor.close()
    assert ours(engine) == []


FETCH_PY = """
import json, os, urllib.request, urllib.error
def get(url, headers={}):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get('x-execbox-denied')
print(json.dumps([
    get('http://plain.example.test/ok', {'Authorization': 'Bearer ' + os.environ['STRIPE_KEY']}),
    get('http://other.example.test/nope'),
]))
"""


def test_policy_secrets_and_network_log(ex: Executor, upstream: Upstream) -> None:
    before = len(upstream.hits)
    r = ex.execute(
        FETCH_PY,
        language="python",
        network={"mode": "proxy", "allow": [PLAIN_HOST]},
        secrets={"STRIPE_KEY": {"value": "sk_live_real_secret_123", "hosts": [PLAIN_HOST]}},
    )
    assert r.exit_code == 0, r.stderr
    (ok_status, echoed), (denied_status, reason) = json.loads(r.stdout)
    assert ok_status == 200 and denied_status == 403 and reason
    # The upstream got the real secret; the sandbox only ever saw a placeholder.
    assert "sk_live" not in r.stdout  # the echo of the real value was scrubbed before it reached the sandbox
    assert echoed["headers"]["authorization"].startswith("Bearer execbox-secret-")
    assert upstream.hits[before]["headers"]["authorization"] == "Bearer sk_live_real_secret_123"
    assert len(upstream.hits) == before + 1  # the denied request never left the proxy
    log = r.network_log
    assert [(e.method, e.decision) for e in log] == [("GET", "allowed"), ("GET", "denied")]
    assert log[0].url == "http://plain.example.test/ok" and log[0].status == 200
    assert log[0].request_headers.get("authorization") == "[REDACTED]"
    assert "sk_live_real_secret_123" not in r.model_dump_json()


def test_node_fetch_goes_through_the_proxy(ex: Executor) -> None:
    r = ex.execute(
        "fetch('http://plain.example.test/js').then(r => r.json()).then(j => console.log(j.path))",
        network={"mode": "proxy", "allow": [PLAIN_HOST]},
    )
    assert (r.stdout, r.exit_code) == ("/js\n", 0), r.stderr
    assert [e.decision for e in r.network_log] == ["allowed"]


def test_default_is_no_network_even_with_egress_running(ex: Executor) -> None:
    r = ex.execute(
        "import urllib.request\ntry:\n urllib.request.urlopen('http://plain.example.test/', timeout=3)\n"
        " print('reached')\nexcept Exception as e:\n print('failed')",
        language="python",
    )
    assert r.stdout == "failed\n" and r.network_log == []


def test_secrets_need_proxy_mode_and_distinct_names(ex: Executor) -> None:
    with pytest.raises(InvalidRequestError) as info:
        ex.execute("1", secrets={"K": {"value": "a-long-secret-value", "hosts": [PLAIN_HOST]}})
    assert info.value.field == "secrets"
    with pytest.raises(InvalidRequestError) as info:
        ex.execute(
            "1",
            env={"K": "x"},
            network={"mode": "proxy", "allow": [PLAIN_HOST]},
            secrets={"K": {"value": "a-long-secret-value", "hosts": [PLAIN_HOST]}},
        )
    assert info.value.field == "secrets.K"


def test_tenant_ceiling_caps_the_runs_policy(ex: Executor, upstream: Upstream) -> None:
    from execbox import ExecutionRequest
    from execbox.egress import NetworkPolicy

    req = ExecutionRequest(
        code=(
            "import urllib.request, urllib.error\n"
            "for h in ('plain', 'other'):\n"
            "    try:\n"
            "        print(h, urllib.request.urlopen(f'http://{h}.example.test/c', timeout=10).status)\n"
            "    except urllib.error.HTTPError as e:\n"
            "        print(h, e.code)\n"
        ),
        language="python",
        network={"mode": "proxy", "allow": [PLAIN_HOST, OTHER_HOST]},
    )
    r = ex.run(req, network_ceiling=NetworkPolicy(mode="proxy", allow=[PLAIN_HOST]))
    assert r.stdout == "plain 200\nother 403\n", r.stderr
    assert [e.decision for e in r.network_log] == ["allowed", "denied"]


def test_dns_lookups_give_up_quickly(ex: Executor) -> None:
    # Names are resolved by the proxy; a lookup in the sandbox must fail, and not hang
    # (it used to wait 10 s per lookup on the engine's embedded DNS: 3 would time out).
    r = ex.execute(
        "import socket\nfor i in range(3):\n    try:\n        socket.getaddrinfo('plain.example.test', 80)\n"
        "        print('resolved')\n    except socket.gaierror:\n        print('failed')",
        language="python",
        network={"mode": "proxy", "allow": [PLAIN_HOST]},
        timeout=8,
    )
    assert not r.timed_out and r.stdout == "failed\nfailed\nfailed\n", r


REFUSALS_PY = r"""
import json, socket, time
out = {}
t = time.monotonic()
try:
    socket.create_connection(("denied.example.test", 443), timeout=8)
    out["denied"] = "connected"
except OSError as e:
    out["denied"] = str(e)
out["denied_s"] = time.monotonic() - t
t = time.monotonic()
s = socket.create_connection(("plain.example.test", 80), timeout=8)
s.sendall(bytes.fromhex("0000000804d2162f"))  # a PostgreSQL SSLRequest: neither HTTP nor TLS
s.settimeout(8)
try:
    out["raw"] = repr(s.recv(16))
except OSError as e:
    out["raw"] = type(e).__name__
out["raw_s"] = time.monotonic() - t
print(json.dumps(out))
"""


def test_a_denied_tunnel_is_refused_when_asked_for_and_non_http_ends_at_once(ex: Executor) -> None:
    r = ex.execute(REFUSALS_PY, language="python", timeout=30, network={"mode": "proxy", "allow": [PLAIN_HOST]})
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    # Refused at CONNECT, with the policy's reason in the exception (not a tunnel that hangs).
    assert "403" in out["denied"] and "denied.example.test:443 is not allowed by the policy" in out["denied"]
    # Bytes that are neither HTTP nor TLS: the tunnel is closed (EOF), not left to the client's 8 s timeout.
    assert out["raw"] in ("b''", "ConnectionResetError"), out
    assert out["denied_s"] < 8 and out["raw_s"] < 8  # bounds, not timings: the old hang hit the 8 s timeout
    log = [(e.method, e.url, e.decision, e.rule) for e in r.network_log]
    assert log == [
        ("CONNECT", "denied.example.test:443", "denied", "default-deny"),
        ("TCP", "plain.example.test:80", "denied", "not-http"),
    ]


def test_node_gets_the_refusal_reason_at_connect(ex: Executor) -> None:
    r = ex.execute(
        "require('https').get('https://denied.example.test/x', () => console.log('reached'))"
        ".on('error', (e) => console.log(e.code, e.message))",
        network={"mode": "proxy", "allow": [PLAIN_HOST]},
    )
    assert r.stdout.startswith("EEGRESS egress proxy refused denied.example.test:443: HTTP/1.1 403"), r.stdout
    assert "(denied.example.test:443 is not allowed by the policy)" in r.stdout
    assert [(e.method, e.decision) for e in r.network_log] == [("CONNECT", "denied")]
