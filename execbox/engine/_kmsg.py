"""The kernel's own record of an OOM kill in a container's memory cgroup.

dockerd sets a container's ``OOMKilled`` from containerd's OOM event, and that event can be
lost: a gVisor sandbox (one process to the host's OOM killer) killed whole under load was
seen stopped with exit 137 and no flag, 3 s later still none, while the kernel's log had
``oom-kill:...,oom_memcg=/docker/<id>,...`` for it (full suite on 2 cores, about one run in
four). The kernel's log is the first-hand record: programs in a sandbox cannot write to it
(no /dev/kmsg inside, ``syslog`` refused by the seccomp profile). Readable only on the
engine's host, as root; elsewhere nothing is found.
"""

from __future__ import annotations

import errno
import os

__all__ = ["KMSG", "memcg_oom_killed"]

KMSG = "/dev/kmsg"
_MAX_BYTES = 16 << 20  # the kernel's log buffer is far smaller; a bound for any other file


def memcg_oom_killed(container_id: str, path: str = KMSG) -> bool:
    """Whether the kernel's log records an OOM kill in the memory cgroup of the container
    (its full id, as the cgroup's path has it)."""
    if len(container_id) < 12:
        return False
    needle = container_id.encode()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    pending, total = b"", 0
    try:
        while total < _MAX_BYTES:
            try:
                chunk = os.read(fd, 8192)  # /dev/kmsg: one record per read
            except BlockingIOError:
                break  # the end of the log
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # records overwritten while reading: go on with the next
                break
            if not chunk:
                break
            total += len(chunk)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            if any(_records_oom_kill(line, needle) for line in lines):
                return True
        return _records_oom_kill(pending, needle)
    finally:
        os.close(fd)


def _records_oom_kill(line: bytes, container_id: bytes) -> bool:
    if b"oom-kill:" not in line:
        return False
    for field in line.split(b"oom-kill:", 1)[1].split(b","):
        if field.startswith(b"oom_memcg=") and container_id in field:
            return True
    return False
