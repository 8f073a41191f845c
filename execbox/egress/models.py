"""Data of the egress seam: settings, secrets, the grant handed to a run, log entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from .policy import NetworkPolicy

__all__ = [
    "DEFAULT_REDACT",
    "DEFAULT_STRIP",
    "EgressBinding",
    "EgressGrant",
    "EgressSettings",
    "NetworkLogEntry",
    "Secret",
]

DEFAULT_REDACT = (
    "authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
    "x-csrf-token",
    "x-xsrf-token",
    "proxy-authorization",
    "proxy-authenticate",
    "www-authenticate",
    "x-amz-security-token",
    "x-goog-iam-authorization-token",
    "x-goog-authenticated-user-email",
)
"""Header names whose values never appear in a network log."""

DEFAULT_STRIP = (
    "set-cookie",
    "set-cookie2",
    "x-api-key",
    "x-auth-token",
    "x-csrf-token",
    "x-xsrf-token",
    "x-amz-security-token",
    "x-goog-iam-authorization-token",
    "x-goog-authenticated-user-email",
    "www-authenticate",
    "proxy-authenticate",
)
"""Response headers removed before a response reaches the sandbox (``strip_response_headers``)."""


def _default_ca_dir() -> Path:
    return Path.home() / ".local" / "share" / "execbox" / "egress-ca"


class Secret(BaseModel):
    """A value the sandbox never sees: it gets a placeholder, the proxy swaps it in for ``hosts``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: SecretStr
    hosts: tuple[str, ...] = Field(min_length=1, description="Host patterns the real value may be sent to.")

    def wire(self) -> dict[str, Any]:
        """As JSON for a request to the service: the real value (``model_dump`` masks it)."""
        return {"value": self.value.get_secret_value(), "hosts": list(self.hosts)}

    @field_validator("value")
    @classmethod
    def _not_short(cls, v: SecretStr) -> SecretStr:
        # Response scrubbing replaces the value wherever it occurs: a tiny value would mangle bodies.
        if len(v.get_secret_value()) < 6:
            raise ValueError("a secret value must be at least 6 characters long")
        return v


class EgressSettings(BaseModel):
    """Installation-wide configuration of the egress proxy (one per service / executor)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    ca_dir: Path = Field(default_factory=_default_ca_dir, description="Where the per-installation CA lives (0700).")
    host_map: dict[str, str] = Field(
        default_factory=dict,
        description="Upstream overrides: 'api.example.test' (or 'host:port') -> 'ip:port'. "
        "Mapped hosts skip the private-address check: the operator chose them.",
    )
    upstream_ca_file: Path | None = Field(
        None, description="Extra CA bundle the proxy trusts for upstream TLS (e.g. a test upstream's self-signed cert)."
    )
    hooks: list[Any] = Field(
        default_factory=list, description="EgressHook objects, or 'module:attribute' strings naming one."
    )
    hook_entry_points: bool = Field(False, description="Also load hooks from the 'execbox.egress_hooks' entry points.")
    proxy_port: int = Field(0, ge=0, lt=65536, description="Port on the network gateway; 0 picks a free one.")
    network_name: str | None = Field(None, description="Docker network name; default: one per process.")
    max_body_bytes: int = Field(32 << 20, gt=0, description="Largest request/response body the proxy buffers.")
    max_log_entries: int = Field(1000, gt=0, description="Network log entries kept per run; later ones are counted.")
    startup_timeout: float = Field(20.0, gt=0)
    firewall: Literal["iptables", "none"] = Field(
        "iptables", description="'none' only where another layer already isolates the network (tests of the proxy)."
    )


@dataclass(frozen=True)
class EgressGrant:
    """What the executor adds to one run that has egress."""

    run_id: str
    network: str  # the internal network's name (SandboxSpec.network)
    env: dict[str, str]  # proxy settings, CA variables, secret placeholders
    files: dict[str, str] = field(default_factory=dict)  # relative to the working directory, text
    proxy_url: str = ""  # without the credential (for display)
    # Per language, what the runtime loads before the program (set by env for a runtime started
    # for the run; a runtime started ahead of the run, in the warm pool, is told to load it).
    preloads: dict[str, str] = field(default_factory=dict)


class BoundSecretData(BaseModel):
    """A secret as a grant bound it: the placeholder its sandbox holds, and the real value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    placeholder: str
    value: str = Field(repr=False)
    hosts: tuple[str, ...]


class EgressBinding(BaseModel):
    """What re-establishes a grant in another process (a session's, after a restart): the proxy
    credential its sandbox holds, its policies, its secrets (real values: keep it private)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    network: str = Field(description="The internal network the sandbox is on.")
    proxy: str = Field(description="gateway:port of the proxy, baked into the sandbox's environment.")
    username: str
    password: str = Field(repr=False)
    policies: tuple[NetworkPolicy, ...]
    secrets: tuple[BoundSecretData, ...] = ()
    tenant: str | None = None
    user_id: str | None = None


class NetworkLogEntry(BaseModel):
    """One request a run made (or tried to make) through the proxy."""

    time: float = Field(description="Unix time the request arrived at the proxy.")
    method: str
    url: str
    status: int | None = Field(None, description="Status the sandbox received (None if the connection failed).")
    request_bytes: int = 0
    response_bytes: int = 0
    duration_ms: float = 0.0
    decision: Literal["allowed", "denied", "mocked"]
    rule: str = Field("", description="The rule or check that decided, e.g. 'allow:api.stripe.com', 'private-address'.")
    reason: str = ""
    request_headers: dict[str, str] = Field(default_factory=dict)
    response_headers: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
