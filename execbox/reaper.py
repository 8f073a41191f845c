"""Collects orphans: resources with execbox labels whose owner died or that expired."""

from __future__ import annotations

import logging
import time

from .engine.base import Engine, ResourceInfo
from .labels import EXPIRES, MANAGED_FILTER, OWNER, owner_alive

__all__ = ["is_orphan", "sweep"]

log = logging.getLogger("execbox.reaper")


def is_orphan(res: ResourceInfo, now: float) -> bool:
    expires = res.labels.get(EXPIRES)
    try:
        if expires is not None and float(expires) < now:
            return True
    except ValueError:
        return True
    owner = res.labels.get(OWNER)
    return owner is not None and not owner_alive(owner)


def sweep(engine: Engine, everything: bool = False) -> list[ResourceInfo]:
    """Remove orphaned execbox resources (all of them with ``everything``); return what was removed."""
    now = time.time()
    removed = []
    # Containers first: volumes and networks in use by them cannot go before them.
    order = {"container": 0, "network": 1, "volume": 2}
    for res in sorted(engine.list_resources(MANAGED_FILTER), key=lambda r: order.get(r.kind, 9)):
        if everything or is_orphan(res, now):
            try:
                engine.remove_resource(res)
                removed.append(res)
            except Exception as exc:  # one stuck resource must not stop the sweep
                log.warning("could not remove %s %s: %s", res.kind, res.id[:12], exc)
    if removed:
        log.info("reaper removed %d orphaned resources", len(removed))
    return removed
