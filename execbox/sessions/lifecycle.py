"""A session's life: its container started (or adopted through a relay), idle and lifetime
limits enforced by the reaper, registry and engine reconciled, and its end."""

from __future__ import annotations

import base64
import builtins
import logging
import threading
import time

from ..egress import EgressGrant
from ..exceptions import EngineError, ImageNotFoundError, InvalidRequestError, SandboxError
from ..hardening import WORKDIR, sandbox_spec
from ..labels import KIND, OWNER, labels_for, owner_alive
from ..runtimes import get_runtime
from ..state import StateBusyError
from .link import LinkEnded, SessionLink
from .models import (
    AGENT,
    LABEL_GRACE,
    LOCKS,
    RECORD_KIND,
    REGISTRY_LABEL,
    REPL_ARGV,
    SESSION_LABEL,
    TENANT_LABEL,
    Record,
)
from .network import SessionsNetwork
from .relay import RELAY

__all__ = ["SessionsLifecycle"]

log = logging.getLogger("execbox.sessions")


class SessionsLifecycle(SessionsNetwork):
    _stop: threading.Event

    def reap(self) -> builtins.list[str]:
        """One reaper pass: end idle and expired sessions, reconcile registry and engine.

        Returns the ids of the sessions it ended (the reaper thread calls this).
        """
        now = time.time()
        # Containers first, then records: a session's record is written before its
        # container is created, so every container listed here has its record below.
        containers: dict[str, tuple[str, bool]] = {}
        for res in self.engine.list_resources(f"{REGISTRY_LABEL}={self.registry_id}"):
            if res.kind == "container":
                containers[res.labels.get(SESSION_LABEL, "")] = (res.id, res.labels.get(KIND) == RECORD_KIND)
        records = {rec.id: rec for rec in self._records()}
        for sid, (cid, _) in containers.items():
            if sid not in records:
                log.info("removing session container %s: not in the registry", cid[:12], extra={"session_id": sid})
                self._remove_container(cid)
        ended = []
        for rec in records.values():
            reason = self._reason_to_end(rec, now, rec.id in containers)
            if reason is None:
                continue
            if reason == "idle":
                # Never end a session for idleness while a call runs in it.
                try:
                    with self.store.lock(LOCKS, rec.id, lease=30, wait=0):
                        fresh = self._record_or_none(rec.tenant, rec.id, live=False)
                        if fresh is None or self._reason_to_end(fresh, time.time(), True, False) != "idle":
                            continue
                        self._end(fresh, "idle")
                except StateBusyError:
                    continue
            else:
                self._end(rec, reason)
            ended.append(rec.id)
        # Sessions with egress that this process adopted: their grants, re-established here.
        egress = [r for r in records.values() if r.egress is not None and r.id not in ended]
        for rec, reason in self._restore_grants(egress):
            self._end(rec, reason)
            ended.append(rec.id)
        return ended

    def _start(self, rec: Record, grant: EgressGrant | None = None) -> SessionLink:
        """Create, attach, start the container; wait for the agent; send it the session's setup
        (with ``grant``: on the egress network, the grant's environment and files for every call)."""
        runtime = get_runtime(rec.language)
        labels = labels_for(
            RECORD_KIND,
            rec.max_lifetime + LABEL_GRACE,
            **{SESSION_LABEL: rec.id, REGISTRY_LABEL: self.registry_id, TENANT_LABEL: rec.tenant},
        )
        # The registry owns a session's container, not this process: a restart must not orphan it.
        labels.pop(OWNER, None)
        network = grant.network if grant is not None else None
        files = grant.files if grant is not None else {}
        spec = sandbox_spec(
            rec.limits,
            rec.image,
            rec.uid,
            labels,
            network=network,
            command=AGENT,
            isolation=rec.isolation,
            pausable=True,
        )
        try:
            cid = self.engine.create(spec)
        except ImageNotFoundError as exc:
            raise ImageNotFoundError(f"{exc} (build it with `execbox images build`)") from exc
        rec.container_id = cid
        channel = self.engine.attach(cid)
        link = SessionLink(cid, channel, "attach")
        try:
            self.engine.start(cid)
            deadline = time.monotonic() + self.config.ready_timeout
            link.send_json(
                {
                    "op": "init",
                    "token": rec.token,
                    "repl": rec.repl,
                    "repl_argv": list(REPL_ARGV.get(rec.language, ())),
                    "run": {"argv": list(runtime.argv), "filename": runtime.filename},
                    "env": runtime.environment(grant.env if grant is not None else {}),
                    "files": {p: base64.b64encode(text.encode()).decode() for p, text in files.items()},
                    "workdir": WORKDIR,
                    "interrupt_grace": self.config.interrupt_grace,
                }
            )
            answer = link.reply(deadline)
            if not answer.get("ok"):
                raise SandboxError(f"session agent refused its setup: {answer}")
        except (LinkEnded, TimeoutError) as exc:
            detail = link.agent_stderr.decode("utf-8", "replace").strip()[-500:]
            link.close()
            raise SandboxError(f"session {rec.id}: the agent did not start ({exc}) {detail}".rstrip()) from None
        except BaseException:
            link.close()
            raise
        return link

    def _connect(self, rec: Record) -> SessionLink:
        """This process's connection to the session's agent: the cached one, or a new relay."""
        with self._lock:
            link = self._links.get(rec.id)
        if link is not None and link.channel.alive():
            return link
        if link is not None:
            self._drop_link(rec.id, link)
        assert rec.container_id is not None
        channel = self.engine.exec(rec.container_id, RELAY, f"{rec.uid}:{rec.uid}")
        link = SessionLink(rec.container_id, channel, "relay")
        try:
            link.send_json({"op": "hello", "token": rec.token})
            link.reply(time.monotonic() + self.config.ready_timeout)
        except BaseException:
            link.close()
            raise
        log.info("session %s adopted (relay)", rec.id, extra={"session_id": rec.id})
        with self._lock:
            self._links[rec.id] = link
        return link

    def _reason_to_end(self, rec: Record, now: float, has_container: bool, check_running: bool = True) -> str | None:
        if rec.status == "creating":
            # A creator that died mid-way leaves its record "creating" for ever.
            if rec.creator and not owner_alive(rec.creator):
                return "its creator died"
            stale = now - rec.created_at > self.config.ready_timeout + 60
            return "its creation did not finish" if stale else None
        if now >= rec.ends_at:
            return "max lifetime"
        if now >= rec.last_used_at + rec.idle_timeout:
            return "idle"
        if rec.paused_at is not None:
            return None  # its container is stopped on purpose (checkpointed); it stays until resumed
        if not has_container:
            return self._check_container(rec)  # listed before the record was? Ask the engine itself.
        return self._check_container(rec) if check_running else None

    def _check_container(self, rec: Record) -> str | None:
        if rec.container_id is None:
            return "it has no container"
        try:
            state = self.engine.state(rec.container_id)
        except EngineError as exc:
            if "no such container" in str(exc).lower():
                return "its container is gone"
            return None  # the engine is unwell: decide on a later pass
        return None if state.running else "its container stopped"

    def _end(self, rec: Record, reason: str) -> None:
        """Forget the session (record first: new calls see it gone), then remove its container."""
        self.store.delete_record(RECORD_KIND, rec.key)
        with self._lock:
            link = self._links.pop(rec.id, None)
            self._counts["ended"] += 1
        if link is not None and not link.in_use:
            link.close()
        cid = rec.container_id
        if cid is None:  # created but not yet recorded: find it by label
            for res in self.engine.list_resources(f"{SESSION_LABEL}={rec.id}"):
                if res.kind == "container":
                    cid = res.id
        removed = cid is None or self._remove_container(cid)
        self._release_grant(rec)
        if removed:  # else its lease runs out with the record's TTL, after the reaper removed the container
            self._release_uid(rec)
        log.info("session %s ended: %s", rec.id, reason, extra={"session_id": rec.id, "tenant": rec.tenant})

    def _still_running(self, cid: str) -> bool:
        """After its stream ended: is the container running even so (only that connection broke)?"""
        try:
            return self.engine.wait(cid, 2.0).running
        except EngineError:
            return False  # gone (removed by the reaper or a delete)

    def _oom_killed(self, cid: str) -> bool:
        try:
            return self.engine.state(cid).oom_killed
        except EngineError:
            return False

    def _drop_link(self, session_id: str, link: SessionLink) -> None:
        with self._lock:
            if self._links.get(session_id) is link:
                del self._links[session_id]
        if not link.in_use:
            link.close()

    def _remove_container(self, cid: str) -> bool:
        try:
            self.engine.remove(cid)
            return True
        except Exception:
            log.warning("could not remove session container %s; a later pass will", cid[:12], exc_info=True)
            return False

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidRequestError("sessions", "this Sessions object is closed")

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.config.reap_interval):
            try:
                self.reap()
            except Exception:  # the reaper must outlive any one failure
                log.exception("session reaper pass failed")
