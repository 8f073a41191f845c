"""Persistent per-user sessions: one long-lived, hardened container per session.

The seed's ``PersistentDockerExecutor`` with its challenges answered:

* **security**: a session's container is made by ``sandbox_spec`` exactly as an
  ephemeral run's (non-root UID of its own, read-only root, no capabilities,
  seccomp allowlist, no network, memory/CPU/pids/disk limits); only its life is longer;
* **leaks and cleanup**: every session has an idle timeout and a max lifetime, enforced
  by a reaper thread; per-user and global caps bound how many exist; containers carry
  labels (kind ``session``, an expiry covering the max lifetime) so ``execbox gc``
  collects them even if no ``Sessions`` ever runs again;
* **lifecycle across restarts**: the registry lives in the ``StateStore``, not in the
  process. A container's owner is the registry (label ``execbox.session.registry``),
  not the process that created it: a restarted service, or a second replica on the
  same engine and store, adopts every live session (it connects to the session's agent
  with ``docker exec session_agent.py --relay``), and removes session containers the
  registry does not know.

Inside, ``execbox/sandbox/session_agent.py`` serves calls one at a time; for Python and
JavaScript a REPL worker keeps variables and imports between calls (``repl=True``).

>>> with Sessions(engine, store) as sessions:
...     s = sessions.create("alice", "python")
...     sessions.execute(s.id, "x = 41")
...     sessions.execute(s.id, "print(x + 1)").stdout
'42\\n'
"""

from __future__ import annotations

import base64
import builtins
import json
import logging
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .egress.policy import NetworkPolicy
from .engine import open_engine
from .engine.base import STDERR, Channel, Engine
from .exceptions import (
    ConfigurationError,
    EngineError,
    ImageNotFoundError,
    InvalidRequestError,
    SandboxError,
    SessionBusyError,
    SessionLimitError,
    SessionNotFoundError,
)
from .hardening import WORKDIR, sandbox_spec
from .images import SANDBOX_DIR, default_image
from .labels import KIND, OWNER, labels_for, owner_alive, owner_id
from .models import (
    DEFAULT_MAX_LIMITS,
    MAX_COLLECT_PATTERNS,
    FileBytes,
    Limits,
    check_code,
    check_env,
    check_rel_path,
)
from .protocol import CappedOutput, CollectedFiles, FrameDecoder
from .runtimes import get_runtime
from .state import StateBusyError, StateStore, check_id

__all__ = [
    "SessionCreateRequest",
    "SessionExecuteRequest",
    "SessionInfo",
    "SessionList",
    "SessionResult",
    "Sessions",
    "SessionsConfig",
]

log = logging.getLogger("execbox.sessions")

RECORD_KIND = "session"  # record kind in the store, and the containers' execbox.kind label
SESSION_LABEL = "execbox.session"
REGISTRY_LABEL = "execbox.session.registry"
TENANT_LABEL = "execbox.tenant"
_LOCKS = ":session"  # lock namespace: ':' is never in a tenant or user id, so never a state lock
_ID_RE = re.compile(r"^ses_[0-9a-f]{24}$")
AGENT = ("python3", "-I", "-S", f"{SANDBOX_DIR}/session_agent.py")
RELAY = (*AGENT, "--relay")
REPL_ARGV = {
    "python": ("python3", f"{SANDBOX_DIR}/session_repl.py"),
    "javascript": ("node", f"{SANDBOX_DIR}/session_repl.js"),
}
LABEL_GRACE = 600.0  # the containers' expiry label: max lifetime plus this
_RESTART_SLACK = 10.0  # a call's host deadline beyond timeout + grace (the agent restarts a worker)


# -- models ---------------------------------------------------------------------------------


class SessionsConfig(BaseModel):
    """How ``Sessions`` makes and bounds sessions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = Field(None, description="Default image; default: the locally built sandbox image.")
    default_limits: Limits = Field(default_factory=lambda: Limits())
    max_limits: Limits = Field(default_factory=lambda: DEFAULT_MAX_LIMITS)
    max_per_user: int = Field(3, ge=1, description="Live sessions one user (of one tenant) may have.")
    max_total: int = Field(32, ge=1, description="Live sessions in all, every tenant and replica together.")
    idle_timeout: float = Field(600.0, gt=0, description="Default idle timeout (s): ended after this unused.")
    max_lifetime: float = Field(3600.0, gt=0, description="Default max lifetime (s): ended this long after creation.")
    idle_timeout_limit: float = Field(86400.0, gt=0, description="Largest idle timeout a caller may ask for.")
    max_lifetime_limit: float = Field(86400.0, gt=0, description="Largest max lifetime a caller may ask for.")
    reap_interval: float = Field(5.0, gt=0, description="Seconds between reaper passes.")
    ready_timeout: float = Field(30.0, gt=0, description="Longest wait for a new session's agent and REPL.")
    interrupt_grace: float = Field(
        1.0, gt=0, description="After a call's timeout interrupts the REPL: how long before it is restarted."
    )
    busy_wait: float = Field(30.0, ge=0, description="Extra wait (beyond its timeout) for a busy session.")
    max_code_bytes: int = Field(1 << 20, gt=0)
    uid_base: int = Field(
        200_000, ge=1000, description="First UID of session containers (apart from ephemeral runs' 100000+)."
    )
    uid_count: int = Field(100_000, ge=16)


class SessionCreateRequest(BaseModel):
    """``POST /v1/sessions``."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(
        description="The end user the session belongs to (caps count per user).",
        json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$"},
    )
    language: str = Field("python", description="python, javascript or bash (aliases: py, js, node, sh).")
    image: str | None = Field(None, description="Sandbox image or package image name; default: the service's.")
    limits: Limits | None = Field(None, description="Limits of the session's container; timeout is per call.")
    network: NetworkPolicy | None = Field(
        None, description="Sessions have no network: only 'none' (or a policy with mode 'none') is accepted."
    )
    idle_timeout: float | None = Field(None, gt=0, description="Seconds unused after which the session ends.")
    max_lifetime: float | None = Field(None, gt=0, description="Seconds after creation at which the session ends.")
    repl: bool | None = Field(
        None,
        description="Keep the interpreter between calls (variables, imports); default true for python and"
        " javascript. bash sessions run each call in a fresh bash (files in /work persist either way).",
    )

    @field_validator("user_id")
    @classmethod
    def _user_id(cls, v: str) -> str:
        return check_id("user_id", v)

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v != "none":
                raise ValueError("sessions have no network: only 'none'")
            return {"mode": "none"}
        return v


class SessionExecuteRequest(BaseModel):
    """``POST /v1/sessions/{id}/execute``."""

    model_config = ConfigDict(extra="forbid")

    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for this call only.")
    timeout: float | None = Field(None, gt=0, description="Wall-clock limit of this call (default: limits.timeout).")
    files: dict[str, FileBytes] = Field(
        default_factory=dict,
        description="Files written into /work before the code runs: path -> content (base64 in JSON). They stay.",
    )
    collect: list[str] = Field(
        default_factory=list,
        max_length=MAX_COLLECT_PATTERNS,
        description="Glob patterns (relative to /work) of files to return in the result after the code ran;"
        " symlinks are never followed; the total is capped by limits.output_bytes.",
    )
    # Last, so that its check sees files and collect.
    code: str | None = Field(
        None,
        min_length=1,
        validate_default=True,
        description="Code to run in the session; may be left out by a call that only moves files.",
    )

    @field_validator("code")
    @classmethod
    def _code(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and not info.data.get("files") and not info.data.get("collect"):
            raise ValueError("code is required (unless the call only writes files or collects them)")
        return None if v is None else check_code(v)

    @field_validator("files")
    @classmethod
    def _file_paths(cls, v: dict[str, bytes]) -> dict[str, bytes]:
        return {check_rel_path(path, "file path"): data for path, data in v.items()}

    @field_validator("collect")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return [check_rel_path(pattern, "collect pattern") for pattern in v]

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return check_env(v)


class SessionInfo(BaseModel):
    """A live session as its tenant sees it."""

    id: str = Field(description="Session id (use it to execute, get and delete).")
    user_id: str = Field(description="The user the session belongs to.")
    language: str = Field(description="Language of the session.")
    repl: bool = Field(description="Variables and imports persist between calls.")
    image: str = Field(description="Image of the session's container.")
    limits: Limits = Field(description="Limits of the session's container (timeout: the default per call).")
    network: str = Field("none", description="Network of the session (none).")
    status: Literal["creating", "ready"] = Field(description="creating while its container starts, then ready.")
    created_at: float = Field(description="Unix time of creation.")
    last_used_at: float = Field(description="Unix time the last call ended (or creation).")
    expires_at: float = Field(description="Unix time the session ends unless it is used before.")
    idle_timeout: float = Field(description="Seconds unused after which the session ends.")
    max_lifetime: float = Field(description="Seconds after creation at which the session ends whatever happens.")
    calls: int = Field(0, description="Calls made so far.")


class SessionList(BaseModel):
    """``GET /v1/sessions``."""

    sessions: list[SessionInfo] = Field(description="The tenant's live sessions, oldest first.")


class SessionResult(BaseModel):
    """What one call in a session produced. Timeouts and OOM kills are fields, not exceptions."""

    session_id: str = Field(description="The session.")
    call: int = Field(description="Number of this call in the session (1, 2, ...).")
    language: str = Field(description="Language of the session.")
    stdout: str = Field("", description="Standard output of this call only, up to limits.output_bytes.")
    stderr: str = Field("", description="Standard error of this call only, up to limits.output_bytes.")
    exit_code: int = Field(description="0, 1 for an exception, n for sys.exit(n)/exit n; 128+N when killed by N.")
    signal: int | None = Field(None, description="Signal that ended the call (2: interrupted at its timeout).")
    duration_ms: float = Field(description="Wall-clock time of the call, as the caller saw it.")
    run_ms: float | None = Field(None, description="Time the code itself ran, measured in the sandbox.")
    timed_out: bool = Field(False, description="The call ran past its timeout and was interrupted or killed.")
    oom_killed: bool = Field(False, description="The call's process was killed for lack of memory.")
    output_truncated: bool = Field(False, description="Output beyond limits.output_bytes was dropped.")
    files: dict[str, FileBytes] = Field(
        default_factory=dict, description="Files matched by the call's collect patterns (base64 in JSON)."
    )
    files_truncated: bool = Field(False, description="Some matching files were left out (size or count cap).")
    repl_reset: bool = Field(
        False,
        description="The REPL was restarted before or during this call (a timeout it did not survive, an OOM"
        " kill, exit()): variables and imports of earlier calls are gone; files in /work stay.",
    )
    session_ended: bool = Field(False, description="The session is over (its container died or stopped answering).")


class _Record(BaseModel):
    """A session as the registry (the state store) holds it."""

    id: str
    tenant: str
    user_id: str
    language: str
    repl: bool
    image: str
    limits: Limits
    network: str = "none"
    status: Literal["creating", "ready"]
    created_at: float
    last_used_at: float
    idle_timeout: float
    max_lifetime: float
    calls: int = 0
    uid: int
    token: str
    registry: str
    creator: str = ""  # owner_id() of the process creating it (a "creating" record dies with it)
    container_id: str | None = None

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.id}"

    @property
    def ends_at(self) -> float:
        return self.created_at + self.max_lifetime

    def expires_at(self) -> float:
        return min(self.ends_at, self.last_used_at + self.idle_timeout)

    def record_ttl(self) -> float:
        # The record outlives the session slightly, so the reaper (not the TTL) ends it.
        return max(self.ends_at - time.time(), 0.0) + LABEL_GRACE

    def info(self) -> SessionInfo:
        return SessionInfo(
            **self.model_dump(
                include={
                    "id",
                    "user_id",
                    "language",
                    "repl",
                    "image",
                    "limits",
                    "network",
                    "status",
                    "created_at",
                    "last_used_at",
                    "idle_timeout",
                    "max_lifetime",
                    "calls",
                }
            ),
            expires_at=self.expires_at(),
        )


# -- the host's end of a connection to a session agent --------------------------------------


class _Gone(Exception):
    """The session's agent is gone (its stream ended)."""


class _Link:
    """One connection to a session's agent: the creating attach stream, or a relay (docker exec)."""

    def __init__(self, container_id: str, channel: Channel, via: str) -> None:
        self.container_id = container_id
        self.channel = channel
        self.via = via
        self.decoder = FrameDecoder(max_frame=1 << 17)
        self.agent_stderr = bytearray()
        self.in_use = False

    def send(self, message: dict[str, Any]) -> None:
        # One JSON line: json.dumps escapes control characters, so Docker's detach keys
        # (ctrl-p ctrl-q), which would end an attach or exec stream, never appear in it.
        try:
            self.channel.send(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        except OSError as exc:
            raise _Gone(str(exc)) from exc

    def frames(self, deadline: float) -> Iterator[tuple[bytes, bytes]]:
        """Frames until the caller stops; TimeoutError at ``deadline``, _Gone at the end of the stream."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                item = self.channel.recv(remaining)
            except OSError as exc:
                raise _Gone(str(exc)) from exc
            if item is None:
                raise _Gone("the session's agent ended")
            stream, data = item
            if stream == STDERR:
                self.agent_stderr += data[: max((16 << 10) - len(self.agent_stderr), 0)]
                continue
            yield from self.decoder.feed(data)

    def reply(self, deadline: float) -> dict[str, Any]:
        """The next ``R`` answer (``K`` skipped); SandboxError for ``X`` or anything else."""
        for kind, body in self.frames(deadline):
            if kind == b"K":
                continue
            if kind == b"R":
                answer: dict[str, Any] = json.loads(body)
                return answer
            if kind == b"X":
                raise SandboxError(f"session agent: {body.decode('utf-8', 'replace')}")
            raise SandboxError(f"session agent sent {kind!r} out of turn")
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.channel.close()


def _default_store() -> StateStore:
    from .state.sqlite import SQLiteStateStore

    return SQLiteStateStore(Path.home() / ".local" / "share" / "execbox" / "sessions.db")


# -- Sessions ------------------------------------------------------------------------------


class Sessions:
    """Persistent per-user sessions over an engine and a registry in a ``StateStore``.

    Creating a ``Sessions`` reconciles the registry with the engine (adopting live
    sessions, removing unregistered session containers) and starts the reaper thread.
    ``close()`` stops the reaper; the sessions themselves live on for the next
    ``Sessions`` over the same store (``close(end_sessions=True)`` ends them). The
    store is closed with it if it was made here (no ``store``) or ``own_store`` says so.
    """

    def __init__(
        self,
        engine: Engine | str | None = None,
        store: StateStore | None = None,
        config: SessionsConfig | None = None,
        *,
        start_reaper: bool = True,
        own_store: bool = False,
        **options: Any,
    ) -> None:
        if config is None:
            try:
                config = SessionsConfig(**options)
            except pydantic.ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first.get("loc", ())) or "config"
                raise InvalidRequestError(field, str(first.get("msg", "invalid"))) from None
        elif options:
            config = config.model_copy(update=options)
        if engine is None or isinstance(engine, str):
            engine = open_engine(engine)
        self.engine = engine
        self.store = store if store is not None else _default_store()
        self._owns_store = own_store or store is None
        self.config = config
        self.image = config.image or default_image()
        self.registry_id = self._registry_id()
        self._links: dict[str, _Link] = {}
        self._lock = threading.Lock()
        self._rand = random.Random()
        self._closed = False
        self._stop = threading.Event()
        self._counts = {"created": 0, "ended": 0}  # by this object, since it was made
        self.reap()  # adopt what lives, remove what the registry does not know
        self._reaper: threading.Thread | None = None
        if start_reaper:
            self._reaper = threading.Thread(target=self._reap_loop, name="execbox-session-reaper", daemon=True)
            self._reaper.start()

    # -- public API ----------------------------------------------------------------------

    def create(
        self,
        user_id: str,
        language: str = "python",
        image: str | None = None,
        limits: Limits | dict[str, Any] | None = None,
        network: str | NetworkPolicy | None = None,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
        *,
        tenant: str = "default",
        repl: bool | None = None,
    ) -> SessionInfo:
        """Start a session for ``user_id``; SessionLimitError over a cap."""
        self._check_open()
        check_id("tenant", tenant)
        check_id("user_id", user_id)
        runtime = get_runtime(language)
        if repl is None:
            repl = runtime.name in REPL_ARGV
        elif repl and runtime.name not in REPL_ARGV:
            raise InvalidRequestError("repl", f"{runtime.name} sessions run each call afresh: use repl=false")
        mode = network.mode if isinstance(network, NetworkPolicy) else network
        if mode not in (None, "none"):
            # Egress grants are per process (proxy credentials, network): a session would lose them on restart.
            raise InvalidRequestError("network", "sessions have no network (only 'none'); use executions for egress")
        lim = self._limits(limits)
        cfg = self.config
        idle = cfg.idle_timeout if idle_timeout is None else float(idle_timeout)
        life = cfg.max_lifetime if max_lifetime is None else float(max_lifetime)
        for field, value, most in (
            ("idle_timeout", idle, cfg.idle_timeout_limit),
            ("max_lifetime", life, cfg.max_lifetime_limit),
        ):
            if not 0 < value <= most:
                raise InvalidRequestError(field, f"must be more than 0 and at most {most:g} seconds")
        image_tag = self._resolve_image(image)
        now = time.time()
        rec = _Record(
            id="ses_" + secrets.token_hex(12),
            tenant=tenant,
            user_id=user_id,
            language=runtime.name,
            repl=repl,
            image=image_tag,
            limits=lim,
            status="creating",
            created_at=now,
            last_used_at=now,
            idle_timeout=idle,
            max_lifetime=life,
            uid=0,
            token=secrets.token_urlsafe(24),
            registry=self.registry_id,
            creator=owner_id(),
        )
        self._reserve(rec)
        try:
            link = self._start(rec)
        except BaseException:
            self._end(rec, "its creation failed")
            raise
        rec.status = "ready"
        rec.container_id = link.container_id
        if not self.store.put_record(RECORD_KIND, rec.key, rec.model_dump(mode="json"), rec.record_ttl(), "update"):
            link.close()
            self._end(rec, "it was deleted while it was created")
            raise SessionNotFoundError(f"session {rec.id} was deleted while it was created")
        with self._lock:
            self._links[rec.id] = link
        log.info(
            "session %s created",
            rec.id,
            extra={"session_id": rec.id, "tenant": tenant, "user_id": user_id, "language": rec.language},
        )
        self._counts["created"] += 1
        return rec.info()

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
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ())) or "request"
            raise InvalidRequestError(field, str(first.get("msg", "invalid")).removeprefix("Value error, ")) from None
        if req.code is not None and len(req.code.encode()) > self.config.max_code_bytes:
            raise InvalidRequestError("code", f"larger than {self.config.max_code_bytes} bytes")
        rec = self._record(tenant, session_id)
        call_timeout = req.timeout if req.timeout is not None else rec.limits.timeout
        if call_timeout > self.config.max_limits.timeout:
            raise InvalidRequestError("timeout", f"{call_timeout} exceeds the maximum {self.config.max_limits.timeout}")
        lease = call_timeout + self.config.interrupt_grace + _RESTART_SLACK + 30
        try:
            with self.store.lock(_LOCKS, rec.id, lease=lease, wait=call_timeout + self.config.busy_wait):
                rec = self._record(tenant, session_id)  # it may have ended while we waited
                return self._execute_locked(rec, req, call_timeout, on_output)
        except StateBusyError:
            raise SessionBusyError(f"session {session_id} is busy with another call") from None

    def get(self, session_id: str, *, tenant: str = "default") -> SessionInfo:
        """The session, or SessionNotFoundError (also for another tenant's)."""
        return self._record(tenant, session_id).info()

    def list(self, tenant: str = "default", user_id: str | None = None) -> list[SessionInfo]:
        """The tenant's live sessions (of one user, with ``user_id``), oldest first."""
        check_id("tenant", tenant)
        now = time.time()
        out = [
            rec.info()
            for rec in self._records(prefix=f"{tenant}/")
            if (user_id is None or rec.user_id == user_id) and rec.expires_at() > now
        ]
        return sorted(out, key=lambda s: s.created_at)

    def stats(self) -> dict[str, int]:
        """Gauges: live sessions in the registry (every replica's), this process's connections to
        them, and the sessions this object created and ended."""
        now = time.time()
        live = [r for r in self._records() if r.expires_at() > now]
        with self._lock:
            attached = len(self._links)
        creating = sum(1 for r in live if r.status == "creating")
        return {"live": len(live), "creating": creating, "attached": attached, **self._counts}

    def delete(self, session_id: str, *, tenant: str = "default") -> None:
        """End the session now (a call running in it ends too); SessionNotFoundError if there is none."""
        rec = self._record(tenant, session_id)
        self._end(rec, "deleted")

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
                    with self.store.lock(_LOCKS, rec.id, lease=30, wait=0):
                        fresh = self._record_or_none(rec.tenant, rec.id, live=False)
                        if fresh is None or self._reason_to_end(fresh, time.time(), True, False) != "idle":
                            continue
                        self._end(fresh, "idle")
                except StateBusyError:
                    continue
            else:
                self._end(rec, reason)
            ended.append(rec.id)
        return ended

    def close(self, end_sessions: bool = False) -> None:
        """Stop the reaper and drop connections; sessions live on unless ``end_sessions``."""
        self._closed = True
        self._stop.set()
        if self._reaper is not None and self._reaper is not threading.current_thread():
            self._reaper.join(timeout=30)
        if end_sessions:
            for rec in self._records():
                self._end(rec, "closed")
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            if not link.in_use:
                link.close()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Sessions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- creation ------------------------------------------------------------------------

    def _limits(self, limits: Limits | dict[str, Any] | None) -> Limits:
        try:
            lim = self.config.default_limits.merged(limits)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidRequestError(f"limits.{loc}", str(first.get("msg", "invalid"))) from None
        for name in lim.exceeding(self.config.max_limits):
            raise InvalidRequestError(
                f"limits.{name}", f"{getattr(lim, name)} exceeds the maximum {getattr(self.config.max_limits, name)}"
            )
        return lim

    def _resolve_image(self, name: str | None) -> str:
        from .images import resolve_image_name

        return resolve_image_name(self.engine, name or self.image)

    def _reserve(self, rec: _Record) -> None:
        """Check the caps and write the record (status creating), all under the registry's lock."""
        cfg = self.config
        try:
            with self.store.lock(_LOCKS, "create", lease=30, wait=30):
                now = time.time()
                live = [r for r in self._records() if r.expires_at() > now]
                mine = sum(1 for r in live if r.tenant == rec.tenant and r.user_id == rec.user_id)
                if mine >= cfg.max_per_user:
                    raise SessionLimitError(
                        f"user {rec.user_id!r} has {mine} live sessions (at most {cfg.max_per_user}): end one first",
                        "user",
                        retry_after=self._retry_after(live, rec),
                    )
                if len(live) >= cfg.max_total:
                    raise SessionLimitError(
                        f"{len(live)} live sessions (at most {cfg.max_total} in all)",
                        "total",
                        retry_after=self._retry_after(live, None),
                    )
                used = {r.uid for r in live}
                rec.uid = next(
                    uid
                    for uid in iter(lambda: cfg.uid_base + self._rand.randrange(cfg.uid_count), None)
                    if uid not in used
                )
                if not self.store.put_record(
                    RECORD_KIND, rec.key, rec.model_dump(mode="json"), rec.record_ttl(), "create"
                ):
                    raise SessionBusyError("session id collision; try again")  # 96 random bits: never
        except StateBusyError:
            raise SessionBusyError("the session registry is busy; try again") from None

    @staticmethod
    def _retry_after(live: builtins.list[_Record], rec: _Record | None) -> float:
        relevant = [r for r in live if rec is None or (r.tenant == rec.tenant and r.user_id == rec.user_id)]
        soonest = min((r.expires_at() for r in relevant), default=time.time() + 1)
        return max(1.0, round(soonest - time.time()))

    def _start(self, rec: _Record) -> _Link:
        """Create, attach, start the container; wait for the agent; send it the session's setup."""
        runtime = get_runtime(rec.language)
        labels = labels_for(
            RECORD_KIND,
            rec.max_lifetime + LABEL_GRACE,
            **{SESSION_LABEL: rec.id, REGISTRY_LABEL: self.registry_id, TENANT_LABEL: rec.tenant},
        )
        # The registry owns a session's container, not this process: a restart must not orphan it.
        labels.pop(OWNER, None)
        spec = sandbox_spec(rec.limits, rec.image, rec.uid, labels, command=AGENT)
        try:
            cid = self.engine.create(spec)
        except ImageNotFoundError as exc:
            raise ImageNotFoundError(f"{exc} (build it with `execbox images build`)") from exc
        rec.container_id = cid
        channel = self.engine.attach(cid)
        link = _Link(cid, channel, "attach")
        try:
            self.engine.start(cid)
            deadline = time.monotonic() + self.config.ready_timeout
            link.send(
                {
                    "op": "init",
                    "token": rec.token,
                    "repl": rec.repl,
                    "repl_argv": list(REPL_ARGV.get(rec.language, ())),
                    "run": {"argv": list(runtime.argv), "filename": runtime.filename},
                    "env": runtime.environment({}),
                    "workdir": WORKDIR,
                    "interrupt_grace": self.config.interrupt_grace,
                }
            )
            answer = link.reply(deadline)
            if not answer.get("ok"):
                raise SandboxError(f"session agent refused its setup: {answer}")
        except (_Gone, TimeoutError) as exc:
            detail = link.agent_stderr.decode("utf-8", "replace").strip()[-500:]
            link.close()
            raise SandboxError(f"session {rec.id}: the agent did not start ({exc}) {detail}".rstrip()) from None
        except BaseException:
            link.close()
            raise
        return link

    # -- calls ---------------------------------------------------------------------------

    def _connect(self, rec: _Record) -> _Link:
        """This process's connection to the session's agent: the cached one, or a new relay."""
        with self._lock:
            link = self._links.get(rec.id)
        if link is not None and link.channel.alive():
            return link
        if link is not None:
            self._drop_link(rec.id, link)
        assert rec.container_id is not None
        channel = self.engine.exec(rec.container_id, RELAY, f"{rec.uid}:{rec.uid}")
        link = _Link(rec.container_id, channel, "relay")
        try:
            link.send({"op": "hello", "token": rec.token})
            link.reply(time.monotonic() + self.config.ready_timeout)
        except BaseException:
            link.close()
            raise
        log.info("session %s adopted (relay)", rec.id, extra={"session_id": rec.id})
        with self._lock:
            self._links[rec.id] = link
        return link

    def _execute_locked(
        self, rec: _Record, req: SessionExecuteRequest, timeout: float, on_output: Callable[[str, bytes], None] | None
    ) -> SessionResult:
        if rec.status != "ready" or rec.container_id is None:
            raise SessionBusyError(f"session {rec.id} is still being created")
        rec.calls += 1
        rec.last_used_at = time.time()
        if not self.store.put_record(RECORD_KIND, rec.key, rec.model_dump(mode="json"), rec.record_ttl(), "update"):
            raise SessionNotFoundError(f"no session {rec.id!r}")  # deleted just now
        started = time.monotonic()
        try:
            link = self._connect(rec)
        except (_Gone, TimeoutError, EngineError, SandboxError) as exc:
            if isinstance(exc, EngineError) and self._check_container(rec) is None:
                raise  # the engine failed, the session may well be fine: try again later
            log.warning("session %s: cannot reach its agent (%s): ending it", rec.id, exc)
            self._end(rec, "its agent does not answer")
            raise SessionNotFoundError(f"session {rec.id} ended: its container stopped answering") from None
        link.in_use = True
        try:
            result = self._call(rec, link, req, timeout, started, on_output)
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
        rec: _Record,
        link: _Link,
        req: SessionExecuteRequest,
        timeout: float,
        started: float,
        on_output: Callable[[str, bytes], None] | None,
    ) -> SessionResult:
        cap = rec.limits.output_bytes
        link.decoder.max_frame = max(cap, 1 << 16) + (1 << 16)
        out, err = CappedOutput(cap, "stdout", on_output), CappedOutput(cap, "stderr", on_output)
        files = CollectedFiles(cap)
        meta: dict[str, Any] | None = None
        ended = killed = False
        deadline = time.monotonic() + timeout + self.config.interrupt_grace + _RESTART_SLACK
        try:
            link.send(
                {
                    "op": "exec",
                    "id": str(rec.calls),
                    "code": req.code,
                    "env": req.env,
                    "timeout": timeout,
                    "output_bytes": cap,
                    "files": {p: base64.b64encode(data).decode() for p, data in req.files.items()},
                    "collect": req.collect,
                }
            )
            for kind, body in link.frames(deadline):
                if kind == b"O":
                    out.add(body)
                elif kind == b"E":
                    err.add(body)
                elif kind == b"F":
                    files.add(body)
                elif kind == b"R":
                    meta = json.loads(body)
                    break
                elif kind == b"X":
                    raise SandboxError(f"session {rec.id}: agent failed: {body.decode('utf-8', 'replace')}")
        except TimeoutError:
            # The agent did not enforce the limit (wedged or subverted): end the session.
            self.engine.kill(link.container_id)
            killed = ended = True
        except _Gone:
            if self._still_running(link.container_id):
                # This connection broke (e.g. its relay was killed), not the session: the next call reconnects.
                self._drop_link(rec.id, link)
                raise SandboxError(
                    f"session {rec.id}: the connection to it broke during the call (the session lives on)"
                ) from None
            ended = True
        except (SandboxError, ValueError) as exc:
            self.engine.kill(link.container_id)
            self._drop_link(rec.id, link)
            self._end(rec, "its agent broke the protocol")
            raise SandboxError(f"session {rec.id}: {exc}") from exc
        oom = False
        if meta is not None and "files_error" in meta:
            raise InvalidRequestError("files", f"cannot write them in the session: {meta['files_error']}")
        if meta is not None:
            exit_code = int(meta["exit_code"])
            signal = meta.get("signal")
            timed_out = bool(meta.get("timed_out"))
            oom = signal == 9 and not timed_out and bool(meta.get("oom_kills"))
        else:
            oom = not killed and self._oom_killed(link.container_id)
            exit_code, signal, timed_out = 137, 9, killed
        return SessionResult(
            session_id=rec.id,
            call=rec.calls,
            language=rec.language,
            stdout=out.text(),
            stderr=err.text(),
            exit_code=exit_code,
            signal=signal,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            run_ms=meta.get("duration_ms") if meta else None,
            timed_out=timed_out,
            oom_killed=oom,
            output_truncated=out.truncated
            or err.truncated
            or bool(meta and (meta.get("stdout_truncated") or meta.get("stderr_truncated"))),
            files=files.files,
            files_truncated=files.truncated or bool(meta and meta.get("files_truncated")),
            repl_reset=bool(meta and (meta.get("reset") or meta.get("reset_before"))) or (ended and rec.repl),
            session_ended=ended,
        )

    # -- registry --------------------------------------------------------------------------

    def _registry_id(self) -> str:
        """This store's registry id (made once): labels tie containers to their registry."""
        for _ in range(3):
            found = self.store.get_record("meta", "session-registry")
            if isinstance(found, dict) and isinstance(found.get("id"), str):
                return str(found["id"])
            self.store.put_record("meta", "session-registry", {"id": secrets.token_hex(8)}, 10 * 365 * 86400, "create")
        raise ConfigurationError("the state store does not keep the session registry's id")

    def _records(self, prefix: str = "") -> builtins.list[_Record]:
        out = []
        for key, value in self.store.list_records(RECORD_KIND, prefix).items():
            try:
                rec = _Record.model_validate(value)
            except pydantic.ValidationError:
                log.warning("session registry: dropping unreadable record %s", key)
                self.store.delete_record(RECORD_KIND, key)
                continue
            if rec.registry == self.registry_id:
                out.append(rec)
        return out

    def _record_or_none(self, tenant: str, session_id: str, live: bool = True) -> _Record | None:
        """The session's record; with ``live``, None once it expired (the reaper ends it soon)."""
        if not _ID_RE.match(session_id or "") or not isinstance(tenant, str) or "/" in tenant:
            return None
        value = self.store.get_record(RECORD_KIND, f"{tenant}/{session_id}")
        if value is None:
            return None
        try:
            rec = _Record.model_validate(value)
        except pydantic.ValidationError:
            return None
        if rec.tenant != tenant or (live and rec.expires_at() <= time.time()):
            return None  # expired: to callers it is already gone
        return rec

    def _record(self, tenant: str, session_id: str) -> _Record:
        rec = self._record_or_none(tenant, session_id)
        if rec is None:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return rec

    def _reason_to_end(self, rec: _Record, now: float, has_container: bool, check_running: bool = True) -> str | None:
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
        if not has_container:
            return self._check_container(rec)  # listed before the record was? Ask the engine itself.
        return self._check_container(rec) if check_running else None

    def _check_container(self, rec: _Record) -> str | None:
        if rec.container_id is None:
            return "it has no container"
        try:
            state = self.engine.state(rec.container_id)
        except EngineError as exc:
            if "no such container" in str(exc).lower():
                return "its container is gone"
            return None  # the engine is unwell: decide on a later pass
        return None if state.running else "its container stopped"

    def _end(self, rec: _Record, reason: str) -> None:
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
        if cid is not None:
            self._remove_container(cid)
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

    def _drop_link(self, session_id: str, link: _Link) -> None:
        with self._lock:
            if self._links.get(session_id) is link:
                del self._links[session_id]
        if not link.in_use:
            link.close()

    def _remove_container(self, cid: str) -> None:
        try:
            self.engine.remove(cid)
        except Exception:
            log.warning("could not remove session container %s; a later pass will", cid[:12], exc_info=True)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidRequestError("sessions", "this Sessions object is closed")

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.config.reap_interval):
            try:
                self.reap()
            except Exception:  # the reaper must outlive any one failure
                log.exception("session reaper pass failed")
