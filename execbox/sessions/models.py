"""Sessions' models: configuration, requests, what callers see, and the registry's record."""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..egress.models import EgressBinding, NetworkLogEntry, Secret
from ..egress.policy import NetworkPolicy
from ..engine.base import Isolation
from ..images import SANDBOX_DIR
from ..models import (
    DEFAULT_MAX_LIMITS,
    MAX_COLLECT_PATTERNS,
    FileBytes,
    Limits,
    RunResult,
    Size,
    check_code,
    check_env,
    check_rel_path,
)
from ..state import check_id

__all__ = [
    "RECORD_KIND",
    "REGISTRY_LABEL",
    "SESSION_LABEL",
    "Record",
    "SessionCreateRequest",
    "SessionExecuteRequest",
    "SessionInfo",
    "SessionList",
    "SessionResult",
    "SessionsConfig",
]

RECORD_KIND = "session"  # record kind in the store, and the containers' execbox.kind label
SESSION_LABEL = "execbox.session"
REGISTRY_LABEL = "execbox.session.registry"
TENANT_LABEL = "execbox.tenant"
LOCKS = ":session"  # lock namespace: ':' is never in a tenant or user id, so never a state lock
ID_RE = re.compile(r"^ses_[0-9a-f]{24}$")
AGENT = ("python3", "-I", "-S", f"{SANDBOX_DIR}/session_agent.py")
REPL_ARGV = {
    "python": ("python3", f"{SANDBOX_DIR}/session_repl.py"),
    "javascript": ("node", f"{SANDBOX_DIR}/session_repl.js"),
}
LABEL_GRACE = 600.0  # the containers' expiry label: max lifetime plus this
RESTART_SLACK = 10.0  # a call's host deadline beyond timeout + grace (the agent restarts a worker)


class SessionsConfig(BaseModel):
    """How ``Sessions`` makes and bounds sessions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = Field(None, description="Default image; default: the locally built sandbox image.")
    isolation: Isolation = Field("container", description="Isolation of sessions that name none: container or gvisor.")
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
    pause_after: float | None = Field(
        None,
        gt=0,
        description="Default for gvisor sessions: pause to disk after this many seconds unused (None: never by"
        " itself).",
    )
    checkpoint_quota: Size | None = Field(
        2 << 30,
        ge=0,
        description="Default disk a tenant's paused sessions' checkpoints may hold together, in bytes (None: no"
        " limit); a tenant's own quota is given at create.",
    )
    max_code_bytes: int = Field(1 << 20, gt=0)
    uid_base: int = Field(
        200_000, ge=1000, description="First UID of session containers (apart from ephemeral runs' 100000+)."
    )
    uid_count: int = Field(100_000, ge=16)
    data_dir: str = Field(
        "/var/lib/execbox",
        description="Where this host's UID lease table lives (uids.db), shared with runs and volumes.",
    )


class SessionCreateRequest(BaseModel):
    """``POST /v1/sessions``."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(
        description="The end user the session belongs to (caps count per user).",
        json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$"},
    )
    language: str = Field("python", description="python, javascript or bash (aliases: py, js, node, sh).")
    image: str | None = Field(None, description="Sandbox image or package image name; default: the service's.")
    isolation: Isolation | None = Field(
        None,
        description="container (runc) or gvisor (gVisor's kernel between the code and the host's); default:"
        " the service's.",
    )
    limits: Limits | None = Field(None, description="Limits of the session's container; timeout is per call.")
    network: NetworkPolicy | None = Field(
        None,
        description="Egress: none by default (no network at all). mode='proxy' puts the session behind the egress"
        " proxy with this policy (allow/deny host patterns, deny wins, default deny), for every call.",
    )
    secrets: dict[str, Secret] = Field(
        default_factory=dict,
        description="Secrets the session never sees: env var NAME holds a placeholder that the proxy replaces"
        " with the real value only on requests to the secret's hosts (needs network mode 'proxy').",
    )
    idle_timeout: float | None = Field(None, gt=0, description="Seconds unused after which the session ends.")
    max_lifetime: float | None = Field(None, gt=0, description="Seconds after creation at which the session ends.")
    repl: bool | None = Field(
        None,
        description="Keep the interpreter between calls (variables, imports); default true for python and"
        " javascript. bash sessions run each call in a fresh bash (files in /work persist either way).",
    )
    pause_after: float | None = Field(
        None,
        gt=0,
        description="Pause the session to disk after this many seconds unused (isolation gvisor only; less than"
        " idle_timeout); its next call resumes it. Default: the service's (off unless configured).",
    )

    @field_validator("user_id")
    @classmethod
    def _user_id(cls, v: str) -> str:
        return check_id("user_id", v)

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in ("none", "proxy"):
                raise ValueError("'none', 'proxy' or a policy")
            return {"mode": v}
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
    isolation: Isolation = Field("container", description="Isolation of the session: container or gvisor.")
    limits: Limits = Field(description="Limits of the session's container (timeout: the default per call).")
    network: Literal["none", "proxy"] = Field("none", description="none, or proxy (egress through the proxy).")
    network_policy: NetworkPolicy | None = Field(None, description="The session's own egress policy (proxy).")
    status: Literal["creating", "ready"] = Field(description="creating while its container starts, then ready.")
    created_at: float = Field(description="Unix time of creation.")
    last_used_at: float = Field(description="Unix time the last call ended (or creation).")
    expires_at: float = Field(description="Unix time the session ends unless it is used before.")
    idle_timeout: float = Field(description="Seconds unused after which the session ends.")
    max_lifetime: float = Field(description="Seconds after creation at which the session ends whatever happens.")
    calls: int = Field(0, description="Calls made so far.")
    paused: bool = Field(False, description="Paused to disk (gvisor): holds no memory or CPU; a call resumes it.")
    pause_after: float | None = Field(
        None, description="Paused by itself after this many seconds unused (None: only when asked)."
    )
    checkpoint_bytes: int = Field(0, description="Disk its checkpoint holds while paused (counts against the quota).")
    node: str = Field("", description="The node holding the session (nodes mode: its name; else empty).")


class SessionList(BaseModel):
    """``GET /v1/sessions``."""

    sessions: list[SessionInfo] = Field(description="The tenant's live sessions, oldest first.")


class SessionResult(RunResult):
    """What one call in a session produced (its output only). Timeouts and OOM kills are fields, not exceptions."""

    session_id: str = Field(description="The session.")
    call: int = Field(description="Number of this call in the session (1, 2, ...).")
    isolation: Isolation = Field("container", description="Isolation of the session the call ran in.")
    repl_reset: bool = Field(
        False,
        description="The REPL was restarted before or during this call (a timeout it did not survive, an OOM"
        " kill, exit()): variables and imports of earlier calls are gone; files in /work stay.",
    )
    session_ended: bool = Field(False, description="The session is over (its container died or stopped answering).")
    resumed: bool = Field(False, description="The session was paused: this call resumed it first.")
    resume_ms: float | None = Field(None, description="How long resuming took (restoring it from its checkpoint).")
    network_log: list[NetworkLogEntry] = Field(
        default_factory=list, description="Requests this call made through the egress proxy (headers redacted)."
    )
    node: str = Field("", description="The node the call ran on (nodes mode: its name; else empty).")


class Record(BaseModel):
    """A session as the registry (the state store) holds it."""

    id: str
    tenant: str
    user_id: str
    language: str
    repl: bool
    image: str
    limits: Limits
    isolation: Isolation = "container"  # records made before isolations existed were runc
    network: Literal["none", "proxy"] = "none"
    policy: NetworkPolicy | None = None
    # What re-establishes its egress grant after a restart: the secrets' real values and the
    # proxy credential are in here (the registry must be private).
    egress: EgressBinding | None = Field(None, repr=False)
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
    paused_at: float | None = None  # checkpointed to disk (its container stopped) since then
    resumes: int = 0  # times restored from a checkpoint
    resumed_at: float | None = None  # last restored then (an automatic pause counts unused time from here too)
    pause_after: float | None = None  # paused by the reaper after this many seconds unused
    checkpoint_quota: int | None = None  # the tenant's checkpoint disk quota at creation (None: none)
    checkpoint_bytes: int = 0  # its checkpoint's size on disk while paused
    resume_attach: bool = False  # paused with its agent told: it takes a stream attached before the restore
    auto_pause_refused: float | None = None  # last_used_at when an automatic pause was refused (not retried)

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
                    "isolation",
                    "limits",
                    "network",
                    "status",
                    "created_at",
                    "last_used_at",
                    "idle_timeout",
                    "max_lifetime",
                    "calls",
                    "pause_after",
                    "checkpoint_bytes",
                }
            ),
            expires_at=self.expires_at(),
            paused=self.paused_at is not None,
            network_policy=self.policy,
        )
