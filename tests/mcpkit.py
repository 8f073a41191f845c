"""Helpers of the MCP tests: a real ``execbox serve`` in a process of its own (tenants, loopback),
and the official MCP client over stdio (spawning ``execbox mcp``) or streamable HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from execbox.engine.base import Engine
from execbox.state import open_store

from .serverkit import write_tenants
from .test_sessions import end_all, eventually

EXECBOX = str(Path(sys.executable).with_name("execbox"))
# The checkout under test, ahead of whatever the venv's console script would import.
SOURCE = str(Path(__file__).resolve().parents[1])


def _environ(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (SOURCE, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@dataclass
class Service:
    url: str
    proc: subprocess.Popen[bytes]
    registry: str  # the session store's URL
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def service(engine: Engine, tmp_path: Path, **env: str) -> Iterator[Service]:
    """``execbox serve`` with serverkit's tenants, on loopback; its sessions all end afterwards."""
    port = _free_port()
    registry = f"sqlite:///{tmp_path}/registry.db"
    variables = _environ(
        EXECBOX_SESSION_STORE_URL=registry,
        EXECBOX_DATA_DIR=str(tmp_path / "data"),
        EXECBOX_LOG_LEVEL="warning",
        EXECBOX_SHUTDOWN_GRACE="1",
        **env,
    )
    log = tmp_path / "serve.log"
    args = [EXECBOX, "serve", "--port", str(port), "--tenants", str(write_tenants(tmp_path))]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=variables, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"{url}/healthz", timeout=1, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        eventually(ready, timeout=60, interval=0.1)
        yield Service(url, proc, registry, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        ended(engine, registry)


def ended(engine: Engine, registry: str) -> None:
    """End every session of the registry; none of its containers may be left."""
    store = open_store(registry)
    try:
        left = end_all(engine, store)
    finally:
        store.close()
    assert not left, f"{len(left)} session containers were left"


@asynccontextmanager
async def stdio_session(*args: str) -> AsyncIterator[ClientSession]:
    """The official MCP client, talking to ``execbox mcp ARGS`` that it spawns."""
    params = StdioServerParameters(command=EXECBOX, args=["mcp", *args], env=_environ())
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def http_session(url: str, key: str | None) -> AsyncIterator[ClientSession]:
    """The official MCP client over streamable HTTP at ``url``/mcp, with the tenant's bearer key."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = httpx.Timeout(30, read=300)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False) as client:
        async with streamable_http_client(f"{url}/mcp", http_client=client) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


def text(result: CallToolResult) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def ok(result: CallToolResult) -> dict[str, Any]:
    """The structured content of a successful tool call."""
    assert not result.isError, text(result)
    assert result.structuredContent is not None
    return result.structuredContent
