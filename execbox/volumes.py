"""Per-user persistent volumes with a real size quota (the seed's Option 2, made safe).

Each (tenant, user) gets one ext4 filesystem in a sparse image file of exactly the
quota's size, loop-mounted on the host under the data directory and exposed to
Docker as a named volume (local driver, bind of that mount). A write past the
quota fails inside the sandbox with ENOSPC, and only that user's filesystem is
full. Names are a hash of (tenant, user): they cannot collide or be traversed,
and a run only ever gets the volume of the user it runs for, mounted at /data.

Files in a volume must stay usable from run to run, so runs with a volume use
one stable UID per user (derived from the same hash) instead of a fresh one; the
filesystem's root belongs to that UID.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .exceptions import ConfigurationError, EngineError, ExecboxError, InvalidRequestError
from .labels import KIND, MANAGED
from .state.base import check_id

__all__ = ["Volume", "VolumeBusyError", "VolumeManager"]

log = logging.getLogger("execbox.volumes")

UID_BASE = 600_000  # above the per-run UID range (100000-199999 by default)
UID_COUNT = 300_000
MOUNT_POINT = "/data"


class VolumeBusyError(ExecboxError):
    """The volume is in use by a running sandbox."""


@dataclass(frozen=True)
class Volume:
    name: str  # Docker volume name
    uid: int
    tenant: str
    user: str
    image: Path
    mount: Path


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EngineError(f"{cmd[0]} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")


class VolumeManager:
    """Creates, mounts, exports, imports, expires and deletes per-user volumes (needs root)."""

    def __init__(self, api: Any, root: str | Path = "/var/lib/execbox/volumes", quota: int = 256 << 20) -> None:
        self.api = api  # docker APIClient
        self.root = Path(root)
        self.quota = quota
        self._lock = threading.Lock()
        if os.geteuid() != 0:
            raise ConfigurationError("per-user volumes need root (loop-mounted filesystems)")
        for sub in ("images", "mnt", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- naming ---------------------------------------------------------------------------

    def volume_for(self, tenant: str, user: str) -> Volume:
        check_id("tenant", tenant)
        check_id("user_id", user)
        digest = hashlib.sha256(f"{tenant}\0{user}".encode()).hexdigest()
        key = digest[:32]
        return Volume(
            name=f"execbox-vol-{key}",
            uid=UID_BASE + int(digest[32:40], 16) % UID_COUNT,
            tenant=tenant,
            user=user,
            image=self.root / "images" / f"{key}.ext4",
            mount=self.root / "mnt" / key,
        )

    @contextmanager
    def _locked(self, vol: Volume) -> Iterator[None]:
        # Across threads and processes (service replicas on one host).
        with self._lock, open(self.root / "locks" / f"{vol.name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- lifecycle ------------------------------------------------------------------------

    def ensure(self, tenant: str, user: str) -> Volume:
        """The user's volume, created and mounted if needed; marks it used now."""
        vol = self.volume_for(tenant, user)
        with self._locked(vol):
            if not vol.image.exists():
                self._create_fs(vol)
            self._mount(vol)
            self._docker_volume(vol)
            os.utime(vol.image)  # last use, for expiry
        return vol

    def _create_fs(self, vol: Volume) -> None:
        tmp = vol.image.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.truncate(self.quota)  # sparse: costs only what is written
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                f"root_owner={vol.uid}:{vol.uid}",
                "-L",
                "execbox",
                str(tmp),
            ]
        )
        tmp.rename(vol.image)
        log.info("created volume %s (%d bytes) for tenant %s", vol.name, self.quota, vol.tenant)

    def _mount(self, vol: Volume) -> None:
        vol.mount.mkdir(mode=0o700, exist_ok=True)
        if not os.path.ismount(vol.mount):
            _run(["mount", "-o", "loop,nosuid,nodev", str(vol.image), str(vol.mount)])
        lost = vol.mount / "lost+found"
        if lost.exists():
            shutil.rmtree(lost, ignore_errors=True)
        os.chmod(vol.mount, 0o700)
        os.chown(vol.mount, vol.uid, vol.uid)

    def _docker_volume(self, vol: Volume) -> None:
        try:
            self.api.inspect_volume(vol.name)
            return
        except Exception:
            pass
        self.api.create_volume(
            name=vol.name,
            driver="local",
            driver_opts={"type": "none", "o": "bind", "device": str(vol.mount)},
            labels={MANAGED: "1", KIND: "volume", "execbox.tenant": vol.tenant, "execbox.user": vol.user},
        )

    def delete(self, tenant: str, user: str) -> bool:
        """Remove the user's volume and its data now; VolumeBusyError while a run uses it."""
        vol = self.volume_for(tenant, user)
        with self._locked(vol):
            return self._delete(vol)

    def _delete(self, vol: Volume) -> bool:
        existed = vol.image.exists()
        try:
            self.api.remove_volume(vol.name)
        except Exception as exc:
            text = str(exc).lower()
            if "in use" in text:
                raise VolumeBusyError(f"the volume of {vol.user!r} is in use by a running sandbox") from exc
            if "no such volume" not in text and "not found" not in text:
                raise EngineError(f"remove volume: {exc}") from exc
        if os.path.ismount(vol.mount):
            _run(["umount", str(vol.mount)])
        if vol.mount.exists():
            vol.mount.rmdir()
        vol.image.unlink(missing_ok=True)
        return existed

    def expire(self, max_idle: float) -> list[str]:
        """Delete volumes unused for ``max_idle`` seconds; return their names."""
        removed = []
        now = time.time()
        for img in (self.root / "images").glob("*.ext4"):
            if now - img.stat().st_mtime <= max_idle:
                continue
            key = img.stem
            labels = self._labels(f"execbox-vol-{key}")
            vol = (
                self.volume_for(labels["execbox.tenant"], labels["execbox.user"])
                if labels
                else Volume(f"execbox-vol-{key}", 0, "", "", img, self.root / "mnt" / key)
            )
            try:
                with self._locked(vol):
                    self._delete(vol)
                removed.append(vol.name)
            except VolumeBusyError:
                continue
        return removed

    def _labels(self, name: str) -> dict[str, str]:
        try:
            return dict(self.api.inspect_volume(name).get("Labels") or {})
        except Exception:
            return {}

    # -- backup -----------------------------------------------------------------------------

    def export_tar(self, tenant: str, user: str) -> bytes:
        """The volume's files as a tar archive (empty archive if the user has no volume)."""
        vol = self.volume_for(tenant, user)
        buf = io.BytesIO()
        with self._locked(vol), tarfile.open(fileobj=buf, mode="w") as tar:
            if vol.image.exists():
                self._mount(vol)
                for entry in sorted(vol.mount.iterdir()):
                    tar.add(entry, arcname=entry.name)  # symlinks are stored as links, not followed
        return buf.getvalue()

    def import_tar(self, tenant: str, user: str, data: bytes) -> int:
        """Replace the volume's files with a tar archive's; return the number of entries.

        Absolute paths, '..', links out of the volume and device files are refused
        (tarfile's 'data' filter); everything is owned by the user's volume UID.
        """
        try:
            tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        except tarfile.TarError as exc:
            raise InvalidRequestError("body", f"not a tar archive: {exc}") from None
        with tar:
            members = tar.getmembers()
        for m in members:
            parts = m.name.split("/")
            if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise InvalidRequestError("body", f"archive refused: entry {m.name!r} is not allowed")
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        vol = self.ensure(tenant, user)
        with self._locked(vol), tar:
            for child in vol.mount.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            try:
                tar.extractall(vol.mount, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise InvalidRequestError("body", f"archive refused: {exc}") from None
            for dirpath, dirnames, filenames in os.walk(vol.mount):
                for name in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, name), vol.uid, vol.uid)
        return len(members)
