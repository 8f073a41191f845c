"""The MCP tools at ``/mcp`` of a real ``execbox serve`` (its own process), driven by the official MCP
client over streamable HTTP: the tenant's bearer key, its policy and quotas, and its metrics."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from execbox.engine.base import Engine

from .mcpkit import http_session, ok, service, text
from .serverkit import KEY_A, KEY_B, KEY_PY, metric

pytestmark = pytest.mark.docker

_INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
_HEADERS = {"Accept": "application/json, text/event-stream"}


def test_mcp_needs_a_tenant_key(engine: Engine, tmp_path: Path) -> None:
    with service(engine, tmp_path) as svc, httpx.Client(base_url=svc.url, trust_env=False, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer not-a-key-0123456789"}):
            r = http.post("/mcp", json=_INIT, headers={**_HEADERS, **headers})
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        r = http.post("/mcp", json=_INIT, headers={**_HEADERS, "Authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 200, r.text
        assert "execbox" in r.text  # serverInfo.name, in the initialize answer
        # Bound to loopback: another Host (DNS rebinding) is refused even with a key.
        rebound = http.post(
            "/mcp", json=_INIT, headers={**_HEADERS, "Authorization": f"Bearer {KEY_A}", "Host": "evil.example"}
        )
        assert rebound.status_code in (400, 421), rebound.text

        async def denied() -> None:
            async with http_session(svc.url, None) as mcp:
                await mcp.list_tools()

        with pytest.raises(BaseException) as info:  # the SDK raises inside its task group
            anyio.run(denied)
        assert "401" in repr(info.value) or "Unauthorized" in repr(info.value)


def test_tools_over_http_run_as_the_tenant(engine: Engine, tmp_path: Path) -> None:
    with service(engine, tmp_path) as svc:

        async def main() -> str:
            async with http_session(svc.url, KEY_A) as mcp:
                tools = {t.name for t in (await mcp.list_tools()).tools}
                assert {"run_code", "session_create", "session_run", "session_read_file"} <= tools
                r = ok(await mcp.call_tool("run_code", {"code": "print('hi')", "language": "python"}))
                assert (r["stdout"], r["exit_code"]) == ("hi\n", 0)
                over = await mcp.call_tool("run_code", {"code": "1", "language": "python", "timeout": 60})
                assert over.isError and "timeout" in text(over)  # above the tenant's maximum (20 s)
                cobol = await mcp.call_tool("run_code", {"code": "1", "language": "cobol"})
                assert cobol.isError and "language" in text(cobol)
                sid: str = ok(await mcp.call_tool("session_create", {"language": "javascript"}))["session_id"]
                ok(await mcp.call_tool("session_write_files", {"session_id": sid, "files": {"n.txt": "20"}}))
                code = "globalThis.n = Number(require('fs').readFileSync('n.txt', 'utf8'))"
                ok(await mcp.call_tool("session_run", {"session_id": sid, "code": code}))
                two = ok(await mcp.call_tool("session_run", {"session_id": sid, "code": "console.log(n + 22)"}))
                assert two["stdout"] == "42\n" and two["call"] == 3
                return sid

        sid = anyio.run(main)

        async def other_tenant() -> None:
            async with http_session(svc.url, KEY_B) as mcp:
                assert ok(await mcp.call_tool("session_list", {}))["sessions"] == []
                stolen = await mcp.call_tool("session_run", {"session_id": sid, "code": "console.log(n)"})
                assert stolen.isError and "session_id" in text(stolen)

        anyio.run(other_tenant)
        with httpx.Client(base_url=svc.url, trust_env=False, timeout=30) as http:
            page = http.get("/metrics").text
            listed = http.get("/v1/sessions", headers={"Authorization": f"Bearer {KEY_A}"}).json()["sessions"]
        assert [s["id"] for s in listed] == [sid]
        assert metric(page, 'execbox_executions_total{language="python",outcome="ok"}') == 1
        assert metric(page, "execbox_sessions_live") == 1 and metric(page, "execbox_sessions_created") == 1
        # Refused input is counted as the API counts it: the timeout over the maximum and the unknown language.
        assert metric(page, 'execbox_rejections_total{reason="invalid"}') == 2


def test_tool_calls_count_against_the_tenants_policy_and_quota(engine: Engine, tmp_path: Path) -> None:
    # pyonly: python only, 2 executions per minute, 1 at a time.
    with service(engine, tmp_path) as svc:

        async def main() -> None:
            async with http_session(svc.url, KEY_PY) as mcp:
                js = await mcp.call_tool("run_code", {"code": "1", "language": "javascript"})
                assert js.isError and "language" in text(js)
                sid = ok(await mcp.call_tool("session_create", {"language": "python"}))["session_id"]
                ok(await mcp.call_tool("run_code", {"code": "print(1)", "language": "python"}))
                ok(await mcp.call_tool("session_run", {"session_id": sid, "code": "print(2)"}))
                third = await mcp.call_tool("session_run", {"session_id": sid, "code": "print(3)"})
                assert third.isError and "per minute" in text(third) and "retry after" in text(third)
                fourth = await mcp.call_tool("run_code", {"code": "print(4)", "language": "python"})
                assert fourth.isError and "per minute" in text(fourth)

        anyio.run(main)
        with httpx.Client(base_url=svc.url, trust_env=False, timeout=30) as http:
            page = http.get("/metrics").text
        assert metric(page, 'execbox_rejections_total{reason="rate_limited"}') == 2
