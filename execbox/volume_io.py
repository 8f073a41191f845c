"""Backup and restore of a user's volume, done inside a hardened sandbox.

The host never walks or writes a user-writable tree by path: a run that holds
the volume could swap a checked entry for a symlink to a host path between the
check and the use (``renameat2(RENAME_EXCHANGE)`` in a loop), and the host, as
root, would copy or modify that host path. So the tar work runs in a sandbox
like any other (the volume's UID, no capabilities, no network, read-only root,
the seccomp allowlist) with the volume mounted at /data: a raced symlink there
points into the sandbox's own filesystem. The host only streams bytes in and out
and checks an archive's entries in memory before they go in.
"""

from __future__ import annotations

import struct
import tarfile
import tempfile
import time
from io import BytesIO

from .engine.base import STDERR, Engine
from .exceptions import EngineError, InvalidRequestError
from .hardening import sandbox_spec
from .labels import labels_for
from .models import Limits

__all__ = ["check_archive", "export_volume", "import_volume"]

MOUNT = "/data"
TIMEOUT = 300.0
_LIMITS = Limits(memory="256m", cpus=1.0, pids=32, disk="8m", inodes=1024)

# Runs as the volume's UID in the sandbox: the entries of /data, sorted, each under its own
# name. A file is read through the descriptor it was checked on (O_NOFOLLOW, fstat), and an
# entry that changes under the walk is looked at again: nothing is ever followed.
_EXPORT = """
import errno, os, stat, sys, tarfile
out = sys.stdout.buffer
def add(tar, path, arc):
    for _ in range(100):
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
                    info = tar.gettarinfo(arcname=arc, fileobj=f)
                    if not info.isreg():
                        continue
                    tar.addfile(info, f)
                return
            info = tar.gettarinfo(path, arcname=arc)
            if info is None:  # a socket
                return
            tar.addfile(info)
            if info.isdir():
                for name in sorted(os.listdir(path)):
                    add(tar, os.path.join(path, name), arc + "/" + name)
            return
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR, errno.EINVAL):
                raise
    print("skipped (kept changing): " + arc, file=sys.stderr)
with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
    for name in sorted(os.listdir("/data")):
        add(tar, os.path.join("/data", name), name)
out.flush()
"""

# Reads an 8-byte length and that many bytes of a checked archive; replaces /data's contents.
_IMPORT = """
import os, shutil, struct, sys, tarfile
inp = sys.stdin.buffer
left = struct.unpack(">Q", inp.read(8))[0]
class Exact:
    def read(self, size=-1):
        global left
        size = left if size is None or size < 0 else min(size, left)
        data = inp.read(size) if size else b""
        left -= len(data)
        return data
for name in os.listdir("/data"):
    path = os.path.join("/data", name)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
with tarfile.open(fileobj=Exact(), mode="r|*") as tar:
    tar.extractall("/data")
print(len(os.listdir("/data")))
"""


def check_archive(data: bytes) -> list[tarfile.TarInfo]:
    """The archive's entries, each accepted by tarfile's 'data' filter (checked in memory).

    Absolute paths, '..', links that point out of the volume, device files and
    FIFOs are refused with an ``InvalidRequestError`` on ``body``.
    """
    try:
        with tarfile.open(fileobj=BytesIO(data), mode="r:*") as tar:
            members = tar.getmembers()
    except tarfile.TarError as exc:
        raise InvalidRequestError("body", f"not a tar archive: {exc}") from None
    # data_filter resolves names under a destination: an empty private directory, so
    # the resolution is purely lexical and nothing outside it is looked at.
    with tempfile.TemporaryDirectory(prefix="execbox-check-") as dest:
        for m in members:
            parts = m.name.split("/")
            if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise InvalidRequestError("body", f"archive refused: entry {m.name!r} is not allowed")
            try:
                tarfile.data_filter(m, dest)
            except tarfile.FilterError as exc:
                raise InvalidRequestError("body", f"archive refused: {exc}") from None
    return members


def export_volume(engine: Engine, image: str, volume: str, uid: int, max_bytes: int) -> bytes:
    """The volume's files as a tar archive, made in a sandbox that mounts it."""
    out, err, code = _run_tool(engine, image, volume, uid, _EXPORT, b"", max_bytes)
    if code != 0:
        raise EngineError(f"export of volume {volume} failed (exit {code}): {err[-500:]}")
    return out


def import_volume(engine: Engine, image: str, volume: str, uid: int, data: bytes) -> None:
    """Replace the volume's files with a checked archive's (see ``check_archive``), in a sandbox."""
    out, err, code = _run_tool(engine, image, volume, uid, _IMPORT, struct.pack(">Q", len(data)) + data, 1 << 16)
    if code != 0:
        lines = err.strip().splitlines()
        raise InvalidRequestError("body", f"archive refused: {lines[-1] if lines else f'exit {code}'}")


def _run_tool(
    engine: Engine, image: str, volume: str, uid: int, script: str, stdin: bytes, max_out: int
) -> tuple[bytes, str, int]:
    spec = sandbox_spec(
        _LIMITS,
        image,
        uid,
        labels_for("volume-io", TIMEOUT + 60),
        command=("python3", "-I", "-S", "-c", script),
        volumes={volume: MOUNT},
    )
    sid = engine.create(spec)
    try:
        channel = engine.attach(sid)
        try:
            engine.start(sid)
            if stdin:
                channel.send(stdin)
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    item = channel.recv(max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    raise EngineError(f"volume {volume}: backup/restore took longer than {TIMEOUT:g} s") from None
                if item is None:
                    break
                stream, chunk = item
                if stream == STDERR:
                    err += chunk[: max((1 << 16) - len(err), 0)]
                    continue
                out += chunk
                if len(out) > max_out:
                    raise EngineError(f"volume {volume}: the archive is larger than {max_out} bytes")
        finally:
            channel.close()
        state = engine.wait(sid, 10.0)
        return bytes(out), err.decode("utf-8", "replace"), state.exit_code if state.exit_code is not None else -1
    finally:
        engine.remove(sid)
