"""Network policy of one run: allow/deny rules over host patterns, methods and path prefixes.

Pure functions, no I/O: the proxy's policy addon calls ``decide``. Semantics:

* a rule matches a request when its host pattern matches the destination host and,
  if given, its port, its methods and one of its path prefixes match;
* any matching deny rule denies (deny wins), otherwise a matching allow rule allows,
  otherwise the request is denied (default deny);
* several policies (a tenant's ceiling and the request's own) must all allow.

Host patterns: ``api.stripe.com`` (exactly that host), ``*.github.com`` (any subdomain,
at any depth, but not ``github.com`` itself), ``*`` (any host). Private, loopback and
link-local destinations are refused separately, on the resolved address
(``execbox.egress.addresses``), whatever the policy says.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["Decision", "NetworkPolicy", "Rule", "decide", "host_matches", "normalize_host"]

_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_RE = re.compile(rf"^(\*|(\*\.)?{_LABEL}(\.{_LABEL})*|\[[0-9a-f:.]+\])$")
_METHOD_RE = re.compile(r"^[A-Z]+$")


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def host_matches(pattern: str, host: str) -> bool:
    """Does ``host`` match ``pattern`` (``*``, ``*.example.com`` or an exact host)?"""
    host = normalize_host(host)
    pattern = normalize_host(pattern)
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


class Rule(BaseModel):
    """One allow or deny rule. A plain string is shorthand for ``Rule(host=...)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="'api.stripe.com', '*.github.com' or '*'; may end in ':port'.")
    methods: tuple[str, ...] | None = Field(None, description="HTTP methods (any when unset).")
    paths: tuple[str, ...] | None = Field(None, description="Path prefixes, e.g. '/v1/customers' (any when unset).")
    ports: tuple[int, ...] | None = Field(None, description="Destination ports (any when unset).")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"host": value}
        return value

    @model_validator(mode="after")
    def _split_port(self) -> Rule:
        host = self.host.strip().lower()
        if ":" in host and not host.startswith("["):
            host, _, port = host.rpartition(":")
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"invalid port in host pattern {self.host!r}")
            object.__setattr__(self, "ports", (*(self.ports or ()), int(port)))
        host = host.rstrip(".")
        if not _HOST_RE.match(host):
            raise ValueError(f"invalid host pattern {self.host!r}: use 'api.example.com', '*.example.com' or '*'")
        object.__setattr__(self, "host", host)
        return self

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return None
        out = tuple(m.upper() for m in v)
        for m in out:
            if not _METHOD_RE.match(m):
                raise ValueError(f"invalid HTTP method {m!r}")
        return out

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return None
        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"a path prefix starts with '/': {p!r}")
        return v

    @property
    def host_only(self) -> bool:
        """True when the rule constrains nothing but host and port."""
        return self.methods is None and self.paths is None

    def describe(self) -> str:
        parts = [self.host]
        if self.ports:
            parts.append("ports=" + ",".join(map(str, self.ports)))
        if self.methods:
            parts.append("methods=" + ",".join(self.methods))
        if self.paths:
            parts.append("paths=" + ",".join(self.paths))
        return " ".join(parts)

    def matches_host(self, host: str, port: int) -> bool:
        return host_matches(self.host, host) and (self.ports is None or port in self.ports)

    def matches(self, host: str, port: int, method: str, path: str) -> bool:
        if not self.matches_host(host, port):
            return False
        if self.methods is not None and method.upper() not in self.methods:
            return False
        return self.paths is None or any(_path_has_prefix(path, p) for p in self.paths)


class NetworkPolicy(BaseModel):
    """What a run may reach. ``mode="none"`` (the default): no network at all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["none", "proxy"] = "none"
    allow: tuple[Rule, ...] = Field((), description="Rules that allow; nothing is allowed without one.")
    deny: tuple[Rule, ...] = Field((), description="Rules that deny; a match wins over any allow rule.")
    redact_headers: tuple[str, ...] = Field((), description="Header names redacted in the log, besides the defaults.")
    strip_response_headers: bool = Field(
        True, description="Remove sensitive response headers (set-cookie, x-api-key, ...) before the sandbox sees them."
    )

    @field_validator("redact_headers")
    @classmethod
    def _lower(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.strip().lower() for h in v)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # "allow:<rule>", "deny:<rule>", "default-deny", "ambiguous-path"
    reason: str


def _path_has_prefix(path: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def _ambiguous(path: str) -> bool:
    """Dot segments or encoded slashes: a server may read the path differently from us."""
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in path:
        return True
    return any(seg in (".", "..") for seg in unquote(path).split("/"))


def _decide_one(policy: NetworkPolicy, host: str, port: int, method: str | None, path: str | None) -> Decision:
    if method is None or path is None:
        # Tunnel level (CONNECT): only host-wide denies apply; any allow rule for the host
        # lets the tunnel open, and each request inside it is decided again.
        for rule in policy.deny:
            if rule.host_only and rule.matches_host(host, port):
                return Decision(False, f"deny:{rule.describe()}", f"{host} is denied")
        for rule in policy.allow:
            if rule.matches_host(host, port):
                return Decision(True, f"allow:{rule.describe()}", "")
        return Decision(False, "default-deny", f"{host}:{port} is not allowed by the policy")
    bare = path.split("?", 1)[0].split("#", 1)[0] or "/"
    uses_paths = any(r.paths for r in (*policy.allow, *policy.deny))
    if uses_paths and _ambiguous(bare):
        return Decision(False, "ambiguous-path", "the path has dot segments or encoded slashes")
    for rule in policy.deny:
        if rule.matches(host, port, method, bare):
            return Decision(False, f"deny:{rule.describe()}", f"{method} {host}{bare} is denied")
    for rule in policy.allow:
        if rule.matches(host, port, method, bare):
            return Decision(True, f"allow:{rule.describe()}", "")
    return Decision(False, "default-deny", f"{method} {host}:{port}{bare} is not allowed by the policy")


def decide(
    policies: Sequence[NetworkPolicy], host: str, port: int, method: str | None = None, path: str | None = None
) -> Decision:
    """Decide a request (or, with no method/path, a tunnel) against every policy in turn."""
    if not policies:
        return Decision(False, "default-deny", "no policy")
    last = Decision(False, "default-deny", "no policy")
    for policy in policies:
        if policy.mode != "proxy":
            return Decision(False, "mode-none", "this run has no network access")
        last = _decide_one(policy, normalize_host(host), port, method, path)
        if not last.allowed:
            return last
    return last
