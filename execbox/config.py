"""Configuration objects of the library (the service reads env vars elsewhere)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .models import DEFAULT_MAX_LIMITS, Limits

__all__ = ["ExecutorConfig"]


class ExecutorConfig(BaseModel):
    """How an ``Executor`` runs sandboxes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = Field(None, description="Sandbox image; default: the locally built execbox image.")
    default_limits: Limits = Field(default_factory=lambda: Limits())
    max_limits: Limits = Field(default_factory=lambda: DEFAULT_MAX_LIMITS)
    max_code_bytes: int = Field(1 << 20, gt=0, description="Largest accepted program source, in bytes.")
    kill_grace: float = Field(
        1.0, ge=0, description="Seconds after the timeout before the host kills a sandbox whose agent did not."
    )
    uid_base: int = Field(100_000, ge=1000, description="First UID handed to sandboxes (one per live sandbox).")
    uid_count: int = Field(100_000, ge=16)
    sweep_on_start: bool = Field(True, description="Remove orphaned execbox resources when the executor starts.")

    @model_validator(mode="after")
    def _defaults_within_max(self) -> ExecutorConfig:
        over = self.default_limits.exceeding(self.max_limits)
        if over:
            raise ValueError(f"default limits exceed the maximum: {', '.join(over)}")
        return self
