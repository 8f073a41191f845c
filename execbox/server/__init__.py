"""The execbox HTTP service: FastAPI routes over the library, tenants, quotas, metrics.

``create_app(settings, executor=None)`` builds the ASGI app; ``execbox serve`` runs it
with uvicorn. Importing this package does not import FastAPI: ``execbox.server.schemas``
is shared with the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app, serve

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
