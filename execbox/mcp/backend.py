"""The small interface the MCP tools are written over, and what the tools hand back.

Three implementations plug in: ``LocalBackend`` (the library in this process: an
``Executor`` and ``Sessions`` on the local engine), ``RemoteBackend`` (a running execbox
service through ``execbox.client``, for ``execbox mcp --server URL``), and the service's
own, behind ``/mcp`` (``execbox.server.mcp``: the tenant's policy and quotas applied).
"""

from __future__ import annotations

import abc
from typing import Any

from pydantic import BaseModel, Field

from ..models import ExecutionResult
from ..sessions import SessionInfo, SessionResult

__all__ = ["McpBackend", "RunOutput", "SessionCallOutput", "SessionListOutput", "SessionOutput"]


class McpBackend(abc.ABC):
    """What the MCP tools need from execbox. Errors are execbox's exceptions (``ExecboxError``)."""

    user_id: str = "mcp"  # the user sessions are created for

    @abc.abstractmethod
    async def run(
        self,
        code: str,
        language: str,
        *,
        env: dict[str, str],
        timeout: float | None,
        files: dict[str, bytes],
        collect: list[str],
        image: str | None,
        isolation: str | None = None,
    ) -> ExecutionResult:
        """One ephemeral run in a fresh sandbox."""

    @abc.abstractmethod
    async def create_session(
        self, language: str, image: str | None, isolation: str | None = None, pause_after: float | None = None
    ) -> SessionInfo: ...

    @abc.abstractmethod
    async def session_call(
        self,
        session_id: str,
        code: str | None,
        *,
        timeout: float | None = None,
        files: dict[str, bytes] | None = None,
        collect: list[str] | None = None,
    ) -> SessionResult:
        """A call in a session; ``code=None`` only writes ``files`` and collects ``collect``."""

    @abc.abstractmethod
    async def close_session(self, session_id: str) -> None: ...

    @abc.abstractmethod
    async def list_sessions(self) -> list[SessionInfo]: ...

    @abc.abstractmethod
    async def pause_session(self, session_id: str) -> SessionInfo:
        """Checkpoint the session to disk (gvisor sessions only)."""

    @abc.abstractmethod
    async def resume_session(self, session_id: str) -> SessionInfo:
        """Start a paused session again where it was."""

    async def aclose(self) -> None:  # noqa: B027 (optional: most backends hold nothing)
        """Release what the backend holds (sessions themselves live on until they expire)."""


# -- structured results of the tools ---------------------------------------------------------


class RunOutput(BaseModel):
    """What a run produced (also the tool's text content, for clients that read only text)."""

    stdout: str = Field(description="Standard output, up to the output cap.")
    stderr: str = Field(description="Standard error, up to the output cap.")
    exit_code: int = Field(description="0 on success; 128+N when killed by signal N (137: timeout or memory).")
    timed_out: bool = Field(description="The code ran past its timeout and was stopped.")
    oom_killed: bool = Field(description="The code was killed for using more memory than its limit.")
    truncated: bool = Field(description="Output beyond the cap was dropped.")
    duration_ms: float = Field(description="Wall-clock time of the call.")
    files: dict[str, str] = Field(default_factory=dict, description="Collected files: path -> text (UTF-8).")
    files_truncated: bool = Field(False, description="Some matching files were left out (size or count cap).")


class SessionCallOutput(RunOutput):
    session_id: str = Field(description="The session.")
    call: int = Field(description="Number of this call in the session.")
    repl_reset: bool = Field(
        description="The interpreter was restarted (timeout, memory, exit): earlier variables are gone, files stay."
    )
    session_ended: bool = Field(description="The session is over; create a new one.")
    resumed: bool = Field(False, description="The session was paused: this call resumed it first.")


class SessionOutput(BaseModel):
    session_id: str = Field(description="Use it with session_run, session_write_files, session_read_file.")
    language: str
    repl: bool = Field(description="Variables and imports persist between calls.")
    calls: int
    idle_timeout: float = Field(description="Seconds unused after which the session ends.")
    expires_at: float = Field(description="Unix time the session ends unless it is used before.")
    isolation: str = Field("container", description="container or gvisor (only gvisor sessions can pause).")
    paused: bool = Field(False, description="Paused to disk: its next session_run resumes it.")
    pause_after: float | None = Field(None, description="Seconds unused after which it pauses by itself (or null).")

    @classmethod
    def of(cls, info: SessionInfo) -> SessionOutput:
        return cls(
            session_id=info.id,
            language=info.language,
            repl=info.repl,
            calls=info.calls,
            idle_timeout=info.idle_timeout,
            expires_at=info.expires_at,
            isolation=info.isolation,
            paused=info.paused,
            pause_after=info.pause_after,
        )


class SessionListOutput(BaseModel):
    sessions: list[SessionOutput] = Field(description="Live sessions, oldest first.")


def run_output(result: ExecutionResult | SessionResult, **extra: Any) -> dict[str, Any]:
    """The common fields of a run's or a session call's result, as the tools show them."""
    return {
        "stdout": result.stdout,
        "stderr": result.stderr,
        "exit_code": result.exit_code,
        "timed_out": result.timed_out,
        "oom_killed": result.oom_killed,
        "truncated": result.output_truncated,
        "duration_ms": result.duration_ms,
        "files": {p: data.decode("utf-8", "replace") for p, data in result.files.items()},
        "files_truncated": result.files_truncated,
        **extra,
    }
