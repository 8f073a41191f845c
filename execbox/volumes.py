"""Per-user persistent volumes with a real size quota (the seed's Option 2, made safe).

Each (tenant, user) gets one ext4 filesystem in a sparse image file of exactly the
quota's size, loop-mounted on the host under the data directory and exposed to
the engine as a named volume (a bind of that mount). A write past the quota fails
inside the sandbox with ENOSPC, and only that user's filesystem is full. Names are
a hash of (tenant, user): they cannot collide or be traversed, and a run only ever
gets the volume of the user it runs for, mounted at /data.

Files in a volume must stay usable from run to run, so runs with a volume use
one stable UID per volume instead of a fresh one; the filesystem's root belongs
to it. That UID is leased from the UID registry (``execbox.uids``) for as long as
the volume exists, so no other volume, run or session shares it (a UID derived
from a hash could be shared: two user ids collide after about a thousand).

The host never walks or writes the files of a volume by path: backup and restore
run in a sandbox (``execbox.volume_io``), and neither runs while a run holds the
volume (a shared lock per volume, held by each run, and the engine's view of
running sandboxes that mount it, for a crashed holder's leftovers).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import logging
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .engine.base import Engine
from .exceptions import ConfigurationError, EngineError, VolumeBusyError
from .images import default_image
from .labels import KIND, MANAGED
from .state.base import check_id
from .uids import UidLease, UidRegistry, host_store
from .volume_io import check_archive, export_volume, import_volume

__all__ = ["Volume", "VolumeBusyError", "VolumeManager"]

log = logging.getLogger("execbox.volumes")

UID_BASE = 600_000  # above the per-run and per-session UID ranges (100000-299999 by default)
UID_COUNT = 300_000
MOUNT_POINT = "/data"
USE_WAIT = 30.0  # how long a run waits for a backup/restore of its volume to finish


@dataclass(frozen=True)
class Volume:
    name: str  # the engine's volume name
    key: str
    tenant: str
    user: str
    image: Path
    mount: Path
    uid: int | None = None  # known once the volume exists (``ensure``)

    @property
    def holder(self) -> str:
        """The holder of this volume's UID lease."""
        return f"volume:{self.key}"


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EngineError(f"{cmd[0]} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")


class VolumeManager:
    """Creates, mounts, exports, imports, expires and deletes per-user volumes (needs root)."""

    def __init__(
        self,
        engine: Engine,
        root: str | Path = "/var/lib/execbox/volumes",
        quota: int = 256 << 20,
        *,
        uids: UidRegistry | None = None,
        max_idle: float = 30 * 86400,
        image: str | None = None,
    ) -> None:
        self.engine = engine
        self.root = Path(root)
        self.quota = quota
        self.image = image or default_image()  # runs backups and restores
        # A volume idle past max_idle is removed by the reaper; its lease outlives that.
        self.lease_ttl = max_idle + 86400
        if os.geteuid() != 0:
            raise ConfigurationError("per-user volumes need root (loop-mounted filesystems)")
        for sub in ("images", "mnt", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.uids = uids if uids is not None else UidRegistry(host_store(self.root), UID_BASE, UID_COUNT)

    # -- naming ---------------------------------------------------------------------------

    def volume_for(self, tenant: str, user: str) -> Volume:
        """The names of the user's volume (its UID is known once it exists: ``ensure``)."""
        check_id("tenant", tenant)
        check_id("user_id", user)
        key = hashlib.sha256(f"{tenant}\0{user}".encode()).hexdigest()[:32]
        return self._from_key(key, tenant, user)

    def _from_key(self, key: str, tenant: str = "", user: str = "") -> Volume:
        return Volume(
            name=f"execbox-vol-{key}",
            key=key,
            tenant=tenant,
            user=user,
            image=self.root / "images" / f"{key}.ext4",
            mount=self.root / "mnt" / key,
        )

    def _uid_file(self, vol: Volume) -> Path:
        return self.root / "images" / f"{vol.key}.uid"

    @contextmanager
    def _locked(self, vol: Volume) -> Iterator[None]:
        # One open file description per holder: flock excludes threads and processes alike.
        with open(self.root / "locks" / f"{vol.name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    @contextmanager
    def in_use(self, vol: Volume) -> Iterator[None]:
        """Held by each run of the volume (shared): backup, restore and delete wait for none."""
        with open(self.root / "locks" / f"{vol.name}.use", "a") as fh:
            deadline = time.monotonic() + USE_WAIT
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise VolumeBusyError(f"the volume of {vol.user!r} is being backed up or restored") from None
                    time.sleep(0.05)
            yield

    @contextmanager
    def _exclusive(self, vol: Volume) -> Iterator[None]:
        """No run holds the volume, and none starts until the block ends; VolumeBusyError otherwise."""
        with open(self.root / "locks" / f"{vol.name}.use", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise VolumeBusyError(f"the volume of {vol.user!r} is in use by a running sandbox") from None
            # A crashed process's sandbox may still run (until the reaper removes it).
            if self.engine.volume_in_use(vol.name):
                raise VolumeBusyError(f"the volume of {vol.user!r} is in use by a running sandbox")
            yield

    # -- lifecycle ------------------------------------------------------------------------

    def ensure(self, tenant: str, user: str) -> Volume:
        """The user's volume, created and mounted if needed, with its UID; marks it used now."""
        vol = self.volume_for(tenant, user)
        with self._locked(vol):
            vol = self._prepare(vol)
        return vol

    def _prepare(self, vol: Volume) -> Volume:
        """Under the volume's lock: create or mount it, lease its UID, mark it used."""
        if not vol.image.exists():
            lease = self.uids.lease(self.lease_ttl, holder=vol.holder)
            vol = dataclasses.replace(vol, uid=lease.uid)
            self._create_fs(vol)
        else:
            vol = dataclasses.replace(vol, uid=self._lease_existing(vol))
            self._mount(vol)
        self.engine.ensure_volume(
            vol.name,
            str(vol.mount),
            {MANAGED: "1", KIND: "volume", "execbox.tenant": vol.tenant, "execbox.user": vol.user},
        )
        os.utime(vol.image)  # last use, for expiry
        return vol

    def _lease_existing(self, vol: Volume) -> int:
        """The UID of an existing volume, its lease renewed; a fresh one if another holds it."""
        try:
            uid = int(self._uid_file(vol).read_text())
        except FileNotFoundError:
            # Made before UIDs were leased: its UID came from the hash of its names.
            digest = hashlib.sha256(f"{vol.tenant}\0{vol.user}".encode()).hexdigest()
            uid = UID_BASE + int(digest[32:40], 16) % UID_COUNT
        if self.uids.claim(uid, vol.holder, self.lease_ttl):
            self._write_uid(vol, uid)
            return uid
        # Another volume holds it (a pre-lease collision, or a lost lease table): move this one.
        new = self.uids.lease(self.lease_ttl, holder=vol.holder).uid
        self._mount(vol)
        with self._exclusive(vol):
            self._reown(vol, new)
        self._write_uid(vol, new)
        log.warning("volume %s moved from UID %d (held by %s) to %d", vol.name, uid, self.uids.holder(uid), new)
        return new

    def _write_uid(self, vol: Volume, uid: int) -> None:
        path = self._uid_file(vol)
        if path.exists() and path.read_text() == str(uid):
            return
        tmp = path.with_suffix(".uid.tmp")
        tmp.write_text(str(uid))
        tmp.rename(path)

    def _reown(self, vol: Volume, uid: int) -> None:
        """Give every file of the (mounted, unused) volume to ``uid``: fd-relative, never following a link."""
        top = os.open(vol.mount, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchown(top, uid, uid)
            for _, dirs, files, dirfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                for name in dirs + files:
                    os.chown(name, uid, uid, dir_fd=dirfd, follow_symlinks=False)
        finally:
            os.close(top)

    def _create_fs(self, vol: Volume) -> None:
        assert vol.uid is not None
        tmp = vol.image.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.truncate(self.quota)  # sparse: costs only what is written
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", f"root_owner={vol.uid}:{vol.uid}", "-L", "execbox", str(tmp)])
        self._write_uid(vol, vol.uid)
        tmp.rename(vol.image)
        self._mount(vol)
        # Still private to us (no sandbox has seen it): an empty root for the user.
        os.rmdir(vol.mount / "lost+found")
        os.chmod(vol.mount, 0o700)
        log.info("created volume %s (%d bytes, UID %d) for tenant %s", vol.name, self.quota, vol.uid, vol.tenant)

    def _mount(self, vol: Volume) -> None:
        vol.mount.mkdir(mode=0o700, exist_ok=True)
        if not os.path.ismount(vol.mount):
            _run(["mount", "-o", "loop,nosuid,nodev", str(vol.image), str(vol.mount)])

    def delete(self, tenant: str, user: str) -> bool:
        """Remove the user's volume and its data now; VolumeBusyError while a run uses it."""
        vol = self.volume_for(tenant, user)
        with self._locked(vol), self._exclusive(vol):
            return self._delete(vol)

    def _delete(self, vol: Volume) -> bool:
        existed = vol.image.exists()
        self.engine.remove_volume(vol.name)
        if os.path.ismount(vol.mount):
            _run(["umount", str(vol.mount)])
        if vol.mount.exists():
            vol.mount.rmdir()
        vol.image.unlink(missing_ok=True)
        uid_file = self._uid_file(vol)
        if uid_file.exists():
            uid = int(uid_file.read_text())
            self.uids.release(UidLease(uid, vol.holder))
            uid_file.unlink()
        return existed

    def expire(self, max_idle: float) -> list[str]:
        """Delete volumes unused for ``max_idle`` seconds; return their names."""
        removed = []
        now = time.time()
        for img in (self.root / "images").glob("*.ext4"):
            if now - img.stat().st_mtime <= max_idle:
                continue
            vol = self._from_key(img.stem)
            try:
                with self._locked(vol), self._exclusive(vol):
                    self._delete(vol)
                removed.append(vol.name)
            except VolumeBusyError:
                continue
        return removed

    # -- backup -----------------------------------------------------------------------------

    def export_tar(self, tenant: str, user: str) -> bytes:
        """The volume's files as a tar archive (empty archive if the user has no volume)."""
        vol = self.volume_for(tenant, user)
        with self._locked(vol):
            if not vol.image.exists():
                buf = io.BytesIO()
                tarfile.open(fileobj=buf, mode="w").close()
                return buf.getvalue()
            vol = self._prepare(vol)
            assert vol.uid is not None
            with self._exclusive(vol):
                # Headers (with long names) cost up to ~1.5 KiB per file; the filesystem has one inode per 4 KiB.
                return export_volume(self.engine, self.image, vol.name, vol.uid, self.quota * 3 // 2 + (1 << 20))

    def import_tar(self, tenant: str, user: str, data: bytes) -> int:
        """Replace the volume's files with a tar archive's; return the number of entries.

        Absolute paths, '..', links out of the volume and device files are refused
        (tarfile's 'data' filter, in memory); the files are written by a sandbox
        running as the volume's UID, so they belong to it.
        """
        members = check_archive(data)
        vol = self.volume_for(tenant, user)
        with self._locked(vol):
            vol = self._prepare(vol)
            assert vol.uid is not None
            with self._exclusive(vol):
                import_volume(self.engine, self.image, vol.name, vol.uid, data)
        return len(members)
