"""runsc's own record of a Docker container, where runsc 20221219 leaves it stale.

A container restored from a checkpoint and then checkpointed again is left by runsc in
status "paused" with its sandbox process gone, and ``runsc delete`` (run by containerd's
shim when the container stops) panics on it ("invalid state transition: paused =>
stopped"): its state files stay in the runtime's root. The next restore of that container
then fails with "id already in use" (for as long as one waits), and removing the container
leaves the files behind. Measured with Docker 20.10 (runtimes registered by path run under
runc's v2 shim, root ``/var/run/docker/runtime-runc/moby``) and runsc 20221219: with the
stale files removed, the second, third, ... restores work.

Only files of the given container whose sandbox and gofer processes are both gone are
removed; a live sandbox's record is never touched. Needs this process on the engine's host
(as the service runs beside its local engine); elsewhere there is nothing to find.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

__all__ = ["EXEC_ROOT", "clear_stale_state", "stale_state"]

log = logging.getLogger("execbox.engine.docker")

EXEC_ROOT = Path("/var/run/docker")  # dockerd's default exec root; runtimes keep their state under it
_FULL_ID = re.compile(r"^[0-9a-f]{64}$")


def stale_state(container_id: str, exec_root: Path = EXEC_ROOT) -> list[Path]:
    """The state and lock files runsc keeps for the container although its sandbox is gone."""
    if not _FULL_ID.match(container_id):
        return []
    found: list[Path] = []
    for state in exec_root.glob(f"runtime-*/moby/{container_id}_sandbox:{container_id}.state"):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        sandbox = data.get("sandbox") if isinstance(data, dict) else None
        pids = [sandbox.get("pid") if isinstance(sandbox, dict) else None, data.get("goferPid")]
        if any(_runsc_alive(pid) for pid in pids if isinstance(pid, int) and pid > 0):
            continue
        found += [state, state.with_name(state.name.removesuffix(".state") + ".lock")]
    return found


def clear_stale_state(container_id: str, exec_root: Path = EXEC_ROOT) -> bool:
    """Remove runsc's stale record of the container; whether there was one."""
    files = stale_state(container_id, exec_root)
    for file in files:
        try:
            file.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove runsc's stale state %s: %s", file, exc)
            return False
    if files:
        log.info("removed runsc's stale state of %s (its sandbox is gone)", container_id[:12])
    return bool(files)


def _runsc_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"runsc" in cmdline
