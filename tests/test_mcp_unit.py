"""The MCP tools over a fake backend (no Docker): how errors, results and arguments map onto MCP.
The real transports and backends are tested in test_mcp_stdio.py and test_mcp_http.py."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp.shared.memory import create_connected_server_and_client_session

import execbox.mcp
from execbox.exceptions import (
    ExecboxError,
    InvalidRequestError,
    PermissionDeniedError,
    QuotaExceededError,
    SessionBusyError,
    SessionLimitError,
    SessionNotFoundError,
    SessionStateError,
)
from execbox.mcp.backend import McpBackend
from execbox.mcp.tools import build_server
from execbox.models import ExecutionResult
from execbox.sessions import SessionInfo, SessionResult


class FakeBackend(McpBackend):
    """Records calls; raises ``error`` when set; session calls return the files asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.error: ExecboxError | None = None
        self.stored: dict[str, bytes] = {}

    def _check(self, name: str, args: Any) -> None:
        self.calls.append((name, args))
        if self.error is not None:
            raise self.error

    async def run(self, code: str, language: str, **kw: Any) -> ExecutionResult:
        self._check("run", (code, language, kw))
        return ExecutionResult(
            id="x", language=language, stdout="out", stderr="err", exit_code=137, duration_ms=1.0, timed_out=True
        )

    async def create_session(
        self, language: str, image: str | None, isolation: str | None = None, pause_after: float | None = None
    ) -> SessionInfo:
        self._check("create", (language, image, isolation) + ((pause_after,) if pause_after is not None else ()))
        raise SessionLimitError("no room", "user", retry_after=1)

    async def session_call(self, session_id: str, code: str | None, **kw: Any) -> SessionResult:
        self._check("call", (session_id, code, kw))
        self.stored.update(kw.get("files") or {})
        wanted = {p: self.stored[p] for p in kw.get("collect") or [] if p in self.stored}
        return SessionResult(session_id=session_id, call=1, language="python", exit_code=0, duration_ms=1, files=wanted)

    async def close_session(self, session_id: str) -> None:
        self._check("close", session_id)

    async def list_sessions(self) -> list[SessionInfo]:
        return []

    async def pause_session(self, session_id: str) -> SessionInfo:
        self._check("pause", session_id)
        return _info(session_id, paused=True)

    async def resume_session(self, session_id: str) -> SessionInfo:
        self._check("resume", session_id)
        return _info(session_id, paused=False)


def _info(session_id: str, paused: bool) -> SessionInfo:
    return SessionInfo(
        id=session_id,
        user_id="mcp",
        language="python",
        repl=True,
        image="img",
        isolation="gvisor",
        limits={},
        status="ready",
        created_at=1.0,
        last_used_at=1.0,
        expires_at=601.0,
        idle_timeout=600.0,
        max_lifetime=3600.0,
        paused=paused,
        pause_after=30.0,
    )


def _call(backend: FakeBackend, tool: str, args: dict[str, Any]) -> Any:
    async def backend_for(ctx: Any) -> McpBackend:
        return backend

    async def main() -> Any:
        async with create_connected_server_and_client_session(build_server(backend_for)) as client:
            return await client.call_tool(tool, args)

    return anyio.run(main)


def _text(result: Any) -> str:
    return "\n".join(c.text for c in result.content)


def test_a_timeout_is_a_result_with_text_and_structured_content() -> None:
    backend = FakeBackend()
    r = _call(backend, "run_code", {"code": "x", "language": "python", "files": {"a.txt": "é"}})
    assert not r.isError
    assert r.structuredContent["timed_out"] and r.structuredContent["exit_code"] == 137
    assert "exit_code: 137 (timed_out)" in _text(r) and "stdout:\nout" in _text(r)
    _, (_, _, kw) = backend.calls[0]
    assert kw["files"] == {"a.txt": "é".encode()} and kw["env"] == {} and kw["collect"] == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (InvalidRequestError("language", "unknown language 'cobol'"), "invalid language: unknown language"),
        (SessionNotFoundError("no session 'ses_1'"), "invalid session_id: no session"),
        (PermissionDeniedError("this tenant may not use bash", 403, "language"), "not allowed: language:"),
        (QuotaExceededError("at most 2 executions per minute", 429, 17), "(retry after 17 s)"),
    ],
)
def test_library_errors_become_tool_errors_that_name_the_field(error: ExecboxError, expected: str) -> None:
    backend = FakeBackend()
    backend.error = error
    r = _call(backend, "run_code", {"code": "x", "language": "python"})
    assert r.isError and expected in _text(r), _text(r)


def test_files_tools_move_files_without_code() -> None:
    backend = FakeBackend()
    put = _call(backend, "session_write_files", {"session_id": "ses_1", "files": {"b.txt": "2", "a.txt": "1"}})
    assert put.structuredContent == {"session_id": "ses_1", "written": ["a.txt", "b.txt"]}
    assert backend.calls[0][1][1] is None  # no code
    got = _call(backend, "session_read_file", {"session_id": "ses_1", "path": "a.txt"})
    assert got.structuredContent["content"] == "1" and _text(got) == "1"
    for args, field in (
        ({"session_id": "ses_1", "files": {}}, "files"),
        ({"session_id": "ses_1", "path": "*.txt"}, "path"),
        ({"session_id": "ses_1", "path": "missing.txt"}, "path"),
    ):
        tool = "session_write_files" if "files" in args else "session_read_file"
        bad = _call(backend, tool, args)
        assert bad.isError and f"invalid {field}" in _text(bad)


def test_the_package_exports_its_names_lazily() -> None:
    assert set(execbox.mcp.__all__) >= {"build_server", "LocalBackend", "RemoteBackend", "McpBackend"}
    for name in execbox.mcp.__all__:
        assert getattr(execbox.mcp, name) is not None
    with pytest.raises(AttributeError):
        execbox.mcp.nothing_here  # noqa: B018


def test_isolation_reaches_the_backend_for_runs_and_sessions() -> None:
    backend = FakeBackend()
    _call(backend, "run_code", {"code": "print(1)", "language": "python", "isolation": "gvisor"})
    assert backend.calls[-1][1][2]["isolation"] == "gvisor"
    result = _call(backend, "session_create", {"language": "python", "isolation": "gvisor"})
    assert backend.calls[-1] == ("create", ("python", None, "gvisor")) and result.isError


def test_pause_tools_answer_the_session_and_name_the_field_when_refused() -> None:
    backend = FakeBackend()
    paused = _call(backend, "session_pause", {"session_id": "ses_1"})
    assert not paused.isError and backend.calls[-1] == ("pause", "ses_1")
    assert paused.structuredContent["paused"] and paused.structuredContent["pause_after"] == 30.0
    resumed = _call(backend, "session_resume", {"session_id": "ses_1"})
    assert backend.calls[-1] == ("resume", "ses_1") and resumed.structuredContent["paused"] is False
    for error, field in (
        (SessionStateError("isolation", "a session under 'container' cannot be paused"), "isolation"),
        (SessionStateError("checkpoint_quota", "over the quota: it runs on"), "checkpoint_quota"),
        (SessionNotFoundError("no session 'ses_1'"), "session_id"),
        (SessionBusyError("session ses_1 is busy with a call"), "session_id"),
    ):
        backend.error = error
        for tool in ("session_pause", "session_resume"):
            bad = _call(backend, tool, {"session_id": "ses_1"})
            assert bad.isError and field in _text(bad), _text(bad)
    backend.error = None
    _call(backend, "session_create", {"language": "python", "isolation": "gvisor", "pause_after": 30})
    assert backend.calls[-1] == ("create", ("python", None, "gvisor", 30.0))
    bad = _call(backend, "session_create", {"language": "python", "pause_after": -1})
    assert bad.isError and "pause_after" in _text(bad)
