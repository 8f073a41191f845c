"""The app factory, and ``serve()`` that runs it under uvicorn."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .. import __version__
from ..config import ExecutorConfig
from ..egress import EgressSettings
from ..exceptions import ConfigurationError
from ..executor import Executor
from ..models import DEFAULT_MAX_LIMITS
from ..sessions import Sessions
from ..sessions.setup import sessions_beside
from ..settings import Settings
from ..state import open_store
from .auth import Authenticator
from .errors import install_error_handlers
from .logging import configure_logging
from .mcp import mcp_route
from .metrics import Metrics
from .middleware import Guard
from .routes import execute, executions, health, nodes, sessions, users
from .service import ExecutionService

__all__ = ["create_app", "serve"]

log = logging.getLogger("execbox.server")

NO_AUTH_WARNING = (
    "execbox is serving WITHOUT AUTHENTICATION (--no-auth): anyone who can connect may run code. "
    "Use it on loopback for local work only."
)

DESCRIPTION = """Runs untrusted JavaScript, Python and bash in fresh, locked-down containers.

Authenticate with `Authorization: Bearer <API key>`. Errors are JSON objects
`{"error": {"type", "message", "field", "retry_after"}}`; 429 and 503 carry `Retry-After`.
"""

# Fields of the library's models that carry no description of their own (see the report: they belong in models.py).
_EXTRA_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "ExecutionResult": {
        "language": "The language the code ran as (canonical name).",
        "stdout": "Standard output of the program, up to limits.output_bytes.",
        "stderr": "Standard error of the program, up to limits.output_bytes.",
        "timed_out": "The program was killed because it ran past its timeout.",
        "oom_killed": "The program was killed because it ran out of memory.",
    },
    "Submitted": {},
    "HTTPValidationError": {"detail": "Validation errors."},
    "ValidationError": {
        "loc": "Location of the error.",
        "msg": "Message.",
        "type": "Error type.",
        "input": "The offending input.",
        "ctx": "Context of the error.",
    },
}
_SIZE_FIELDS = ("memory", "output_bytes", "disk")


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes, tags=app.openapi_tags
        )
        for name, component in schema.get("components", {}).get("schemas", {}).items():
            base = name.removesuffix("-Input").removesuffix("-Output")
            for prop, spec in component.get("properties", {}).items():
                if "description" not in spec:
                    spec["description"] = _EXTRA_DESCRIPTIONS.get(base, {}).get(prop) or spec.get("title", prop)
                if base in ("Limits",) and prop in _SIZE_FIELDS:
                    # Sizes also accept strings such as "256m" (binary units).
                    spec["anyOf"] = [
                        {"type": "integer", "minimum": spec.pop("minimum", 0)},
                        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*[kmgtKMGT]?(i?[bB])?\s*$"},
                    ]
                    spec.pop("type", None)
        app.openapi_schema = schema
    return app.openapi_schema


def _sessions(settings: Settings, executor: Executor) -> Sessions:
    """Sessions over the executor's engine, image, limits and egress; the registry in the session store."""
    return sessions_beside(settings, executor, settings.session_store())


def create_app(
    settings: Settings | None = None, executor: Executor | None = None, sessions_: Sessions | None = None
) -> FastAPI:
    """The ASGI app. Without ``executor``, one is created at start-up and closed at shutdown.

    Without ``sessions_`` (and unless ``settings.sessions`` is off), a ``Sessions`` over the
    executor's engine is created at start-up: it adopts the sessions an earlier run left.

    ``settings`` defaults to ``Settings()``, i.e. the ``EXECBOX_*`` environment.
    """
    settings = settings if settings is not None else Settings()
    max_limits = executor.config.max_limits if executor is not None else DEFAULT_MAX_LIMITS
    auth = Authenticator.build(max_limits, settings.tenants_file, settings.api_keys, settings.no_auth)
    metrics = Metrics()
    service = ExecutionService(settings, metrics)
    service.tenants = auth.tenant
    mcp_route_, mcp_manager = mcp_route(service, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.no_auth:
            log.warning(NO_AUTH_WARNING)
        own = executor is None
        store = None
        if own:
            config = ExecutorConfig(
                image=settings.image,
                isolation=settings.isolation,
                max_code_bytes=settings.max_code_bytes,
                data_dir=settings.data_dir,
                pool=settings.pool_min_ready > 0 and not settings.queue_url,  # with nodes, they run everything
                pool_min_ready=settings.pool_min_ready,
                pool_max_total=settings.pool_max_total,
                volume_quota=settings.volume_quota,
                volume_max_idle=settings.volume_max_idle,
            )
            store = open_store(settings.state_store())  # the embedded default: SQLite under the data directory
        if own and settings.queue_url:
            # Nodes run everything: this process checks and dispatches, and needs no engine of its own.
            service.config, service.state_store = config, store
        elif own:
            service.executor = await anyio.to_thread.run_sync(
                lambda: Executor(
                    settings.engine_url,
                    config=config,
                    state_store=store,
                    egress=EgressSettings(
                        host_map=settings.proxy_host_map,
                        network_name=settings.egress_network,
                        proxy_port=settings.egress_proxy_port,
                    ),
                )
            )
        else:
            service.executor = executor
        if sessions_ is not None:
            service.sessions = sessions_
        elif settings.sessions and service.session_nodes is None:  # in nodes mode the nodes hold sessions
            ex = service.ex
            service.sessions = await anyio.to_thread.run_sync(lambda: _sessions(settings, ex))
        await service.jobs.start()
        if service.dispatcher is not None:
            await service.dispatcher.start()
        log.info("execbox service ready", extra={"in_flight": 0})

        async def reaper() -> None:
            # Orphans (a crashed replica's containers, expired ones) and idle volumes.
            while True:
                await anyio.sleep(settings.reap_interval)
                if service.executor is not None:
                    try:
                        await anyio.to_thread.run_sync(service.executor.housekeep)
                    except Exception:
                        log.warning("reaper pass failed", exc_info=True)

        reaper_task = asyncio.get_running_loop().create_task(reaper())
        try:
            async with mcp_manager:
                yield
        finally:
            reaper_task.cancel()
            await service.shutdown(settings.shutdown_grace)
            if sessions_ is None and service.sessions is not None:
                # Only the reaper stops: the sessions live on, and the next start adopts them.
                await anyio.to_thread.run_sync(service.sessions.close)
            if own and service.executor is not None:
                await anyio.to_thread.run_sync(service.executor.close)
            if store is not None:
                store.close()
            if service.dispatcher is not None:
                await service.dispatcher.close()
            log.info("execbox service stopped")

    app = FastAPI(title="execbox", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app, metrics.rejected)
    app.include_router(execute.router)
    app.include_router(executions.router)
    app.include_router(sessions.router)
    app.include_router(health.router)
    app.include_router(users.router)
    app.include_router(nodes.router)
    app.router.routes.append(mcp_route_)  # the MCP tools, over streamable HTTP
    app.add_middleware(
        Guard,
        auth=auth,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        plain_execute=functools.partial(execute.execute_plain, service),
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings) -> int:
    """Run the service under uvicorn until SIGTERM/SIGINT; 0 after a clean shutdown."""
    import uvicorn

    configure_logging(settings.log_level, settings.log_json)
    if settings.no_auth:
        if not _loopback(settings.host):
            raise ConfigurationError(f"--no-auth would let anyone reaching {settings.host} run code: bind to loopback")
        print(f"\n*** WARNING: {NO_AUTH_WARNING} ***\n", file=sys.stderr, flush=True)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        ws="none",
        server_header=False,
        # None would wait for ever: a grace of 0 still means "do not wait".
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace)),
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 3
