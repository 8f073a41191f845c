"""Tenants and API keys.

A tenant is who pays for executions: it owns its API keys (stored as SHA-256
hashes, never in clear), the languages and images it may use, its maximum
limits and its quotas. Tenants come from a TOML file::

    [tenants.acme]
    api_keys = ["sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"]
    languages = ["python", "javascript"]
    max_concurrent = 4
    executions_per_minute = 120
    webhook_secret = "whsec_..."
    isolation = "gvisor"            # forced; or a list of allowed values: ["container", "gvisor"]
    checkpoint_quota = "1g"         # disk its paused sessions may hold (default: the service's)

    [tenants.acme.max_limits]
    timeout = 30
    memory = "512m"

API keys are random tokens with plenty of entropy, so one SHA-256 is enough to
store them safely (a slow password hash would only slow every request down).
Make a key and its hash with ``python -m execbox.server.auth``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..egress.policy import NetworkPolicy
from ..engine.base import Isolation
from ..exceptions import ConfigurationError, InvalidRequestError
from ..models import Limits, Size
from ..runtimes import RUNTIMES, get_runtime
from ..state.base import check_id

__all__ = ["ANONYMOUS", "Authenticator", "Tenant", "TenantPolicy", "hash_key", "load_tenants_file", "sign"]

log = logging.getLogger("execbox.server.auth")

ANONYMOUS = "anonymous"
_HASH_PREFIX = "sha256:"


def hash_key(key: str) -> str:
    """The stored form of an API key: ``sha256:<hex>``."""
    return _HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def _as_hash(key_or_hash: str) -> str:
    if key_or_hash.startswith(_HASH_PREFIX):
        digest = key_or_hash[len(_HASH_PREFIX) :].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("a key hash must be 'sha256:' and 64 hex digits")
        return _HASH_PREFIX + digest
    if len(key_or_hash) < 16:
        raise ValueError("an API key must have at least 16 characters")
    return hash_key(key_or_hash)


class TenantPolicy(BaseModel):
    """What one tenant may do. Unset maximum limits are the service's maximum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: tuple[str, ...] = Field((), description="Hashes ('sha256:<hex>') of the tenant's API keys.")
    languages: tuple[str, ...] = Field(
        tuple(rt.name for rt in RUNTIMES), description="Languages the tenant may use (names or aliases)."
    )
    images: tuple[str, ...] = Field(
        (), description="Sandbox images the tenant may name besides the default; '*' allows any."
    )
    max_limits: dict[str, Any] = Field(default_factory=dict, description="Per-field maximum limits.")
    max_concurrent: int = Field(2, ge=1, description="Executions of this tenant running at once.")
    executions_per_minute: int = Field(60, ge=1, description="Executions started per sliding minute.")
    webhook_secret: str | None = Field(None, min_length=16, description="HMAC-SHA256 key of webhook signatures.")
    network: bool = Field(False, description="May use egress through the policy proxy (network.mode = 'proxy').")
    isolation: Isolation | tuple[Isolation, ...] | None = Field(
        None,
        description="One isolation ('gvisor'): every run and session of the tenant gets it, asking for another is"
        " refused; a list: those allowed (a request naming none gets the service's default if allowed, else the"
        " first); None: any.",
    )
    checkpoint_quota: Size | None = Field(
        None,
        ge=0,
        description="Disk (bytes, or e.g. '1g') the tenant's paused sessions' checkpoints may hold together;"
        " None: the service's session_checkpoint_quota.",
    )
    egress: NetworkPolicy | None = Field(
        None,
        description="Ceiling on every run's own network policy: a request must be allowed by both"
        " (e.g. allow = ['api.stripe.com', '*.github.com']). None: the run's policy alone decides.",
    )

    @field_validator("api_keys")
    @classmethod
    def _hashes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for h in v:
            if not h.startswith(_HASH_PREFIX):
                raise ValueError("store API keys hashed: 'sha256:<hex>' (see python -m execbox.server.auth)")
        return tuple(_as_hash(h) for h in v)

    @field_validator("languages")
    @classmethod
    def _languages(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return tuple(dict.fromkeys(get_runtime(name).name for name in v))
        except InvalidRequestError as exc:
            raise ValueError(exc.message) from None

    @field_validator("max_limits")
    @classmethod
    def _limits(cls, v: dict[str, Any]) -> dict[str, Any]:
        Limits.model_validate(v)  # unknown fields and bad sizes fail at load time
        return v


class Tenant:
    """A tenant with its policy resolved against the service's maximum limits."""

    def __init__(self, name: str, policy: TenantPolicy, service_max: Limits) -> None:
        try:
            check_id("tenant", name)  # it namespaces state, volumes and logs
        except InvalidRequestError as exc:
            raise ConfigurationError(f"tenant name {name!r}: {exc.message}") from None
        self.name = name
        self.policy = policy
        self.max_limits = service_max.merged(policy.max_limits)
        over = self.max_limits.exceeding(service_max)
        if over:
            raise ConfigurationError(f"tenant {name!r}: max_limits above the service's maximum: {', '.join(over)}")

    def isolation_for(self, requested: Isolation | None, default: Isolation) -> Isolation | None:
        """The isolation a request of this tenant runs under, or None if it asked for one it may not use."""
        allowed = self.policy.isolation
        if allowed is None:
            return requested or default
        if isinstance(allowed, str):
            allowed = (allowed,)
        if requested is None:
            return default if default in allowed else allowed[0]
        return requested if requested in allowed else None

    def image_allowed(self, image: str, default_image: str) -> bool:
        return image == default_image or "*" in self.policy.images or image in self.policy.images

    def __repr__(self) -> str:
        return f"Tenant({self.name!r})"


def load_tenants_file(path: Path) -> dict[str, TenantPolicy]:
    """Parse a tenants TOML file; errors name the file and the tenant."""
    try:
        mode = path.stat().st_mode
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigurationError(f"cannot read tenants file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"tenants file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("tenants file %s is readable by others (it may hold webhook secrets): chmod 600 it", path)
    unknown = set(raw) - {"tenants"}
    if unknown:
        raise ConfigurationError(f"tenants file {path}: unknown top-level keys {sorted(unknown)}")
    tenants = raw.get("tenants", {})
    if not isinstance(tenants, dict):
        raise ConfigurationError(f"tenants file {path}: [tenants] must be a table")
    out: dict[str, TenantPolicy] = {}
    for name, body in tenants.items():
        try:
            out[name] = TenantPolicy.model_validate(body)
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigurationError(f"tenants file {path}: tenant {name!r}: {where}: {err['msg']}") from None
    return out


class Authenticator:
    """Maps API keys (by hash) to tenants; or everything to one tenant in no-auth mode."""

    def __init__(self, tenants: dict[str, Tenant], anonymous: Tenant | None = None) -> None:
        self.tenants = tenants
        self.anonymous = anonymous
        self._by_hash: dict[str, Tenant] = {}
        for tenant in tenants.values():
            for h in tenant.policy.api_keys:
                if h in self._by_hash:
                    raise ConfigurationError(
                        f"one API key is given to two tenants: {self._by_hash[h].name}, {tenant.name}"
                    )
                self._by_hash[h] = tenant
        if anonymous is None and not self._by_hash:
            raise ConfigurationError("no API keys configured: give a tenants file (--tenants) or use --no-auth")

    @classmethod
    def build(
        cls,
        service_max: Limits,
        tenants_file: Path | None = None,
        api_keys: dict[str, str] | None = None,
        no_auth: bool = False,
    ) -> Authenticator:
        policies = load_tenants_file(tenants_file) if tenants_file is not None else {}
        for name, key in (api_keys or {}).items():
            try:
                h = _as_hash(key)
            except ValueError as exc:
                raise ConfigurationError(f"API key of tenant {name!r}: {exc}") from None
            base = policies.get(name, TenantPolicy())
            policies[name] = base.model_copy(update={"api_keys": (*base.api_keys, h)})
        tenants = {name: Tenant(name, p, service_max) for name, p in policies.items()}
        anonymous = Tenant(ANONYMOUS, TenantPolicy(max_concurrent=1 << 20, executions_per_minute=1 << 30), service_max)
        return cls(tenants, anonymous if no_auth else None)

    def tenant(self, name: str) -> Tenant | None:
        """The tenant called ``name`` (jobs carry only the name from replica to replica)."""
        if self.anonymous is not None and name == self.anonymous.name:
            return self.anonymous
        return self.tenants.get(name)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an ``Authorization: Bearer <key>`` header, or None."""
        if self.anonymous is not None:
            return self.anonymous
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        # Look up by hash: the secret itself is never compared or stored.
        return self._by_hash.get(hash_key(key.strip()))


def sign(secret: str, body: bytes) -> str:
    """The webhook signature header value: ``sha256=<hex HMAC-SHA256 of body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """``python -m execbox.server.auth``: print a new API key and the hash to put in the tenants file."""
    args = sys.argv[1:] if argv is None else argv
    key = args[0] if args else "xbx_" + secrets.token_urlsafe(32)
    print(f"key:  {key}\nhash: {hash_key(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
