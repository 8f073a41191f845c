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

The same fault leaves containerd holding that container's stopped task (dockerd's delete of
it, at the exit, ran into the panic), and the next start deletes it first: ~60 ms of the
restore, measured. ``delete_stale_task`` does that after the checkpoint instead, through
dockerd's own containerd (its socket under the exec root, namespace ``moby``) with ``ctr``,
which comes with the engine.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["EXEC_ROOT", "clear_stale_state", "delete_stale_task", "stale_state"]

log = logging.getLogger("execbox.engine.docker")

EXEC_ROOT = Path("/var/run/docker")  # dockerd's default exec root; runtimes keep their state under it
_FULL_ID = re.compile(r"^[0-9a-f]{64}$")
_CTR_TIMEOUT = 10.0


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


def delete_stale_task(container_id: str, exec_root: Path = EXEC_ROOT) -> bool:
    """After a checkpoint (the sandbox stopped): clear runsc's stale record of the container, and
    if there was one, delete the stopped task containerd kept for it. Whether it was deleted."""
    if not clear_stale_state(container_id, exec_root):
        return False
    socket = exec_root / "containerd" / "containerd.sock"
    ctr = shutil.which("ctr")
    if ctr is None or not socket.exists():
        return False  # the next start deletes it
    argv = [ctr, "--address", str(socket), "--namespace", "moby", "task", "delete", container_id]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_CTR_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot delete the stopped task of %s: %s", container_id[:12], exc)
        return False
    if done.returncode != 0:
        log.info("stopped task of %s not deleted: %s", container_id[:12], done.stderr.strip()[-300:])
        return False
    return True


def _runsc_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"runsc" in cmdline
