"""Checkpoints of Docker containers (gVisor sessions paused to disk): the part of
``DockerEngine`` that checkpoints and restores a sandbox through dockerd, works around the
engine's faults on the way (``runsc.py``), keeps the image beside the container
(``_checkpoints.py``), and leaves the tidying for after, off the caller's path."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker
import requests.exceptions

from ..exceptions import EngineError
from . import _checkpoints, runsc
from ._docker import translate
from .base import Channel

__all__ = ["DockerCheckpoints"]

log = logging.getLogger("execbox.engine.docker")


class DockerCheckpoints:
    """Mixed into ``DockerEngine``: checkpoint, restore and where checkpoints live."""

    api: docker.APIClient
    _root: Path | None  # the engine's data root, once asked
    _behind: dict[str, threading.Thread]  # a sandbox's tidying left after a restore

    def attach(self, sandbox_id: str) -> Channel:
        raise NotImplementedError  # DockerEngine's

    def checkpoint(self, sandbox_id: str, name: str) -> None:
        self._catch_up(sandbox_id)  # the previous checkpoint of the same name is being deleted
        with translate(f"checkpoint {sandbox_id[:12]}"):
            res = self.api._post_json(
                self.api._url("/containers/{0}/checkpoints", sandbox_id), data={"CheckpointID": name, "Exit": True}
            )
            self.api._raise_for_status(res)
        # The answer comes before dockerd has handled the sandbox's exit: until then it reports the
        # container running and paused (runsc pauses it to save it), and a start is refused ("cannot
        # start a paused container"; seen once in 15 cycles). Return once it has stopped.
        try:
            with translate(f"wait for {sandbox_id[:12]} to stop"):
                self.api.wait(sandbox_id, timeout=30, condition="not-running")
        except requests.exceptions.ReadTimeout:
            log.warning("checkpointed sandbox %s still reported running after 30 s", sandbox_id[:12])
        path = self.checkpoint_dir(sandbox_id, name)
        if path is not None and path.is_dir():
            _checkpoints.set_aside(path)  # the restore then skips containerd's copy (see _checkpoints.py)
        # Else the next start does it (see runsc.py). On the pause's path (`ctr`, p50 61 ms): left
        # in the background, a resume at once waited for it and took longer (p50 +80-90 ms).
        runsc.delete_stale_task(sandbox_id)

    def checkpoint_size(self, sandbox_id: str, name: str) -> int | None:
        # Docker 20.10 keeps checkpoints in the container's own directory (a custom directory is
        # refused at start: "custom checkpointdir is not supported", moby#37344), so they go with
        # the container. Measurable only where this process sees the engine's data root.
        path = self.checkpoint_dir(sandbox_id, name)
        if path is None or not path.is_dir():
            return None
        return _checkpoints.size(path)

    def checkpoint_dir(self, sandbox_id: str, name: str) -> Path | None:
        """Where checkpoint ``name`` of the sandbox lives (None: the engine's data root is not local)."""
        if self._root is None:
            with translate("engine info"):
                self._root = Path(str(self.api.info().get("DockerRootDir") or "/var/lib/docker"))
        if not (self._root / "containers").is_dir():
            return None
        return self._root / "containers" / self._full_id(sandbox_id) / "checkpoints" / name

    def _full_id(self, sandbox_id: str) -> str:
        """The sandbox's full id (the engine's paths and cgroups name it so)."""
        if len(sandbox_id) == 64:
            return sandbox_id
        with translate(f"inspect {sandbox_id[:12]}"):
            return str(self.api.inspect_container(sandbox_id)["Id"])

    def restore(self, sandbox_id: str, name: str, *, attach: bool = False) -> Channel | None:
        # runsc 20221219 leaves a restored container that was checkpointed again recorded as
        # "paused": its next restore would fail with "id already in use" (see runsc.py). Clear
        # that record first. Two containerd races remain, both gone within moments: right after
        # a checkpoint it may still hold the stopped task ("id already in use" too), and a
        # retried upload of the same checkpoint blob may meet the previous attempt's copy not yet
        # deleted ("commit failed: content sha256:...: already exists", moby#42900). Retry those
        # with a growing pause. dockerd ends the streams attached to a start that failed: each
        # try gets its own.
        self._catch_up(sandbox_id)
        runsc.clear_stale_state(sandbox_id)
        deadline = time.monotonic() + 20.0
        pause = 0.05
        while True:
            channel = self.attach(sandbox_id) if attach else None
            try:
                with translate(f"restore {sandbox_id[:12]}"):
                    res = self.api._post(
                        self.api._url("/containers/{0}/start", sandbox_id), params={"checkpoint": name}
                    )
                    self.api._raise_for_status(res)
                break
            except BaseException as exc:
                if channel is not None:
                    channel.close()
                if not isinstance(exc, EngineError) or not _checkpoints.transient_restore_error(str(exc)):
                    raise
                if time.monotonic() > deadline:
                    raise
                log.info("restore of %s retried: %s", sandbox_id[:12], exc)
                if not runsc.clear_stale_state(sandbox_id):
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
        # Forget the checkpoint off the resume's path (measured: p50 5 ms, but up to 250 ms under
        # load); a later checkpoint of the sandbox waits for it. Left undone, it goes with the container.
        self._leave_behind(sandbox_id, self._forget_checkpoint, sandbox_id, name)
        return channel

    def _leave_behind(self, sandbox_id: str, work: Callable[..., None], *args: str) -> None:
        """Run ``work`` in the background; the sandbox's next checkpoint or restore waits for it."""

        def run() -> None:
            try:
                work(*args)
            finally:
                if self._behind.get(sandbox_id) is threading.current_thread():
                    self._behind.pop(sandbox_id, None)

        self._behind[sandbox_id] = thread = threading.Thread(target=run, name="execbox-checkpoint-tidy", daemon=True)
        thread.start()

    def _catch_up(self, sandbox_id: str) -> None:
        pending = self._behind.get(sandbox_id)
        if pending is not None:
            pending.join(30)

    def _forget_checkpoint(self, sandbox_id: str, name: str) -> None:
        try:
            with translate(f"delete checkpoint of {sandbox_id[:12]}"):
                res = self.api._delete(self.api._url("/containers/{0}/checkpoints/{1}", sandbox_id, name))
                self.api._raise_for_status(res)
        except EngineError as exc:  # it goes with the container
            log.warning("checkpoint %s of %s kept: %s", name, sandbox_id[:12], exc)
        else:
            path = self.checkpoint_dir(sandbox_id, name)
            if path is not None:
                _checkpoints.forget(path)
