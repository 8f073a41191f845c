"""Per-user volumes: real loop-mounted ext4 filesystems, real Docker volumes, real sandboxes."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from execbox import Executor, InvalidRequestError
from execbox.volumes import VolumeManager

pytestmark = pytest.mark.docker


def run(ex: Executor, code: str, user: str, language: str = "bash") -> tuple[str, str, int]:
    r = ex.execute(code, language=language, user_id=user, volume=True, tenant=ex._test_tenant)  # type: ignore[attr-defined]
    return r.stdout, r.stderr, r.exit_code


def test_files_persist_for_the_user_only(vex: Executor) -> None:
    assert run(vex, "echo hello > /data/note.txt; id -u", "alice")[2] == 0
    out, _, _ = run(vex, "require('fs').readdirSync('/data').forEach(f => console.log(f))", "alice", "javascript")
    assert out == "note.txt\n"
    assert run(vex, "cat /data/note.txt; id -u", "alice")[0].startswith("hello\n")
    # Another user gets an empty volume of their own; nothing of alice's is reachable.
    out, _, _ = run(vex, "ls -A /data; cat /proc/mounts | grep -c ' /data '", "bob")
    assert out == "1\n"
    # A run without volume=True has no /data at all.
    r = vex.execute("ls /data 2>&1; echo rc=$?", language="bash", user_id="alice")
    assert "No such file or directory" in r.stdout


def test_same_uid_for_a_user_different_between_users(vex: Executor) -> None:
    a1 = run(vex, "id -u", "alice")[0]
    a2 = run(vex, "id -u", "alice")[0]
    b = run(vex, "id -u", "bob")[0]
    assert a1 == a2 != b and int(a1) != 0


def test_quota_is_enforced_inside_the_sandbox(vex: Executor) -> None:
    out, _, _ = run(vex, "dd if=/dev/zero of=/data/big bs=1M count=64 2>&1; echo rc=$?", "alice")
    assert "No space left on device" in out and "rc=1" in out
    # Another user's volume is unaffected.
    out, _, _ = run(vex, "dd if=/dev/zero of=/data/f bs=1M count=4 2>&1 >/dev/null; echo rc=$?", "bob")
    assert out.strip().endswith("rc=0")


def test_export_import_round_trip(vex: Executor) -> None:
    tenant = vex._test_tenant  # type: ignore[attr-defined]
    run(vex, "mkdir -p /data/d && echo one > /data/d/a.txt && ln -s d/a.txt /data/link", "alice")
    data = vex.volumes.export_tar(tenant, "alice")
    names = sorted(tarfile.open(fileobj=io.BytesIO(data)).getnames())
    assert names == ["d", "d/a.txt", "link"]
    assert vex.volumes.import_tar(tenant, "carol", data) == 3
    out, _, _ = run(vex, "cat /data/d/a.txt; readlink /data/link; stat -c %u /data/d/a.txt; id -u", "carol")
    lines = out.split()
    assert lines[:2] == ["one", "d/a.txt"] and lines[2] == lines[3]  # owned by carol's UID


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if content else None)
    return buf.getvalue()


def _file(name: str, content: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info, content


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


@pytest.mark.parametrize(
    "members",
    [
        [_file("../escape.txt")],
        [_file("/abs.txt")],
        [_link("out", "/etc"), _file("out/evil.txt")],
        [_link("hard", "/etc/passwd", tarfile.LNKTYPE)],
    ],
)
def test_hostile_imports_are_refused(vex: Executor, tmp_path: Path, members: list) -> None:
    tenant = vex._test_tenant  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError):
        vex.volumes.import_tar(tenant, "mallory", _tar(*members))
    assert not (vex.volumes.root / "escape.txt").exists() and not Path("/abs.txt").exists()
    assert not Path("/etc/evil.txt").exists()


def test_delete_and_expiry(vex: Executor) -> None:
    tenant = vex._test_tenant  # type: ignore[attr-defined]
    run(vex, "echo x > /data/x", "alice")
    assert vex.volumes.delete(tenant, "alice")
    assert run(vex, "ls -A /data", "alice")[0] == ""  # a new, empty volume
    vol = vex.volumes.volume_for(tenant, "alice")
    os.utime(vol.image, (time.time() - 7200, time.time() - 7200))
    assert vex.volumes.expire(3600) == [vol.name]
    assert not vol.image.exists() and not os.path.ismount(vol.mount)
    # The reaper pass does the same with the configured idle time.
    run(vex, "echo y > /data/y", "dave")
    dave = vex.volumes.volume_for(tenant, "dave")
    os.utime(dave.image, (0, 0))
    assert vex.housekeep()["volumes"] == 1 and not dave.image.exists()


@pytest.mark.parametrize("bad", ["../alice", "a/b", "..", ""])
def test_user_ids_cannot_traverse(vex: Executor, bad: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        vex.execute("ls /data", language="bash", user_id=bad, volume=True)
    assert info.value.field == "user_id"
    with pytest.raises(InvalidRequestError):
        VolumeManager.volume_for(vex.volumes, "t", bad)


def test_volume_needs_a_user(vex: Executor) -> None:
    with pytest.raises(InvalidRequestError) as info:
        vex.execute("ls", language="bash", volume=True)
    assert info.value.field == "user_id"
