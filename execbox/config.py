"""Configuration objects of the library (the service reads env vars elsewhere)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .engine.base import Isolation
from .models import DEFAULT_MAX_LIMITS, Limits

__all__ = ["ExecutorConfig"]


class ExecutorConfig(BaseModel):
    """How an ``Executor`` runs sandboxes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = Field(None, description="Sandbox image; default: the locally built execbox image.")
    isolation: Isolation = Field(
        "container", description="Isolation of runs that name none: container (runc) or gvisor (runsc)."
    )
    node_name: str | None = Field(None, description="This node's name on results; default: the host name.")
    default_limits: Limits = Field(default_factory=lambda: Limits())
    max_limits: Limits = Field(default_factory=lambda: DEFAULT_MAX_LIMITS)
    max_code_bytes: int = Field(1 << 20, gt=0, description="Largest accepted program source, in bytes.")
    max_state_bytes: int = Field(256 << 10, gt=0, description="Largest state given to a run, as JSON.")
    kill_grace: float = Field(
        1.0, ge=0, description="Seconds after the timeout before the host kills a sandbox whose agent did not."
    )
    uid_base: int = Field(100_000, ge=1000, description="First UID handed to sandboxes (one per live sandbox).")
    uid_count: int = Field(100_000, ge=16)
    sweep_on_start: bool = Field(True, description="Remove orphaned execbox resources when the executor starts.")
    data_dir: str = Field("/var/lib/execbox", description="Where execbox keeps volumes (and, in the service, state).")
    volume_quota: int = Field(256 << 20, ge=8 << 20, description="Size of each user's volume, in bytes.")
    volume_max_idle: float = Field(
        30 * 86400, gt=0, description="Volumes unused for this many seconds are removed by the reaper."
    )
    pool: bool = Field(True, description="Create and warm sandboxes ahead of demand (each still used once).")
    pool_languages: tuple[str, ...] = Field(
        ("python", "javascript"),
        description="Languages kept ready with the default limits and image, under the default isolation (and"
        " under another from its first run on).",
    )
    pool_min_ready: int = Field(2, ge=0, description="Ready sandboxes kept per pooled profile.")
    pool_max_total: int = Field(8, ge=0, description="Cap on ready plus in-creation pooled sandboxes.")
    pool_max_idle_age: float = Field(300.0, gt=0, description="Ready sandboxes older than this are replaced.")
    pool_refill_concurrency: int = Field(2, ge=1, description="Sandboxes created at once by the refiller.")
    pool_egress: bool = Field(
        True, description="Once a run uses egress, also keep sandboxes ready on the egress network."
    )

    @model_validator(mode="after")
    def _defaults_within_max(self) -> ExecutorConfig:
        over = self.default_limits.exceeding(self.max_limits)
        if over:
            raise ValueError(f"default limits exceed the maximum: {', '.join(over)}")
        return self
