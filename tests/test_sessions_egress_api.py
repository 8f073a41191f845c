"""Sessions with egress through the HTTP API and the client (the tenant's permission and ceiling),
the CLI's network flags, and adoption: a new process (a new ``Sessions`` and proxy over the same
registry, or the next CLI command) re-establishes a session's grant, or ends the session when it
cannot. Each test starts and stops its own proxy (one per process)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execbox import Client, SessionNotFoundError, Sessions
from execbox.egress import Egress
from execbox.engine.base import Engine
from execbox.state import open_store
from execbox.state.sqlite import SQLiteStateStore

from .egress_support import OTHER_HOST, PLAIN_HOST, Upstream, start_upstream
from .serverkit import KEY_A, TENANTS_TOML, hash_key, live_server, settings, write_tenants
from .test_sessions import end_all
from .test_sessions_egress import FETCH, SECRET, egress_settings, free_port

pytestmark = pytest.mark.docker

KEY_NET = "test-key-network-0123456789"
TENANTS = (
    TENANTS_TOML
    + f"""
[tenants.netco]
api_keys = ["{hash_key(KEY_NET)}"]
network = true

[tenants.netco.egress]
mode = "proxy"
allow = ["{PLAIN_HOST}"]
"""
)
CALL = (
    FETCH + "print(json.dumps([get('http://plain.example.test/p', {'Authorization': 'Bearer ' + os.environ['K']})[0],"
    " get('http://other.example.test/o')[0]]))"
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = start_upstream()
    yield up
    up.close()


def _chains() -> str:
    return subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True, check=True).stdout


def test_http_api_and_client_with_the_tenants_ceiling(engine: Engine, tmp_path: Path, upstream: Upstream) -> None:
    url = f"sqlite:///{tmp_path}/registry.db"
    options = {"session_store_url": url, "session_reap_interval": 0.2}
    egress = egress_settings(upstream)
    try:
        with live_server(
            engine, settings(write_tenants(tmp_path, TENANTS), **options), pool=False, egress=egress
        ) as server:
            with server.client(KEY_A) as alpha:  # alpha may not use the network at all
                body = {"user_id": "u", "network": {"mode": "proxy", "allow": [PLAIN_HOST]}}
                refused = alpha.post("/v1/sessions", json=body)
                assert refused.status_code == 403 and refused.json()["error"]["field"] == "network.mode"
            with Client(server.url, api_key=KEY_NET, trust_env=False) as client:
                info = client.create_session(
                    "u1",
                    "python",
                    network={"mode": "proxy", "allow": [PLAIN_HOST, OTHER_HOST]},
                    secrets={"K": {"value": SECRET, "hosts": [PLAIN_HOST]}},
                )
                assert info.network == "proxy"
                before = len(upstream.hits)
                r = client.session_execute(info.id, CALL)
                # The tenant's ceiling allows plain only, whatever the session's own policy says.
                assert json.loads(r.stdout) == [200, 403], r.stderr
                assert [e.decision for e in r.network_log] == ["allowed", "denied"]
                assert upstream.hits[before]["headers"]["authorization"] == f"Bearer {SECRET}"
                assert client.session_execute(info.id, "print(1)").network_log == []
                client.delete_session(info.id)
    finally:
        store = open_store(url)
        try:
            assert not end_all(engine, store)
        finally:
            store.close()


def test_a_new_process_re_establishes_the_grant_or_ends_the_session(
    engine: Engine, tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteStateStore(tmp_path / "registry.db")
    first = egress_settings(upstream)
    try:
        egress = Egress(engine, first)
        sessions = Sessions(engine, store, egress=egress, start_reaper=False)
        s = sessions.create(
            "alice",
            "python",
            network={"mode": "proxy", "allow": [PLAIN_HOST]},
            secrets={"K": {"value": SECRET, "hosts": [PLAIN_HOST]}},
        )
        assert sessions.execute(s.id, "x = 1\n" + CALL).stdout == "[200, 403]\n"
        net = egress._network.info
        bridge_chain = f"-i {net.bridge} -j EXECBOX-"
        sessions.close()
        egress.close()  # "the service stops": its proxy goes, the session lives on
        # Its network stays (the session is on it), and so do the firewall rules that guard it.
        assert [n for n in engine.list_resources("execbox.kind=egress-network") if n.id == net.id]
        assert bridge_chain in _chains()

        # The next process, with the same network and port: the grant is re-established from the registry.
        egress = Egress(engine, first)
        sessions = Sessions(engine, store, egress=egress, start_reaper=False)
        assert egress.serves(s.id)
        before = len(upstream.hits)
        r = sessions.execute(s.id, "print(x)\n" + CALL)
        assert r.stdout == "1\n[200, 403]\n", r.stderr
        assert upstream.hits[before]["headers"]["authorization"] == f"Bearer {SECRET}"
        assert [e.decision for e in r.network_log] == ["allowed", "denied"]
        sessions.close()
        egress.close()

        # A process whose proxy is elsewhere cannot serve it: the session ends, saying why.
        moved = first.model_copy(update={"proxy_port": free_port()})
        egress = Egress(engine, moved)
        with caplog.at_level(logging.INFO, logger="execbox.sessions"):
            sessions = Sessions(engine, store, egress=egress, start_reaper=False)
        assert any("egress grant cannot be re-established" in m for m in caplog.messages), caplog.messages
        with pytest.raises(SessionNotFoundError):
            sessions.get(s.id)
        sessions.close()
        egress.close()
        # The last sandbox gone, the network and its rules went too.
        assert not [n for n in engine.list_resources("execbox.kind=egress-network") if n.id == net.id]
        assert bridge_chain not in _chains()
    finally:
        assert not end_all(engine, store)
        store.close()


def _cli(tmp_path: Path, env: dict[str, str], *args: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "execbox.cli", "session", *args, "--store", f"sqlite:///{tmp_path}/cli.db", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout) if args[0] != "rm" else proc.stdout


def test_cli_network_flags_and_one_process_per_command(engine: Engine, tmp_path: Path, upstream: Upstream) -> None:
    egress = egress_settings(upstream)
    env = {
        **os.environ,
        "EXECBOX_PROXY_HOST_MAP": json.dumps(egress.host_map),
        "EXECBOX_EGRESS_NETWORK": str(egress.network_name),
        "EXECBOX_EGRESS_PROXY_PORT": str(egress.proxy_port),
        "EXECBOX_LOG_LEVEL": "warning",
        "K": SECRET,
    }
    try:
        info = _cli(tmp_path, env, "new", "--allow", PLAIN_HOST, "--secret", f"K@{PLAIN_HOST}")
        assert info["network"] == "proxy" and info["network_policy"]["allow"][0]["host"] == PLAIN_HOST
        before = len(upstream.hits)
        # Each command is a new process with a new proxy: it re-establishes the session's grant.
        result = _cli(tmp_path, {**env, "K": "not-the-secret"}, "exec", info["id"], "-c", CALL)
        assert json.loads(result["stdout"]) == [200, 403], result["stderr"]
        assert [e["decision"] for e in result["network_log"]] == ["allowed", "denied"]
        assert upstream.hits[before]["headers"]["authorization"] == f"Bearer {SECRET}"
        _cli(tmp_path, env, "rm", info["id"])
    finally:
        store = SQLiteStateStore(tmp_path / "cli.db")
        try:
            assert not end_all(engine, store)
        finally:
            store.close()
