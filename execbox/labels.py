"""Labels carried by every resource execbox creates, and the owner identity."""

from __future__ import annotations

import os
import socket
import time
from functools import cache

__all__ = ["EXPIRES", "KIND", "MANAGED", "MANAGED_FILTER", "OWNER", "labels_for", "owner_id", "owner_alive"]

MANAGED = "execbox.managed"
MANAGED_FILTER = f"{MANAGED}=1"
OWNER = "execbox.owner"  # "<host>:<pid>:<process start time>" of the creating process
EXPIRES = "execbox.expires"  # unix time after which the resource is an orphan whatever its owner
KIND = "execbox.kind"  # "run", "pool", "session", "volume", ...
EXECUTION = "execbox.execution"


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # Field 22 (starttime); the command name in field 2 may contain spaces.
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@cache
def owner_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or 0}"


def owner_alive(owner: str) -> bool:
    """False only when the owner is a process on this host that no longer exists."""
    try:
        host, pid, start = owner.rsplit(":", 2)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True  # another host's process: only expiry applies
    now_start = _start_time(int(pid)) if pid.isdigit() else None
    return now_start is not None and now_start == start


def labels_for(kind: str, ttl: float, **extra: str) -> dict[str, str]:
    return {
        MANAGED: "1",
        OWNER: owner_id(),
        EXPIRES: str(int(time.time() + ttl)),
        KIND: kind,
        **extra,
    }
