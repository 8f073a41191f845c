"""Sessions through the HTTP API: a real uvicorn on loopback, the real Docker Engine, and the
registry in a store of the test's own. Also the client's and the CLI's session commands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from execbox import Client, NotFoundError, QuotaExceededError
from execbox.cli import main as cli_main
from execbox.engine.base import Engine
from execbox.state import open_store

from .serverkit import KEY_A, KEY_B, KEY_PY, LiveServer, live_server, settings, write_tenants
from .test_sessions import end_all

pytestmark = pytest.mark.docker


@contextmanager
def session_server(engine: Engine, tmp_path: Path, end: bool = True, **overrides: Any) -> Iterator[LiveServer]:
    """A live service whose session registry is this test's own; all its sessions end afterwards
    (or, with ``end=False`` and no error, live on for the next service)."""
    url = f"sqlite:///{tmp_path}/registry.db"
    options = {"session_store_url": url, "session_reap_interval": 0.2, **overrides}
    ok = False
    try:
        with live_server(engine, settings(write_tenants(tmp_path), **options), pool=False) as server:
            yield server
        ok = True
    finally:
        if not (ok and not end):
            store = open_store(url)
            try:
                left = end_all(engine, store)
            finally:
                store.close()
            assert not left, f"the service leaked {len(left)} session containers"


def _create(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/sessions", json={"user_id": "u1", "language": "python", **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_session_endpoints_end_to_end(engine: Engine, tmp_path: Path) -> None:
    with session_server(engine, tmp_path) as server, server.client() as http:
        s = _create(http, idle_timeout=300, max_lifetime=600)
        assert s["id"].startswith("ses_") and s["repl"] and s["status"] == "ready" and "token" not in s
        assert s["idle_timeout"] == 300 and s["max_lifetime"] == 600
        first = http.post(f"/v1/sessions/{s['id']}/execute", json={"code": "x = 41"})
        assert first.status_code == 200 and first.json()["stdout"] == ""
        second = http.post(f"/v1/sessions/{s['id']}/execute", json={"code": "print(x + 1)"}).json()
        assert (second["stdout"], second["exit_code"], second["call"]) == ("42\n", 0, 2)
        body = {"code": "import os\nos.environ['K']", "env": {"K": "v"}}
        env = http.post(f"/v1/sessions/{s['id']}/execute", json=body)
        assert env.json()["stdout"] == "'v'\n"
        slow = http.post(f"/v1/sessions/{s['id']}/execute", json={"code": "while True: pass", "timeout": 1}).json()
        assert slow["timed_out"] and not slow["session_ended"]
        listed = http.get("/v1/sessions").json()["sessions"]
        assert [x["id"] for x in listed] == [s["id"]] and listed[0]["calls"] == 4
        assert http.get(f"/v1/sessions/{s['id']}").json()["user_id"] == "u1"
        deleted = http.delete(f"/v1/sessions/{s['id']}")
        assert deleted.status_code == 204
        gone = http.post(f"/v1/sessions/{s['id']}/execute", json={"code": "print(x)"})
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found"
        assert http.delete(f"/v1/sessions/{s['id']}").status_code == 404
        assert http.get("/v1/sessions").json() == {"sessions": []}


def test_another_tenant_gets_404(engine: Engine, tmp_path: Path) -> None:
    with session_server(engine, tmp_path) as server, server.client(KEY_A) as alpha, server.client(KEY_B) as bravo:
        s = _create(alpha)
        alpha.post(f"/v1/sessions/{s['id']}/execute", json={"code": "secret = 1"})
        for response in (
            bravo.get(f"/v1/sessions/{s['id']}"),
            bravo.post(f"/v1/sessions/{s['id']}/execute", json={"code": "print(secret)"}),
            bravo.delete(f"/v1/sessions/{s['id']}"),
        ):
            assert response.status_code == 404, response.text
            assert response.json()["error"]["type"] == "not_found"
        assert bravo.get("/v1/sessions").json() == {"sessions": []}
        unknown = alpha.get("/v1/sessions/ses_000000000000000000000000")
        assert unknown.status_code == 404  # the same answer as for another tenant's
        after = alpha.post(f"/v1/sessions/{s['id']}/execute", json={"code": "print(secret)"})
        assert after.json()["stdout"] == "1\n"


def test_caps_give_429_with_retry_after(engine: Engine, tmp_path: Path) -> None:
    overrides = {"session_max_per_user": 1, "session_max_total": 2}
    with session_server(engine, tmp_path, **overrides) as server, server.client() as http:
        _create(http, language="bash")
        again = http.post("/v1/sessions", json={"user_id": "u1", "language": "bash"})
        assert again.status_code == 429 and again.json()["error"]["type"] == "quota_exceeded"
        assert int(again.headers["retry-after"]) >= 1
        _create(http, user_id="u2", language="bash")
        total = http.post("/v1/sessions", json={"user_id": "u3", "language": "bash"})
        assert total.status_code == 429 and "in all" in total.json()["error"]["message"]
        with Client(server.url, api_key=KEY_A, trust_env=False) as client, pytest.raises(QuotaExceededError):
            client.create_session("u3", "bash")


def test_policy_validation_and_auth(engine: Engine, tmp_path: Path) -> None:
    with session_server(engine, tmp_path) as server, server.client() as http:
        with server.client(KEY_PY) as py_only:
            refused = py_only.post("/v1/sessions", json={"user_id": "u", "language": "javascript"})
            assert refused.status_code == 403 and refused.json()["error"]["field"] == "language"
        with server.client(None) as anonymous:
            assert anonymous.get("/v1/sessions").status_code == 401
        cases: list[tuple[dict[str, Any], str]] = [
            ({"user_id": "u", "limits": {"memory": "1g"}}, "limits.memory"),  # alpha's maximum is 512m
            ({"user_id": "u", "idle_timeout": 10**7}, "idle_timeout"),
            ({"user_id": "u", "network": "bridge"}, "network"),
            ({"user_id": "../u"}, "user_id"),
            ({"user_id": "u", "surprise": 1}, "surprise"),
        ]
        for body, field in cases:
            response = http.post("/v1/sessions", json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["error"]["field"] == field, body
        egress = http.post("/v1/sessions", json={"user_id": "u", "network": {"mode": "proxy", "allow": ["a.test"]}})
        assert egress.status_code == 403 and egress.json()["error"]["field"] == "network.mode"  # alpha: no network
        assert http.get("/v1/sessions").json() == {"sessions": []}  # nothing was made
        s = _create(http, language="bash")
        long = http.post(f"/v1/sessions/{s['id']}/execute", json={"code": "echo", "timeout": 21})
        assert long.status_code == 422 and long.json()["error"]["field"] == "timeout"  # alpha's maximum is 20
        empty = http.post(f"/v1/sessions/{s['id']}/execute", json={"code": ""})
        assert empty.status_code == 422
        paths = http.get("/openapi.json").json()["paths"]
        assert {"/v1/sessions", "/v1/sessions/{session_id}", "/v1/sessions/{session_id}/execute"} <= set(paths)


def test_a_restarted_service_adopts_its_sessions(engine: Engine, tmp_path: Path) -> None:
    with session_server(engine, tmp_path, end=False) as first, first.client() as http:
        s = _create(http)
        http.post(f"/v1/sessions/{s['id']}/execute", json={"code": "x = 41"})
        sid = s["id"]
    # The first service stopped (its sessions live on, nothing ended them); a new one starts.
    with session_server(engine, tmp_path) as second, second.client() as http:
        listed = http.get("/v1/sessions").json()["sessions"]
        assert [x["id"] for x in listed] == [sid]
        r = http.post(f"/v1/sessions/{sid}/execute", json={"code": "print(x + 1)"}).json()
        assert (r["stdout"], r["repl_reset"]) == ("42\n", False)


def test_client_and_cli(engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with session_server(engine, tmp_path) as server:
        with Client(server.url, api_key=KEY_A, trust_env=False) as client:
            info = client.create_session("u1", "javascript", idle_timeout=120)
            assert client.session_execute(info.id, "let n = 2").exit_code == 0
            assert client.session_execute(info.id, "console.log(n * 21)").stdout == "42\n"
            assert [s.id for s in client.list_sessions()] == [info.id]
            assert client.get_session(info.id).calls == 2
            client.delete_session(info.id)
            with pytest.raises(NotFoundError):
                client.session_execute(info.id, "n")
        remote = ["--server", server.url, "--api-key", KEY_A]
        capsys.readouterr()
        assert cli_main(["session", "new", "-l", "python", "-u", "cli-user", *remote]) == 0
        sid = capsys.readouterr().out.strip()
        assert sid.startswith("ses_")
        assert cli_main(["session", "exec", sid, "-c", "y = 6", *remote]) == 0
        assert cli_main(["session", "exec", sid, "-c", "print(y * 7)", *remote]) == 0
        assert capsys.readouterr().out == "42\n"
        assert cli_main(["session", "exec", sid, "-c", "import sys; sys.exit(3)", *remote]) == 3
        assert cli_main(["session", "ls", *remote]) == 0
        assert sid in capsys.readouterr().out
        assert cli_main(["session", "rm", sid, *remote]) == 0
        assert cli_main(["session", "exec", sid, "-c", "print(1)", *remote]) == 125  # gone: a service error
        assert "no session" in capsys.readouterr().err
