"""Sessions paused to disk and resumed where they were (``isolation="gvisor"`` only).

Pausing checkpoints the session's sandbox (gVisor's own checkpoint, through the
engine): memory, the REPL's variables and imports, and the files in /work are saved
under the engine's data root and the container stops, holding no memory or CPU.
Resuming starts it again from the checkpoint and reconnects through a relay, as a
process that adopts a session does. The registry records the pause, so a restarted
service resumes it too; idle and lifetime limits still end a paused session (its
checkpoint goes with its container). runc sessions cannot be paused (CRIU does not
work on these hosts): ``SessionStateError`` naming ``isolation`` (HTTP 409).

Measured limit of Docker 20.10 with runsc 20221219: a container restored from a
checkpoint can be checkpointed again, but not restored a second time (containerd
answers "id already in use"). So a session is paused at most once: a second pause is
refused (``SessionStateError`` naming ``session_id``) rather than lose the session.
"""

from __future__ import annotations

import logging
import time

from ..exceptions import EngineError, SandboxError, SessionBusyError, SessionNotFoundError, SessionStateError
from ..state import StateBusyError
from .lifecycle import SessionsLifecycle
from .link import LinkEnded
from .models import LOCKS, RECORD_KIND, Record, SessionInfo

__all__ = ["SessionsPausing"]

log = logging.getLogger("execbox.sessions")

CHECKPOINT = "execbox"


class SessionsPausing(SessionsLifecycle):
    def pause(self, session_id: str, *, tenant: str = "default") -> SessionInfo:
        """Checkpoint the session to disk (waits for a running call); no-op if it is paused."""
        self._check_open()
        rec = self._record(tenant, session_id)
        if rec.isolation != "gvisor":
            raise SessionStateError(
                "isolation", f"a session under {rec.isolation!r} cannot be paused: only isolation 'gvisor' can"
            )
        try:
            with self.store.lock(LOCKS, rec.id, lease=120, wait=self.config.busy_wait):
                rec = self._record(tenant, session_id)
                if rec.paused_at is None:
                    if rec.resumes:
                        raise SessionStateError(
                            "session_id",
                            "this session was paused and resumed once already: this engine cannot resume a"
                            " second checkpoint of it (start a new session to pause again)",
                        )
                    self._pause_locked(rec)
                return rec.info()
        except StateBusyError:
            raise SessionBusyError(f"session {session_id} is busy with a call") from None

    def resume(self, session_id: str, *, tenant: str = "default") -> SessionInfo:
        """Start a paused session again where it was; no-op if it is not paused."""
        self._check_open()
        try:
            with self.store.lock(LOCKS, session_id, lease=120, wait=self.config.busy_wait):
                rec = self._record(tenant, session_id)
                if rec.paused_at is not None:
                    self._resume_locked(rec)
                return rec.info()
        except StateBusyError:
            raise SessionBusyError(f"session {session_id} is busy with a call") from None

    def _pause_locked(self, rec: Record) -> None:
        assert rec.container_id is not None
        with self._lock:
            link = self._links.pop(rec.id, None)
        if link is not None:
            link.close()  # the attach stream ends with the container; a relay reconnects after resume
        started = time.monotonic()
        self.engine.checkpoint(rec.container_id, CHECKPOINT)
        rec.paused_at = time.time()
        self._save(rec)
        log.info("session %s paused in %.0f ms", rec.id, (time.monotonic() - started) * 1000)

    def _resume_locked(self, rec: Record) -> float:
        """Restore the session from its checkpoint; the milliseconds it took."""
        assert rec.container_id is not None
        started = time.monotonic()
        self.engine.restore(rec.container_id, CHECKPOINT)
        rec.paused_at = None
        rec.resumes += 1
        self._save(rec)
        try:
            self._connect(rec)  # the agent answers again (through a relay)
        except (EngineError, LinkEnded, TimeoutError, SandboxError) as exc:
            if self._check_container(rec) is None:
                raise  # it runs: the engine failed this time
            # Seen under load with runsc 20221219: the restored sandbox exited at once.
            self._end(rec, f"it could not be resumed from its checkpoint ({exc})")
            raise SessionNotFoundError(f"session {rec.id} ended: it could not be resumed from its checkpoint") from None
        took = (time.monotonic() - started) * 1000
        log.info("session %s resumed in %.0f ms", rec.id, took)
        return took

    def _save(self, rec: Record) -> None:
        if not self.store.put_record(RECORD_KIND, rec.key, rec.model_dump(mode="json"), rec.record_ttl(), "update"):
            raise SessionNotFoundError(f"no session {rec.id!r}")  # ended meanwhile
