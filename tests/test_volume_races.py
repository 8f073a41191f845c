"""A running job working against the host through its volume: raced symlinks in backup and
restore, and UIDs shared between users (kernel budgets per UID). Real volumes, real sandboxes.

The race: a run swaps an entry of its volume with a symlink to a host path
(``renameat2(RENAME_EXCHANGE)`` in a loop) while the host backs the volume up or
restores it. The host must never read or modify the host path.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from execbox import Executor, InvalidRequestError
from execbox.exceptions import VolumeBusyError
from execbox.models import ExecutionResult
from execbox.volume_io import export_volume, import_volume
from execbox.volumes import UID_BASE, UID_COUNT

pytestmark = pytest.mark.docker

RACER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE, AT_FDCWD = 2, -100
a, b, target, kind = sys.argv[1:5]
def fresh():
    # Recreate what a restore deleted: `a` a real entry, `b` a symlink to a host path.
    if not os.path.lexists(a):
        os.mkdir(a) if kind == "dir" else open(a, "w").write("m" * 31 + "\n")  # as long as the secret
    if not os.path.lexists(b):
        os.symlink(target, b)
print("racing", flush=True)
swaps, end = 0, time.monotonic() + float(sys.argv[5])
while time.monotonic() < end:
    try:
        fresh()
        if libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) == 0:
            swaps += 1
    except OSError:
        pass
print("swaps", swaps)
"""


def _tenant(ex: Executor) -> str:
    return ex._test_tenant  # type: ignore[attr-defined,no-any-return]


def _while_racing(ex: Executor, user: str, argv: list[str], seconds: float, during: Callable[[], None]) -> str:
    """Run the racer in ``user``'s volume run; call ``during`` once it races; return its output."""
    started = threading.Event()
    out: dict[str, ExecutionResult] = {}

    def race() -> None:
        out["r"] = ex.execute(
            'cd /data && python3 -c "$RACER" ' + " ".join(argv) + f" {seconds}",
            language="bash",
            env={"RACER": RACER},
            user_id=user,
            volume=True,
            tenant=_tenant(ex),
            timeout=seconds + 20,
            on_output=lambda s, c: started.set(),
        )

    t = threading.Thread(target=race)
    t.start()
    try:
        assert started.wait(30), "the racer did not start"
        during()
    finally:
        t.join()
    r = out["r"]
    assert r.exit_code == 0, r.stderr
    return r.stdout


def _names_and_contents(data: bytes) -> dict[str, bytes | str]:
    got: dict[str, bytes | str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m) if m.isfile() else None
            got[m.name] = f.read() if f is not None else f"link:{m.linkname}"
    return got


@pytest.fixture
def host_secret(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    secret = tmp_path / "host-only-secret"
    token = uuid.uuid4().hex.encode()  # 32 bytes, like the racer's own file: a swap would copy all of it
    secret.write_bytes(token)
    yield secret, token


def test_backup_is_refused_while_a_run_holds_the_volume(vex: Executor, host_secret: tuple[Path, bytes]) -> None:
    secret, token = host_secret
    vex.execute("rm -f /data/f", language="bash", user_id="racer", volume=True, tenant=_tenant(vex))
    outcomes: list[str] = []

    def export_repeatedly() -> None:
        for _ in range(30):
            try:
                data = vex.volumes.export_tar(_tenant(vex), "racer")
            except VolumeBusyError:
                outcomes.append("busy")
                continue
            assert token not in data, "a host file went into the backup"
            outcomes.append("exported")

    _while_racing(vex, "racer", ["f", "g", str(secret), "file"], 4, export_repeatedly)
    assert outcomes == ["busy"] * 30
    # Once the run is over the backup works, and holds the user's own files only.
    got = _names_and_contents(vex.volumes.export_tar(_tenant(vex), "racer"))
    assert token not in b"".join(v for v in got.values() if isinstance(v, bytes))
    assert sorted(got) == ["f", "g"] and f"link:{secret}" in got.values()


def test_backup_in_a_sandbox_never_follows_a_raced_symlink(vex: Executor, host_secret: tuple[Path, bytes]) -> None:
    """Even were the exclusion bypassed, the tar runs where the symlink points into the sandbox."""
    secret, token = host_secret
    vol = vex.volumes.ensure(_tenant(vex), "racer")
    assert vol.uid is not None
    exports: list[bytes] = []

    def export_repeatedly() -> None:
        for _ in range(15):
            exports.append(export_volume(vex.engine, vex.volumes.image, vol.name, vol.uid, 1 << 24))  # type: ignore[arg-type]

    out = _while_racing(vex, "racer", ["f", "g", str(secret), "file"], 6, export_repeatedly)
    assert int(out.split()[-1]) > 1000  # it really raced
    assert len(exports) == 15 and all(token not in data for data in exports)
    # Each backup holds the volume's own entries only (one may be skipped when it kept changing).
    assert all(set(_names_and_contents(data)) <= {"f", "g"} for data in exports)
    assert any(len(_names_and_contents(data)) == 2 for data in exports)


def test_restore_never_touches_a_host_directory_through_a_raced_symlink(vex: Executor, tmp_path: Path) -> None:
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    os.utime(host_dir, (1_000_000_000, 1_000_000_000))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo("d")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_234_567_890
        tar.addfile(d)
        f = tarfile.TarInfo("d/x")
        f.size = 1
        tar.addfile(f, io.BytesIO(b"x"))
    archive = buf.getvalue()
    vol = vex.volumes.ensure(_tenant(vex), "racer")
    refused: list[bool] = []

    def restore_repeatedly() -> None:
        for _ in range(10):
            try:
                vex.volumes.import_tar(_tenant(vex), "racer", archive)
                refused.append(False)
            except VolumeBusyError:
                refused.append(True)
        for _ in range(10):  # and past the exclusion, straight into a sandbox (the racer may spoil a restore)
            try:
                import_volume(vex.engine, vex.volumes.image, vol.name, vol.uid, archive)  # type: ignore[arg-type]
            except InvalidRequestError:
                pass

    _while_racing(vex, "racer", ["d", "e", str(host_dir), "dir"], 6, restore_repeatedly)
    assert refused == [True] * 10
    st = host_dir.stat()
    assert (st.st_mtime, st.st_uid, sorted(os.listdir(host_dir))) == (1_000_000_000, 0, [])


# -- UIDs ---------------------------------------------------------------------------------------------


def _legacy_uid(tenant: str, user: str) -> int:
    """The UID a volume got before UIDs were leased: a hash of the names."""
    digest = hashlib.sha256(f"{tenant}\0{user}".encode()).hexdigest()
    return UID_BASE + int(digest[32:40], 16) % UID_COUNT


def _colliding_users(tenant: str) -> tuple[str, str]:
    """Two user ids whose hash-derived UIDs were equal (a birthday search: ~1000 ids)."""
    seen: dict[int, str] = {}
    for i in range(100_000):
        user = f"user-{i}"
        uid = _legacy_uid(tenant, user)
        if uid in seen:
            return seen[uid], user
        seen[uid] = user
    raise AssertionError("no collision found")


def test_volume_uids_are_unique_across_many_users(vex: Executor) -> None:
    tenant = _tenant(vex)
    a, b = _colliding_users(tenant)
    users = [a, b, *(f"u{i}" for i in range(30))]
    uids = [vex.volumes.ensure(tenant, u).uid for u in users]
    assert len(set(uids)) == len(users)
    # Stable: the same user keeps their UID, and it is leased to their volume.
    assert vex.volumes.ensure(tenant, a).uid == uids[0]
    holder = vex.volumes.uids.holder(uids[0])  # type: ignore[arg-type]
    assert holder == vex.volumes.volume_for(tenant, a).holder


def test_per_uid_budget_is_not_shared_between_two_users_volume_runs(vex: Executor) -> None:
    """One user holding 100 processes must not make another user's fork() fail (RLIMIT_NPROC is per UID)."""
    tenant = _tenant(vex)
    a, b = _colliding_users(tenant)
    hold = "for i in $(seq 100); do sleep 6 & done; echo holding; wait"
    started = threading.Event()
    results: dict[str, ExecutionResult] = {}

    def holder() -> None:
        results["a"] = vex.execute(
            hold, language="bash", user_id=a, volume=True, tenant=tenant, on_output=lambda s, c: started.set()
        )

    t = threading.Thread(target=holder)
    t.start()
    assert started.wait(30)
    fork = "import os\nkids = []\nfor _ in range(100):\n    kids.append(os.fork() or os._exit(0))\nprint(len(kids))"
    other = vex.execute(fork, language="python", user_id=b, volume=True, tenant=tenant)
    t.join()
    assert results["a"].stdout.startswith("holding"), results["a"].stderr
    assert (other.stdout, other.exit_code) == ("100\n", 0), other.stderr
