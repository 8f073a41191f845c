"""``execbox mcp`` over stdio, driven by the official MCP client: on the local engine (the
library in the spawned process), and with ``--server`` against a real ``execbox serve``."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from execbox.engine.base import Engine

from .mcpkit import ended, ok, service, stdio_session, text
from .serverkit import KEY_A, KEY_B

pytestmark = pytest.mark.docker

TOOLS = {
    "run_code",
    "session_create",
    "session_run",
    "session_close",
    "session_list",
    "session_write_files",
    "session_read_file",
    "session_pause",
    "session_resume",
}


def test_tools_are_listed_with_descriptions_for_a_model(engine: Engine, tmp_path: Path) -> None:
    registry = f"sqlite:///{tmp_path}/local.db"

    async def main() -> None:
        async with stdio_session("--store", registry, "--no-pool") as mcp:
            tools = {t.name: t for t in (await mcp.list_tools()).tools}
            assert set(tools) == TOOLS
            run = tools["run_code"]
            assert {"code", "language"} <= set(run.inputSchema["required"])
            assert {"env", "timeout", "files", "image"} <= set(run.inputSchema["properties"])
            assert run.outputSchema is not None
            assert {"stdout", "stderr", "exit_code", "timed_out", "oom_killed", "truncated"} <= set(
                run.outputSchema["properties"]
            )
            description = run.description or ""
            assert "No network" in description and "Nothing persists" in description
            assert "persist" in (tools["session_create"].description or "")

    anyio.run(main)
    ended(engine, registry)


def test_run_code_results_errors_and_limits(engine: Engine, tmp_path: Path) -> None:
    registry = f"sqlite:///{tmp_path}/local.db"

    async def main() -> None:
        async with stdio_session("--store", registry, "--no-pool") as mcp:
            r = await mcp.call_tool("run_code", {"code": "import sys; print(6 * 7); sys.exit(3)", "language": "py"})
            out = ok(r)
            assert (out["stdout"], out["exit_code"], out["timed_out"], out["oom_killed"]) == ("42\n", 3, False, False)
            assert "exit_code: 3" in text(r) and "42" in text(r)

            files = {"code": "cat in.txt | tr a-z A-Z > out.txt", "language": "bash", "files": {"in.txt": "abc"}}
            out = ok(await mcp.call_tool("run_code", {**files, "collect": ["*.txt"], "env": {"K": "v"}}))
            assert out["files"] == {"in.txt": "abc", "out.txt": "ABC"}

            # A timeout is a result, not an error.
            slow = ok(await mcp.call_tool("run_code", {"code": "while True: pass", "language": "python", "timeout": 1}))
            assert slow["timed_out"] and slow["exit_code"] == 137

            # Bad input: a tool error whose message names the field.
            for args, field in (
                ({"code": "print(1)", "language": "cobol"}, "language"),
                ({"language": "python"}, "code"),
                ({"code": "1", "language": "python", "files": {"../x": "y"}}, "files"),
                ({"code": "1", "language": "python", "timeout": 100000}, "timeout"),
                ({"code": "1", "language": "python", "image": "no-such-image"}, "image"),
            ):
                bad = await mcp.call_tool("run_code", args)
                assert bad.isError, args
                assert field in text(bad), (field, text(bad))

    anyio.run(main)
    ended(engine, registry)


def test_sessions_over_stdio_keep_state_and_files(engine: Engine, tmp_path: Path) -> None:
    registry = f"sqlite:///{tmp_path}/local.db"

    async def main() -> None:
        async with stdio_session("--store", registry, "--no-pool", "--user", "agent-1") as mcp:
            s = ok(await mcp.call_tool("session_create", {"language": "python"}))
            sid = s["session_id"]
            assert s["repl"] and s["language"] == "python"
            ok(await mcp.call_tool("session_run", {"session_id": sid, "code": "x = 41"}))
            files = {"data/in.csv": "a,b\n1,2\n"}
            put = await mcp.call_tool("session_write_files", {"session_id": sid, "files": files})
            assert ok(put)["written"] == ["data/in.csv"]
            code = "import csv\nrows = list(csv.reader(open('data/in.csv')))\nopen('out.txt', 'w').write(str(x + 1))"
            run = ok(await mcp.call_tool("session_run", {"session_id": sid, "code": code + "\nprint(rows[1])"}))
            assert run["stdout"] == "['1', '2']\n" and run["call"] == 3 and not run["repl_reset"]
            got = ok(await mcp.call_tool("session_read_file", {"session_id": sid, "path": "out.txt"}))
            assert (got["content"], got["encoding"], got["size"]) == ("42", "utf-8", 2)
            write = "open('b.bin', 'wb').write(b'\\xff\\x00')"
            ok(await mcp.call_tool("session_run", {"session_id": sid, "code": write}))
            binary = ok(await mcp.call_tool("session_read_file", {"session_id": sid, "path": "b.bin"}))
            assert (binary["content"], binary["encoding"]) == ("/wA=", "base64")
            missing = await mcp.call_tool("session_read_file", {"session_id": sid, "path": "nope.txt"})
            assert missing.isError and "path" in text(missing)

            listed = ok(await mcp.call_tool("session_list", {}))["sessions"]
            assert [x["session_id"] for x in listed] == [sid]
            assert ok(await mcp.call_tool("session_close", {"session_id": sid}))["closed"]
            gone = await mcp.call_tool("session_run", {"session_id": sid, "code": "print(x)"})
            assert gone.isError and "session_id" in text(gone)
            assert ok(await mcp.call_tool("session_list", {}))["sessions"] == []
            bad = await mcp.call_tool("session_create", {"language": "cobol"})
            assert bad.isError and "language" in text(bad)

    anyio.run(main)
    ended(engine, registry)


def test_stdio_with_server_uses_the_service_as_the_tenant(engine: Engine, tmp_path: Path) -> None:
    with service(engine, tmp_path) as svc:

        async def main() -> str:
            async with stdio_session("--server", svc.url, "--api-key", KEY_A) as mcp:
                r = ok(await mcp.call_tool("run_code", {"code": "console.log(1 + 1)", "language": "javascript"}))
                assert r["stdout"] == "2\n"
                sid: str = ok(await mcp.call_tool("session_create", {"language": "python"}))["session_id"]
                ok(await mcp.call_tool("session_run", {"session_id": sid, "code": "y = 'kept'"}))
                again = ok(await mcp.call_tool("session_run", {"session_id": sid, "code": "y"}))
                assert again["stdout"] == "'kept'\n"
                bad = await mcp.call_tool("run_code", {"code": "1", "language": "cobol"})
                assert bad.isError and "language" in text(bad)
                return sid

        sid = anyio.run(main)
        # The session is the tenant's on the service: its key sees it, another tenant's does not.
        with httpx.Client(base_url=svc.url, trust_env=False, timeout=30) as http:
            mine = http.get("/v1/sessions", headers={"Authorization": f"Bearer {KEY_A}"}).json()["sessions"]
            assert [(s["id"], s["user_id"]) for s in mine] == [(sid, "mcp")]
            theirs = http.get("/v1/sessions", headers={"Authorization": f"Bearer {KEY_B}"}).json()["sessions"]
            assert theirs == []

        async def wrong_key() -> str:
            async with stdio_session("--server", svc.url, "--api-key", "not-a-key-0123456789") as mcp:
                return text(await mcp.call_tool("session_list", {}))

        assert "API key" in anyio.run(wrong_key)
