"""Latency of MCP tool calls: the official MCP client against ``execbox mcp`` (stdio, local engine) and
against ``/mcp`` of ``execbox serve`` (streamable HTTP), with the HTTP API beside it for comparison.

    .venv/bin/python bench/mcp_latency.py [--runs 30]

For each face: ``run_code`` of ``print(1)`` (python) and ``session_run`` of ``x += 1`` in one session,
``--runs`` times each after one warm-up call; p50 and p95 of the latency the client sees. The service
is a real process on 127.0.0.1 with a throw-away API key and session registry; everything it and the
stdio server create is removed at the end. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import httpx
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from execbox import Client
from execbox.server.auth import hash_key

EXECBOX = str(Path(sys.executable).with_name("execbox"))
KEY = "bench-key-0123456789abcdef"


def _stats(name: str, samples: list[float]) -> None:
    q = statistics.quantiles(samples, n=20)
    print(f"{name:<44} p50 {statistics.median(samples):7.1f} ms   p95 {q[18]:7.1f} ms   (n={len(samples)})")


async def _timed(call: Callable[[], Awaitable[object]], runs: int) -> list[float]:
    await call()  # warm-up
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def _measure(session: ClientSession, face: str, runs: int) -> None:
    async def run() -> object:
        r = await session.call_tool("run_code", {"code": "print(1)", "language": "python"})
        assert not r.isError, r
        return r

    _stats(f"{face}: run_code python print(1)", await _timed(run, runs))
    created = await session.call_tool("session_create", {"language": "python"})
    assert created.structuredContent is not None, created
    sid = created.structuredContent["session_id"]
    await session.call_tool("session_run", {"session_id": sid, "code": "x = 0"})

    async def call() -> object:
        return await session.call_tool("session_run", {"session_id": sid, "code": "x += 1"})

    _stats(f"{face}: session_run x += 1", await _timed(call, runs))
    await session.call_tool("session_close", {"session_id": sid})


async def _stdio(registry: str, runs: int) -> None:
    args = ["mcp", "--store", registry]
    params = StdioServerParameters(command=EXECBOX, args=args, env=dict(os.environ))
    async with stdio_client(params) as (r, w), ClientSession(r, w) as session:
        await session.initialize()
        await _measure(session, "stdio (local engine, pool on)", runs)


async def _http(url: str, runs: int) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(headers=headers, timeout=60, trust_env=False) as client:
        async with streamable_http_client(f"{url}/mcp", http_client=client) as (r, w, _):
            async with ClientSession(r, w) as session:
                await session.initialize()
                await _measure(session, "HTTP /mcp (execbox serve)", runs)


def _api(url: str, runs: int) -> None:
    with Client(url, api_key=KEY, trust_env=False) as c:
        c.execute("print(1)", language="python")
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            c.execute("print(1)", language="python")
            samples.append((time.perf_counter() - t0) * 1000)
        _stats("HTTP API POST /v1/execute (comparison)", samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(_stdio, f"sqlite:///{tmp}/local.db", args.runs)
        tenants = Path(tmp) / "tenants.toml"
        tenants.write_text(
            f'[tenants.bench]\napi_keys = ["{hash_key(KEY)}"]\nmax_concurrent = 4\nexecutions_per_minute = 100000\n'
        )
        tenants.chmod(0o600)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "EXECBOX_DATA_DIR": f"{tmp}/data",
            "EXECBOX_LOG_LEVEL": "warning",
            "EXECBOX_SESSION_STORE_URL": f"sqlite:///{tmp}/registry.db",
            "EXECBOX_SHUTDOWN_GRACE": "1",
        }
        proc = subprocess.Popen(
            [EXECBOX, "serve", "--port", str(port), "--tenants", str(tenants)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("execbox serve did not become ready")
                time.sleep(0.1)
            anyio.run(_http, url, args.runs)
            _api(url, args.runs)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
