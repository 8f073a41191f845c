"""Sessions paused to disk and resumed where they were (``isolation="gvisor"`` only).

Pausing checkpoints the session's sandbox (gVisor's own checkpoint, through the
engine): memory, the REPL's variables and imports, and the files in /work are saved
on the engine's disk and the container stops, holding no memory or CPU. Resuming
starts it again from the checkpoint; the agent, told of the pause, takes the stream the
resuming process attached before the restore as a new connection (no relay to start: see
``session_agent.py``); an agent that was not told is reached through a relay, as a process
that adopts a session reaches it. The registry records the pause, so a restarted service resumes
it too; idle and lifetime limits still end a paused session (its checkpoint goes with
its container). runc sessions cannot be paused (CRIU does not work on these hosts):
``SessionStateError`` naming ``isolation`` (HTTP 409).

* **Automatically**: a session with ``pause_after`` is paused by the reaper once it has
  been unused that long (never while a call runs: the reaper skips a busy session); its
  next call resumes it (``resumed``, ``resume_ms``).
* **Quota**: a tenant's paused sessions' checkpoints together may hold at most the
  session's ``checkpoint_quota`` bytes (the tenant's at creation). A pause that would go
  over is refused (``SessionStateError`` naming ``checkpoint_quota``) and the session
  runs on: refused at once if the tenant's other checkpoints already fill the quota, else
  after the checkpoint is measured (it is restored at once). An automatic pause so
  refused is not tried again until the session has been used.
* **A running call**: ``pause`` waits for it (up to ``config.busy_wait`` seconds, then
  ``SessionBusyError``, HTTP 409 ``session_busy``).
"""

from __future__ import annotations

import builtins
import logging
import time

from ..engine.base import Channel
from ..exceptions import EngineError, SandboxError, SessionBusyError, SessionNotFoundError, SessionStateError
from ..state import StateBusyError
from .lifecycle import SessionsLifecycle
from .link import LinkEnded, SessionLink
from .models import LOCKS, RECORD_KIND, Record, SessionInfo

__all__ = ["SessionsPausing"]

log = logging.getLogger("execbox.sessions")

CHECKPOINT = "execbox"
PAUSE_LEASE = 120.0
AGENT_ANSWER = 5.0  # seconds the agent has to answer the pause, or the hello on the restored stream


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


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
            with self.store.lock(LOCKS, rec.id, lease=PAUSE_LEASE, wait=self.config.busy_wait):
                rec = self._record(tenant, session_id)
                if rec.paused_at is None:
                    self._pause_locked(rec)
                return rec.info()
        except StateBusyError:
            raise SessionBusyError(f"session {session_id} is busy with a call") from None

    def resume(self, session_id: str, *, tenant: str = "default") -> SessionInfo:
        """Start a paused session again where it was; no-op if it is not paused."""
        self._check_open()
        rec = self._record(tenant, session_id)
        try:
            with self.store.lock(LOCKS, rec.id, lease=PAUSE_LEASE, wait=self.config.busy_wait):
                rec = self._record(tenant, session_id)
                if rec.paused_at is not None:
                    self._resume_locked(rec)
                return rec.info()
        except StateBusyError:
            raise SessionBusyError(f"session {session_id} is busy with a call") from None

    def checkpoint_usage(self, tenant: str = "default") -> int:
        """Bytes the tenant's paused sessions' checkpoints hold on disk (what the quota counts)."""
        return sum(r.checkpoint_bytes for r in self._records(prefix=f"{tenant}/") if r.paused_at is not None)

    # -- the reaper's automatic pause -------------------------------------------------------

    def reap(self, *, pause_idle: bool = True) -> builtins.list[str]:
        """One reaper pass (see ``SessionsLifecycle.reap``), then (``pause_idle``) pause the sessions
        unused for their ``pause_after``. Returns the ids of the sessions it ended."""
        ended = super().reap()
        if not pause_idle:
            return ended
        now = time.time()
        for rec in self._records():
            if rec.id not in ended and self._auto_pause_due(rec, now) and not self._closed:
                self._auto_pause(rec)
        return ended

    def _auto_pause_due(self, rec: Record, now: float) -> bool:
        return (
            rec.pause_after is not None
            and rec.paused_at is None
            and rec.status == "ready"
            and rec.isolation == "gvisor"
            and now >= max(rec.last_used_at, rec.resumed_at or 0.0) + rec.pause_after
            and rec.auto_pause_refused != rec.last_used_at
        )

    def _auto_pause(self, rec: Record) -> bool:
        """Pause a session unused for its ``pause_after`` (the reaper); False if it was not paused."""
        try:
            with self.store.lock(LOCKS, rec.id, lease=PAUSE_LEASE, wait=0):  # a call runs: not now
                fresh = self._record_or_none(rec.tenant, rec.id)
                if fresh is None or not self._auto_pause_due(fresh, time.time()):
                    return False
                try:
                    self._pause_locked(fresh)
                    log.info("session %s paused after %g s unused", fresh.id, fresh.pause_after)
                    return True
                except (SessionStateError, EngineError, SandboxError) as exc:
                    # Refused (quota) or failed: not again until the session is used (each try costs a checkpoint).
                    log.warning("session %s: automatic pause not done: %s", fresh.id, exc)
                    current = self._record_or_none(fresh.tenant, fresh.id)
                    if current is not None and current.paused_at is None:
                        current.auto_pause_refused = current.last_used_at
                        self._save(current)
                    return False
        except (StateBusyError, SessionBusyError, SessionNotFoundError):
            return False  # busy (a call, or the tenant's other pause): a later pass tries again

    # -- under the session's lock -----------------------------------------------------------

    def _pause_locked(self, rec: Record) -> None:
        if rec.checkpoint_quota is None:
            self._checkpoint(rec)
            return
        quota = rec.checkpoint_quota
        # One pause per tenant at a time: the sum of its checkpoints is checked against its quota.
        try:
            with self.store.lock(LOCKS, f"checkpoints:{rec.tenant}", lease=PAUSE_LEASE, wait=PAUSE_LEASE / 2):
                used = sum(
                    r.checkpoint_bytes
                    for r in self._records(prefix=f"{rec.tenant}/")
                    if r.paused_at is not None and r.id != rec.id
                )
                if used >= quota:
                    raise self._over_quota(rec, used, None, quota)
                size = self._checkpoint(rec)
                if used + size > quota:
                    log.info("session %s: its checkpoint (%s) is over the quota: resuming it", rec.id, _mib(size))
                    self._resume_locked(rec)
                    raise self._over_quota(rec, used, size, quota)
        except StateBusyError:
            raise SessionBusyError(f"tenant {rec.tenant!r} is pausing another session; try again") from None

    @staticmethod
    def _over_quota(rec: Record, used: int, size: int | None, quota: int) -> SessionStateError:
        this = "" if size is None else f" plus this session's {_mib(size)}"
        return SessionStateError(
            "checkpoint_quota",
            f"pausing session {rec.id} would take tenant {rec.tenant!r} over its checkpoint_quota of {_mib(quota)}"
            f" ({_mib(used)} held by its paused sessions{this}): it runs on; resume or end a paused session first",
        )

    def _checkpoint(self, rec: Record) -> int:
        """Checkpoint the session and record it paused; its checkpoint's size in bytes."""
        assert rec.container_id is not None
        told = self._tell_pause(rec)
        started = time.monotonic()
        self.engine.checkpoint(rec.container_id, CHECKPOINT)
        took = (time.monotonic() - started) * 1000
        rec.resume_attach = told
        size = self.engine.checkpoint_size(rec.container_id, CHECKPOINT)
        if size is None:  # the engine cannot tell: count the most it can be (all its memory)
            size = rec.limits.memory
        rec.paused_at = time.time()
        rec.checkpoint_bytes = size
        self._save(rec)
        log.info("session %s paused in %.0f ms (checkpoint %s)", rec.id, took, _mib(size))
        return size

    def _tell_pause(self, rec: Record) -> bool:
        """Tell the agent a checkpoint comes, then drop this process's link to it (it ends with
        the container). Whether the agent will take a stream attached before the restore."""
        link: SessionLink | None = None
        try:
            link = self._connect(rec)
            link.send_json({"op": "pause"})
            return bool(link.reply(time.monotonic() + AGENT_ANSWER).get("ok"))
        except (EngineError, LinkEnded, TimeoutError, SandboxError) as exc:  # AgentError: an agent without it
            log.info("session %s: agent not told of the pause (%s): resumed through a relay", rec.id, exc)
            return False
        finally:
            if link is not None:
                self._drop_link(rec.id, link)

    def _resume_locked(self, rec: Record) -> float:
        """Restore the session from its checkpoint; the milliseconds it took."""
        assert rec.container_id is not None
        started = time.monotonic()
        # Attached before the restore: the agent takes this stream (told of the pause).
        channel = self.engine.restore(rec.container_id, CHECKPOINT, attach=rec.resume_attach)
        restored = time.monotonic()
        hello = self._say_hello(rec, channel) if channel is not None else None  # read while we save
        rec.paused_at = None
        rec.checkpoint_bytes = 0
        rec.resume_attach = False
        rec.resumes += 1
        rec.resumed_at = time.time()
        try:
            self._save(rec)
        except BaseException:
            if hello is not None:
                hello.close()
            raise
        try:
            if hello is None or not self._hello_answered(rec, hello):
                self._connect(rec)  # through a relay (see the module's doc)
        except (EngineError, LinkEnded, TimeoutError, SandboxError) as exc:
            if self._check_container(rec) is None:
                raise  # it runs: the engine failed this time
            # Seen under load with runsc 20221219: the restored sandbox exited at once.
            self._end(rec, f"it could not be resumed from its checkpoint ({exc})")
            raise SessionNotFoundError(f"session {rec.id} ended: it could not be resumed from its checkpoint") from None
        done = time.monotonic()
        took = (done - started) * 1000
        log.info(
            "session %s resumed in %.0f ms (restore %.0f ms, reconnect %.0f ms)",
            rec.id,
            took,
            (restored - started) * 1000,
            (done - restored) * 1000,
        )
        return took

    def _say_hello(self, rec: Record, channel: Channel) -> SessionLink | None:
        """Authenticate on the stream attached before the restore (None: it is closed already)."""
        assert rec.container_id is not None
        link = SessionLink(rec.container_id, channel, "attach")
        try:
            link.send_json({"op": "hello", "token": rec.token})
        except LinkEnded as exc:
            log.warning("session %s: the restored stream is closed (%s): reconnecting through a relay", rec.id, exc)
            link.close()
            return None
        return link

    def _hello_answered(self, rec: Record, link: SessionLink) -> bool:
        """The agent's answer on the restored stream: then it is this process's link; False (closed) if none."""
        try:
            link.reply(time.monotonic() + AGENT_ANSWER)
        except (LinkEnded, TimeoutError, SandboxError) as exc:
            log.warning("session %s: no answer on the restored stream (%s): reconnecting through a relay", rec.id, exc)
            link.close()
            return False
        with self._lock:
            self._links[rec.id] = link
        return True

    def _save(self, rec: Record) -> None:
        if not self.store.put_record(RECORD_KIND, rec.key, rec.model_dump(mode="json"), rec.record_ttl(), "update"):
            raise SessionNotFoundError(f"no session {rec.id!r}")  # ended meanwhile
