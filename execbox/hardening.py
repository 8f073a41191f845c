"""Secure defaults in one place: ``Limits`` -> an engine-neutral ``SandboxSpec``.

Every sandbox gets: no network, a read-only root, a non-root UID unique among
live sandboxes, all capabilities dropped, no-new-privileges, the seccomp
allowlist of ``execbox.seccomp``, an init process, memory = memory+swap, CPU and
pids limits, size- and inode-capped tmpfs for /work and /tmp, no log driver,
and no host path or Docker socket mounted. Weakening any of it is not possible
through ``Limits``; later opt-ins (egress) change only the network.

``isolation="gvisor"`` keeps every one of these and puts gVisor's kernel between the
program and the host's. Two differ in how they are applied there: the seccomp
profile is gVisor's variant (``execbox.seccomp``), and the process limit comes from
RLIMIT_NPROC, which gVisor's kernel enforces on the program's processes, while the
cgroup pids limit outside is raised by gVisor's own threads (its kernel and the ptrace
stubs of the program's processes run on the host and count there: at the bare limit a
fork bomb took the whole sandbox down with no result, measured).

A session that can be paused (``pausable``: gVisor) has its CPU limit enforced over
1 s windows (the longest CFS period) instead of the engine's 100 ms: the same share, but
a burst may use more cores for up to the window's share (1 s of CPU at ``cpus=1``)
before it is throttled. Its resume is such a burst: runsc restores the sandbox inside its
cgroup, decompressing memory on every core, and over 300 ms windows the cgroup was
throttled for 70-480 ms around most resumes (its ``cpu.stat``). Measured, 18 alternating
resumes each with 50 MB of state: javascript p50 575 -> 482 ms, python 458 -> 433 ms,
throttled time 0. ``tests/test_sessions_pause_more.py`` checks that the share still holds.
"""

from __future__ import annotations

from .engine.base import Isolation, SandboxSpec, Tmpfs
from .images import SANDBOX_DIR
from .models import Limits
from .runtimes import WORKDIR
from .seccomp import profile

__all__ = ["AGENT_COMMAND", "WORKDIR", "host_pids", "sandbox_spec"]

AGENT_COMMAND = ("python3", "-I", "-S", f"{SANDBOX_DIR}/agent.py")
PAUSABLE_CPU_PERIOD_US = 1_000_000  # see the module's doc
GVISOR_HOST_PIDS = (6, 128)  # host pids per program task (measured: ~5.2), plus gVisor's own (~40)


def host_pids(pids: int, isolation: Isolation) -> int:
    """The cgroup pids limit of a sandbox whose programs may have ``pids`` processes/threads."""
    if isolation == "gvisor":
        per_process, base = GVISOR_HOST_PIDS
        return pids * per_process + base
    return pids


def sandbox_spec(
    limits: Limits,
    image: str,
    uid: int,
    labels: dict[str, str],
    network: str | None = None,
    command: tuple[str, ...] = AGENT_COMMAND,
    volumes: dict[str, str] | None = None,
    isolation: Isolation = "container",
    pausable: bool = False,
) -> SandboxSpec:
    """The create options of one sandbox under ``limits``, running as ``uid``, isolated by ``isolation``
    (``pausable``: a gVisor session, which may be checkpointed and restored)."""
    return SandboxSpec(
        image=image,
        command=command,
        user=f"{uid}:{uid}",
        labels=labels,
        memory_bytes=limits.memory,
        nano_cpus=int(limits.cpus * 1e9),
        pids=host_pids(limits.pids, isolation),
        # RLIMIT_NPROC counts per UID system-wide; the UID is unique, so this is per sandbox.
        nproc=limits.pids,
        tmpfs={
            WORKDIR: Tmpfs(limits.disk, limits.inodes, 0o700, uid),
            "/tmp": Tmpfs(limits.disk, limits.inodes, 0o1777, uid),
        },
        shm_bytes=min(limits.disk, 64 << 20),
        seccomp=profile(gvisor=isolation == "gvisor"),
        network=network,
        working_dir=WORKDIR,
        volumes=dict(volumes or {}),
        # On a network, names are the proxy's business: the engine's embedded DNS gets no
        # answer through the firewall, and the resolver's default (5 s x 2 tries) would
        # hang a program that looks a name up itself for 10 s. Give up after one second.
        dns_options=("timeout:1", "attempts:1") if network is not None else (),
        isolation=isolation,
        cpu_period_us=PAUSABLE_CPU_PERIOD_US if pausable and isolation == "gvisor" else 0,
    )
