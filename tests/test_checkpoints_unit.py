"""A checkpoint's files kept beside the container (execbox/engine/_checkpoints.py), on a
directory tree laid out as dockerd's: ``containers/<id>/checkpoints/<name>``. The restore
through the links runs in tests/test_sessions_pause.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from execbox.engine import _checkpoints


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "containers" / ("a" * 64) / "checkpoints" / "execbox"
    path.mkdir(parents=True)
    (path / "checkpoint.img").write_bytes(b"x" * 10_000)
    return path


def test_the_files_move_beside_the_container_and_are_linked_back(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    before = _checkpoints.size(path)
    assert _checkpoints.set_aside(path)
    aside = path.parent.parent / "execbox-checkpoint-execbox"
    assert _checkpoints.aside_dir(path) == aside
    link = path / "checkpoint.img"
    assert link.is_symlink() and link.resolve() == aside / "checkpoint.img"
    assert link.read_bytes() == b"x" * 10_000  # readable through the link, as runsc reads it
    assert _checkpoints.size(path) == before >= 10_000  # the file kept aside is counted
    assert not _checkpoints.set_aside(path)  # only links left: nothing to move
    _checkpoints.forget(path)
    assert not aside.exists()


def test_a_move_that_fails_leaves_the_checkpoint_as_it_was(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    (path / "second.img").write_bytes(b"y" * 100)
    blocker = path.parent.parent / "execbox-checkpoint-execbox"
    blocker.write_text("not a directory")  # the aside directory cannot be made
    assert not _checkpoints.set_aside(path)
    files = sorted(path.iterdir())
    assert [f.name for f in files] == ["checkpoint.img", "second.img"]
    assert not any(f.is_symlink() for f in files)
    assert (path / "checkpoint.img").read_bytes() == b"x" * 10_000


def test_an_empty_checkpoint_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "containers" / "b" / "checkpoints" / "execbox"
    path.mkdir(parents=True)
    assert not _checkpoints.set_aside(path)
    assert not _checkpoints.aside_dir(path).exists()
    assert _checkpoints.size(path) == 0


def test_a_move_failing_halfway_puts_back_what_was_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _checkpoint(tmp_path)
    (path / "second.img").write_bytes(b"y" * 100)
    real = os.symlink
    calls: list[str] = []

    def symlink(src: Path, dst: Path) -> None:
        calls.append(str(dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(_checkpoints.os, "symlink", symlink)
    assert not _checkpoints.set_aside(path)
    assert len(calls) == 2
    names = sorted((f.name, f.is_symlink()) for f in path.iterdir())
    assert names == [("checkpoint.img", False), ("second.img", False)]
    assert (path / "checkpoint.img").read_bytes() == b"x" * 10_000 and (path / "second.img").read_bytes() == b"y" * 100
