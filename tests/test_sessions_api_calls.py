"""Session calls through the HTTP API, the client and the CLI: per-call files in, collect out, and
streamed output (server-sent events), on a real uvicorn and the real Docker Engine."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from execbox import Client, InvalidRequestError, SessionResult
from execbox.cli import main as cli_main
from execbox.engine.base import Engine

from .serverkit import KEY_A
from .test_sessions_api import _create, session_server

pytestmark = pytest.mark.docker


def _events(body: str) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_files_collect_and_sse_over_http(engine: Engine, tmp_path: Path) -> None:
    with session_server(engine, tmp_path) as server, server.client() as http:
        s = _create(http)
        url = f"/v1/sessions/{s['id']}/execute"
        put = http.post(url, json={"files": {"in.txt": base64.b64encode(b"abc").decode()}})
        assert put.status_code == 200 and put.json()["exit_code"] == 0, put.text
        body = {"code": "print(open('in.txt').read().upper())\nn = open('o.txt', 'w').write('x')", "collect": ["o.txt"]}
        r = http.post(url, json=body).json()
        assert r["stdout"] == "ABC\n" and r["files"] == {"o.txt": base64.b64encode(b"x").decode()}

        code = "import sys\nprint('out')\nprint('err', file=sys.stderr)\nv = 7\nv"
        streamed = http.post(url, json={"code": code}, headers={"Accept": "text/event-stream"})
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = _events(streamed.text)
        kinds = [k for k, _ in events]
        assert kinds[-1] == "result" and {"stdout", "stderr"} <= set(kinds[:-1])
        assert "".join(str(d["data"]) for k, d in events if k == "stdout") == "out\n7\n"
        assert "".join(str(d["data"]) for k, d in events if k == "stderr") == "err\n"
        assert events[-1][1]["call"] == 3 and events[-1][1]["stdout"] == "out\n7\n"

        # An error after admission arrives as an error event; before it, as an HTTP error.
        gone = http.post("/v1/sessions/ses_000000000000000000000000/execute?stream=true", json={"code": "1"})
        assert gone.status_code == 200 and [k for k, _ in _events(gone.text)] == ["error"]
        assert _events(gone.text)[0][1]["type"] == "not_found"
        bad = http.post(url, json={"files": {"../x": "eA=="}}, headers={"Accept": "text/event-stream"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "files"
        empty = http.post(url, json={})
        assert empty.status_code == 422 and empty.json()["error"]["field"] == "code"


def test_client_and_cli_move_files_and_stream(
    engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with session_server(engine, tmp_path) as server, Client(server.url, api_key=KEY_A, trust_env=False) as client:
        s = client.create_session("u1", "bash")
        files = {"data.bin": b"\x00" * 10}
        r = client.session_execute(s.id, "wc -c < data.bin > n.txt", files=files, collect=["n.txt"])
        assert r.files == {"n.txt": b"10\n"}
        events = list(client.session_stream(s.id, "echo one; echo two >&2"))
        assert isinstance(events[-1].result, SessionResult) and events[-1].result.stdout == "one\n"
        assert [(e.kind, e.data) for e in events[:-1] if e.kind == "stdout"] == [("stdout", "one\n")]
        with pytest.raises(InvalidRequestError) as info:
            client.session_execute(s.id, None)
        assert info.value.field == "code"

        local = tmp_path / "local.txt"
        local.write_text("from the host")
        out_dir = tmp_path / "collected"
        common = ["--server", server.url, "--api-key", KEY_A]
        args = ["session", "exec", s.id, *common, "--file", f"in/h.txt={local}", "--collect", "in/*", "--out"]
        code = cli_main([*args, str(out_dir), "-c", "cat in/h.txt; echo"])
        assert code == 0 and capsys.readouterr().out == "from the host\n"
        assert (out_dir / "in" / "h.txt").read_text() == "from the host"
        # Files only: no code, nothing read from stdin.
        assert cli_main(["session", "exec", s.id, *common, "--collect", "n.txt", "--out", str(out_dir)]) == 0
        assert (out_dir / "n.txt").read_text() == "10\n"
