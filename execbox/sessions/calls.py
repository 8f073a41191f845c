"""Calls in a session: one at a time per session (a lock in the store, so across replicas),
files in and collected files out, output streamed, and how the call ended."""

from __future__ import annotations

import base64
import builtins
import logging
import time
from collections.abc import Callable

import pydantic

from ..agentlink import AgentError, CallOutput, Outcome
from ..exceptions import (
    EngineError,
    InvalidRequestError,
    SandboxError,
    SessionBusyError,
    SessionNotFoundError,
)
from ..models import invalid_request
from ..state import StateBusyError
from .link import LinkEnded, SessionLink
from .models import LOCKS, RECORD_KIND, RESTART_SLACK, Record, SessionExecuteRequest, SessionResult
from .pausing import SessionsPausing

__all__ = ["SessionsCalls"]

log = logging.getLogger("execbox.sessions")


class SessionsCalls(SessionsPausing):
    def execute(
        self,
        session_id: str,
        code: str | None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        *,
        tenant: str = "default",
        files: dict[str, bytes | str] | None = None,
        collect: builtins.list[str] | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> SessionResult:
        """Run ``code`` in the session; its output and status, for this call only.

        ``files`` (bytes or text) are written under /work first and stay there; files
        matching ``collect`` come back in ``result.files``; ``code=None`` only moves files.
        ``on_output(stream, chunk)`` sees the output as it arrives.
        """
        self._check_open()
        try:
            req = SessionExecuteRequest.model_validate(
                {
                    "code": code,
                    "env": env or {},
                    "timeout": timeout,
                    "files": {p: c.encode() if isinstance(c, str) else c for p, c in (files or {}).items()},
                    "collect": collect or [],
                }
            )
        except pydantic.ValidationError as exc:
            raise invalid_request(exc) from None
        if req.code is not None and len(req.code.encode()) > self.config.max_code_bytes:
            raise InvalidRequestError("code", f"larger than {self.config.max_code_bytes} bytes")
        rec = self._record(tenant, session_id)
        call_timeout = req.timeout if req.timeout is not None else rec.limits.timeout
        if call_timeout > self.config.max_limits.timeout:
            raise InvalidRequestError("timeout", f"{call_timeout} exceeds the maximum {self.config.max_limits.timeout}")
        lease = call_timeout + self.config.interrupt_grace + RESTART_SLACK + 30
        try:
            with self.store.lock(LOCKS, rec.id, lease=lease, wait=call_timeout + self.config.busy_wait):
                rec = self._record(tenant, session_id)  # it may have ended while we waited
                return self._execute_locked(rec, req, call_timeout, on_output)
        except StateBusyError:
            raise SessionBusyError(f"session {session_id} is busy with another call") from None

    def _execute_locked(
        self, rec: Record, req: SessionExecuteRequest, timeout: float, on_output: Callable[[str, bytes], None] | None
    ) -> SessionResult:
        if rec.status != "ready" or rec.container_id is None:
            raise SessionBusyError(f"session {rec.id} is still being created")
        lost = self._restore_grant(rec)  # adopted by this process: its proxy must serve the session
        if lost is not None:
            self._end(rec, lost)
            raise SessionNotFoundError(f"session {rec.id} ended: {lost}")
        resume_ms = self._resume_locked(rec) if rec.paused_at is not None else None
        rec.calls += 1
        rec.last_used_at = time.time()
        if not self.store.put_record(RECORD_KIND, rec.key, rec.model_dump(mode="json"), rec.record_ttl(), "update"):
            raise SessionNotFoundError(f"no session {rec.id!r}")  # deleted just now
        started = time.monotonic()
        try:
            link = self._connect(rec)
        except (LinkEnded, TimeoutError, EngineError, SandboxError) as exc:
            if isinstance(exc, EngineError) and self._check_container(rec) is None:
                raise  # the engine failed, the session may well be fine: try again later
            log.warning("session %s: cannot reach its agent (%s): ending it", rec.id, exc)
            self._end(rec, "its agent does not answer")
            raise SessionNotFoundError(f"session {rec.id} ended: its container stopped answering") from None
        link.in_use = True
        self._take_log(rec)  # requests made between calls belong to none
        try:
            result = self._call(rec, link, req, timeout, started, on_output)
            result.network_log = self._take_log(rec)
            result.resumed, result.resume_ms = resume_ms is not None, resume_ms
        finally:
            link.in_use = False
            with self._lock:
                cached = self._links.get(rec.id) is link
            if not cached:
                link.close()
        if result.session_ended:
            self._end(rec, "its container ended")
        else:
            rec.last_used_at = time.time()
            if not self.store.put_record(RECORD_KIND, rec.key, rec.model_dump(mode="json"), rec.record_ttl(), "update"):
                result.session_ended = True  # deleted or reaped during the call
        return result

    def _call(
        self,
        rec: Record,
        link: SessionLink,
        req: SessionExecuteRequest,
        timeout: float,
        started: float,
        on_output: Callable[[str, bytes], None] | None,
    ) -> SessionResult:
        call = CallOutput(rec.limits.output_bytes, on_output)
        ended = False
        outcome: Outcome | None = None  # None: the agent's result says
        deadline = time.monotonic() + timeout + self.config.interrupt_grace + RESTART_SLACK
        try:
            link.send_json(
                {
                    "op": "exec",
                    "id": str(rec.calls),
                    "code": req.code,
                    "env": req.env,
                    "timeout": timeout,
                    "output_bytes": call.cap,
                    "files": {p: base64.b64encode(data).decode() for p, data in req.files.items()},
                    "collect": req.collect,
                }
            )
            link.read_call(deadline, call)
        except TimeoutError:
            # The agent did not enforce the limit (wedged or subverted): end the session.
            self.engine.kill(link.container_id)
            outcome, ended = Outcome.killed_by_host(), True
        except LinkEnded:
            if self._still_running(link.container_id):
                # This connection broke (e.g. its relay was killed), not the session: the next call reconnects.
                self._drop_link(rec.id, link)
                raise SandboxError(
                    f"session {rec.id}: the connection to it broke during the call (the session lives on)"
                ) from None
            outcome, ended = Outcome.died(self._oom_killed(link.container_id)), True
        except AgentError as exc:
            raise SandboxError(f"session {rec.id}: {exc}") from None
        except (SandboxError, ValueError) as exc:
            self.engine.kill(link.container_id)
            self._drop_link(rec.id, link)
            self._end(rec, "its agent broke the protocol")
            raise SandboxError(f"session {rec.id}: {exc}") from exc
        meta = call.meta or {}
        if "files_error" in meta:
            raise InvalidRequestError("files", f"cannot write them in the session: {meta['files_error']}")
        if outcome is None:
            outcome = Outcome.of(meta)
        return SessionResult(
            session_id=rec.id,
            call=rec.calls,
            language=rec.language,
            isolation=rec.isolation,
            **call.fields(outcome, started),
            repl_reset=bool(meta.get("reset") or meta.get("reset_before")) or (ended and rec.repl),
            session_ended=ended,
        )
