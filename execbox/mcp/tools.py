"""The MCP tools, written once over ``McpBackend`` (FastMCP from the official ``mcp`` SDK).

Each tool answers with text (for clients that read only text) and structured content
(the tool's output schema). Bad input is a tool error whose message names the field.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from ..exceptions import (
    ExecboxError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    ServerBusyError,
    SessionBusyError,
    SessionLimitError,
    SessionNotFoundError,
    SessionStateError,
)
from .backend import McpBackend, RunOutput, SessionCallOutput, SessionListOutput, SessionOutput, run_output
from .descriptions import (
    RUN_CODE,
    SERVER_INSTRUCTIONS,
    SESSION_CLOSE,
    SESSION_CREATE,
    SESSION_LIST,
    SESSION_PAUSE,
    SESSION_READ_FILE,
    SESSION_RESUME,
    SESSION_RUN,
    SESSION_WRITE_FILES,
)

__all__ = ["BackendFor", "build_server"]

BackendFor = Callable[[Context[Any, Any, Any]], Awaitable[McpBackend]]
"""Gives the backend of a tool call (the service's depends on the caller's tenant)."""

Language = Annotated[str, Field(description="python, javascript or bash (aliases: py, js, node, sh).")]
Code = Annotated[str, Field(description="The program text.")]
SessionId = Annotated[str, Field(description="The id session_create returned (ses_...).")]
Timeout = Annotated[
    float | None, Field(description="Wall-clock limit in seconds (default 10; the server caps it).", gt=0)
]
Files = Annotated[
    dict[str, str] | None,
    Field(description="Text files to write into /work first: relative path -> content (UTF-8)."),
]
Isolation = Annotated[
    str | None,
    Field(
        description="'container' (the default: Linux namespaces and seccomp) or 'gvisor' (a user-space kernel"
        " between the code and the host: stronger, slower to start, some system calls differ). The tenant's"
        " policy may force or forbid one."
    ),
]


class WrittenOutput(BaseModel):
    session_id: str
    written: list[str] = Field(description="Paths written under /work.")


class FileOutput(BaseModel):
    session_id: str
    path: str = Field(description="Path under /work.")
    content: str = Field(description="The file's content: text, or base64 when encoding is base64.")
    encoding: str = Field(description="utf-8, or base64 for a file that is not UTF-8 text.")
    size: int = Field(description="Size in bytes.")


PauseAfter = Annotated[
    float | None,
    Field(
        description="Only with isolation 'gvisor': pause the session to disk after this many seconds unused"
        " (it then holds no memory; the next session_run resumes it, variables intact). Less than the session's"
        " idle timeout (600 s by default).",
        gt=0,
    ),
]


class ClosedOutput(BaseModel):
    session_id: str
    closed: bool


def _tool_error(exc: ExecboxError) -> ToolError:
    """The execbox error as a message a model can act on; an input error names its field first."""
    if isinstance(exc, InvalidRequestError):
        return ToolError(f"invalid {exc.field}: {exc.message}")
    if isinstance(exc, PermissionDeniedError) and exc.field:
        return ToolError(f"not allowed: {exc.field}: {exc}")
    if isinstance(exc, SessionNotFoundError | NotFoundError):
        return ToolError(f"invalid session_id: {exc} (list live sessions with session_list, or create one)")
    if isinstance(exc, SessionStateError):
        return ToolError(f"not possible: {exc.field}: {exc}")
    if isinstance(exc, SessionBusyError):
        return ToolError(f"session_id busy: {exc} (wait for its call to finish, then try again)")
    retry = getattr(exc, "retry_after", None)
    if isinstance(exc, SessionLimitError | QuotaExceededError | ServerBusyError) and retry:
        return ToolError(f"{exc} (retry after {retry:g} s)")
    return ToolError(str(exc))


def _text(out: BaseModel) -> str:
    data = out.model_dump()
    head = [f"{k}: {data[k]}" for k in ("session_id", "call") if k in data]
    notes = [
        k for k in ("timed_out", "oom_killed", "truncated", "repl_reset", "session_ended", "resumed") if data.get(k)
    ]
    head.append(f"exit_code: {data['exit_code']}" + (f" ({', '.join(notes)})" if notes else ""))
    parts = ["\n".join(head)]
    for stream in ("stdout", "stderr"):
        if data[stream]:
            parts.append(f"{stream}:\n{data[stream]}")
    for path, content in data["files"].items():
        parts.append(f"file {path}:\n{content}")
    return "\n\n".join(parts)


def _answer(out: BaseModel, text: str | None = None) -> CallToolResult:
    body = out.model_dump(mode="json")
    content = text if text is not None else json.dumps(body, indent=2)
    return CallToolResult(content=[TextContent(type="text", text=content)], structuredContent=body)


def build_server(backend_for: BackendFor, **options: Any) -> FastMCP:
    """A FastMCP server with execbox's tools; ``options`` go to ``FastMCP`` (e.g. transport settings)."""
    server = FastMCP("execbox", instructions=SERVER_INSTRUCTIONS, **options)
    closed_world = ToolAnnotations(openWorldHint=False)

    @server.tool(name="run_code", description=RUN_CODE, annotations=closed_world)
    async def run_code(
        code: Code,
        language: Language,
        ctx: Context[Any, Any, Any],
        env: Annotated[dict[str, str] | None, Field(description="Environment variables for this run.")] = None,
        timeout: Timeout = None,
        files: Files = None,
        collect: Annotated[
            list[str] | None, Field(description="Glob patterns ('*.png', 'out/**') of files in /work to return.")
        ] = None,
        image: Annotated[str | None, Field(description="A package image name, e.g. 'data' (if built).")] = None,
        isolation: Isolation = None,
    ) -> Annotated[CallToolResult, RunOutput]:
        backend = await backend_for(ctx)
        try:
            result = await backend.run(
                code,
                language,
                env=env or {},
                timeout=timeout,
                files=_encoded(files),
                collect=collect or [],
                image=image,
                isolation=isolation,
            )
        except ExecboxError as exc:
            raise _tool_error(exc) from None
        out = RunOutput(**run_output(result))
        return _answer(out, _text(out))

    @server.tool(name="session_create", description=SESSION_CREATE, annotations=closed_world)
    async def session_create(
        language: Language,
        ctx: Context[Any, Any, Any],
        image: Annotated[str | None, Field(description="A package image name, e.g. 'data' (if built).")] = None,
        isolation: Isolation = None,
        pause_after: PauseAfter = None,
    ) -> Annotated[CallToolResult, SessionOutput]:
        backend = await backend_for(ctx)
        try:
            info = await backend.create_session(language, image, isolation, pause_after)
        except ExecboxError as exc:
            raise _tool_error(exc) from None
        return _answer(SessionOutput.of(info))

    @server.tool(name="session_run", description=SESSION_RUN, annotations=closed_world)
    async def session_run(
        session_id: SessionId, code: Code, ctx: Context[Any, Any, Any], timeout: Timeout = None
    ) -> Annotated[CallToolResult, SessionCallOutput]:
        backend = await backend_for(ctx)
        try:
            result = await backend.session_call(session_id, code, timeout=timeout)
        except ExecboxError as exc:
            raise _tool_error(exc) from None
        extra = {
            "session_id": result.session_id,
            "call": result.call,
            "repl_reset": result.repl_reset,
            "session_ended": result.session_ended,
            "resumed": result.resumed,
        }
        out = SessionCallOutput(**run_output(result, **extra))
        return _answer(out, _text(out))

    @server.tool(name="session_write_files", description=SESSION_WRITE_FILES, annotations=closed_world)
    async def session_write_files(
        session_id: SessionId,
        files: Annotated[dict[str, str], Field(description="Relative path under /work -> text content (UTF-8).")],
        ctx: Context[Any, Any, Any],
    ) -> Annotated[CallToolResult, WrittenOutput]:
        if not files:
            raise ToolError("invalid files: give at least one file")
        backend = await backend_for(ctx)
        try:
            await backend.session_call(session_id, None, files=_encoded(files))
        except ExecboxError as exc:
            raise _tool_error(exc) from None
        return _answer(WrittenOutput(session_id=session_id, written=sorted(files)))

    @server.tool(name="session_read_file", description=SESSION_READ_FILE, annotations=closed_world)
    async def session_read_file(
        session_id: SessionId,
        path: Annotated[str, Field(description="Path of the file, relative to /work (e.g. 'out/result.csv').")],
        ctx: Context[Any, Any, Any],
    ) -> Annotated[CallToolResult, FileOutput]:
        if any(c in path for c in "*?"):
            raise ToolError("invalid path: name one file (no '*' or '?')")
        backend = await backend_for(ctx)
        try:
            result = await backend.session_call(session_id, None, collect=[path])
        except InvalidRequestError as exc:
            raise ToolError(f"invalid path: {exc.message}") from None
        except ExecboxError as exc:
            raise _tool_error(exc) from None
        if path not in result.files:
            why = "is larger than the output cap" if result.files_truncated else "does not exist (or is not a file)"
            raise ToolError(f"invalid path: {path!r} {why} in the session's /work")
        data = result.files[path]
        try:
            content, encoding = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            import base64

            content, encoding = base64.b64encode(data).decode(), "base64"
        out = FileOutput(session_id=session_id, path=path, content=content, encoding=encoding, size=len(data))
        return _answer(out, content if encoding == "utf-8" else f"(base64, {len(data)} bytes)\n{content}")

    @server.tool(name="session_close", description=SESSION_CLOSE, annotations=ToolAnnotations(destructiveHint=True))
    async def session_close(
        session_id: SessionId, ctx: Context[Any, Any, Any]
    ) -> Annotated[CallToolResult, ClosedOutput]:
        backend = await backend_for(ctx)
        try:
            await backend.close_session(session_id)
        except ExecboxError as exc:
            raise _tool_error(exc) from None
        return _answer(ClosedOutput(session_id=session_id, closed=True))

    @server.tool(name="session_pause", description=SESSION_PAUSE, annotations=closed_world)
    async def session_pause(
        session_id: SessionId, ctx: Context[Any, Any, Any]
    ) -> Annotated[CallToolResult, SessionOutput]:
        backend = await backend_for(ctx)
        try:
            info = await backend.pause_session(session_id)
        except ExecboxError as exc:
            raise _tool_error(exc) from None
        return _answer(SessionOutput.of(info))

    @server.tool(name="session_resume", description=SESSION_RESUME, annotations=closed_world)
    async def session_resume(
        session_id: SessionId, ctx: Context[Any, Any, Any]
    ) -> Annotated[CallToolResult, SessionOutput]:
        backend = await backend_for(ctx)
        try:
            info = await backend.resume_session(session_id)
        except ExecboxError as exc:
            raise _tool_error(exc) from None
        return _answer(SessionOutput.of(info))

    @server.tool(name="session_list", description=SESSION_LIST, annotations=ToolAnnotations(readOnlyHint=True))
    async def session_list(ctx: Context[Any, Any, Any]) -> Annotated[CallToolResult, SessionListOutput]:
        backend = await backend_for(ctx)
        try:
            found = await backend.list_sessions()
        except ExecboxError as exc:
            raise _tool_error(exc) from None
        return _answer(SessionListOutput(sessions=[SessionOutput.of(s) for s in found]))

    return server


def _encoded(files: dict[str, str] | None) -> dict[str, bytes]:
    return {path: text.encode() for path, text in (files or {}).items()}
