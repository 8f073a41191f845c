"""execbox as an MCP server: the tools (``build_server``) over a small backend interface.

``execbox mcp`` serves them over stdio (``LocalBackend``, or ``RemoteBackend`` with
``--server URL``); ``execbox serve`` serves them over streamable HTTP at ``/mcp``
(``execbox.server.mcp``), authenticated and counted like the rest of the API.

The names are imported on first use, so that the CLI does not load the MCP SDK for
commands that do not need it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BackendFor",
    "LocalBackend",
    "McpBackend",
    "RemoteBackend",
    "RunOutput",
    "SessionCallOutput",
    "SessionListOutput",
    "SessionOutput",
    "build_server",
]

_WHERE = {
    "BackendFor": "tools",
    "build_server": "tools",
    "LocalBackend": "local",
    "RemoteBackend": "remote",
    "McpBackend": "backend",
    "RunOutput": "backend",
    "SessionCallOutput": "backend",
    "SessionListOutput": "backend",
    "SessionOutput": "backend",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
