"""``execbox mcp``: the MCP tools over stdio, for an agent on this machine.

Without ``--server`` the tools run on the local engine (this process holds an
``Executor`` and the local session registry, as ``execbox session`` does); with
``--server URL`` every tool call goes to that service with the tenant's API key.
Standard output is the protocol channel: execbox logs only to standard error.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import McpBackend

__all__ = ["add_parser"]


def _backend(args: argparse.Namespace) -> McpBackend:
    from ..cli import _api_key, _engine, _settings

    if args.server:
        from ..client import AsyncClient
        from .remote import RemoteBackend

        return RemoteBackend(AsyncClient(args.server, api_key=_api_key(args)), user_id=args.user)
    from ..executor import Executor
    from ..sessions import Sessions
    from ..state import open_store
    from .local import LocalBackend

    engine = _engine(args)
    options: dict[str, Any] = {"pool": not args.no_pool}
    if args.image:
        options["image"] = args.image
    executor = Executor(engine, **options)
    try:
        store = open_store(args.store or _settings().session_store())
        sessions = Sessions(engine, store, own_store=True, image=executor.image, egress=executor.egress)
    except BaseException:
        executor.close()
        raise
    return LocalBackend(executor, sessions, user_id=args.user)


def _cmd_mcp(args: argparse.Namespace) -> int:
    import anyio

    from .tools import build_server

    backend = _backend(args)

    async def backend_for(ctx: Any) -> McpBackend:
        return backend

    server = build_server(backend_for, log_level="WARNING")

    async def serve() -> None:
        try:
            await server.run_stdio_async()
        finally:
            with anyio.CancelScope(shield=True):
                await backend.aclose()

    anyio.run(serve)
    return 0


def add_parser(sub: Any) -> None:
    """The ``mcp`` subcommand of the ``execbox`` CLI."""
    p = sub.add_parser(
        "mcp",
        help="serve the MCP tools over stdio (for an AI agent on this machine)",
        description="Serve execbox's MCP tools (run_code, session_create, session_run, session_write_files, "
        "session_read_file, session_close, session_list) over stdio. Without --server the code runs on the "
        "local Docker Engine; with --server URL on that execbox service, as the tenant of --api-key.",
    )
    p.add_argument("--server", metavar="URL", help="use an execbox service instead of the local engine")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key for --server (default: $EXECBOX_API_KEY)",
    )
    p.add_argument("--user", default="mcp", help="the user sessions are created for (default: mcp)")
    p.add_argument("--image", help="default sandbox image (local engine only)")
    p.add_argument(
        "--store",
        metavar="URL",
        help="local session registry: redis://... or sqlite:///path (default: as `execbox session`: the"
        " service's, $EXECBOX_SESSION_STORE_URL, else $EXECBOX_STATE_URL, else SQLite under the data dir)",
    )
    p.add_argument("--no-pool", action="store_true", help="no warm sandboxes (slower runs, nothing idle)")
    p.set_defaults(func=_cmd_mcp)
