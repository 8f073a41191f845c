"""Egress of sessions: a grant per session (its policy, secrets and the tenant's ceiling),
re-established from the registry by a process that adopts the session, a network log per
call, and the grant finished with the session.

A session's sandbox has its proxy URL (gateway, port, credential) in its environment for
its whole life, so a process that adopts it must run its proxy at the same address: give
``EgressSettings`` a stable ``network_name`` and ``proxy_port`` (the service does). The
registry record keeps what the new proxy needs (``EgressBinding``: the credential, the
policies, the secrets' real values); a session whose grant cannot be re-established
(the proxy moved) ends, with that reason, rather than live on without its network.
"""

from __future__ import annotations

import logging
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from ..egress import Egress, EgressGrant, EgressSettings, NetworkLogEntry, NetworkPolicy, Secret
from ..egress.manager import LazyEgress
from ..exceptions import ConfigurationError, EngineError, InvalidRequestError
from ..models import invalid_request
from .models import Record
from .registry import SessionsBase

__all__ = ["SessionsNetwork"]

log = logging.getLogger("execbox.sessions")


class _NetworkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    network: NetworkPolicy | None = None
    secrets: dict[str, Secret] = Field(default_factory=dict)


def network_request(network: Any, secrets: Any) -> tuple[NetworkPolicy | None, dict[str, Secret]]:
    """A session's network policy and secrets, checked (InvalidRequestError naming the field)."""
    if isinstance(network, str):
        if network not in ("none", "proxy"):
            raise InvalidRequestError("network", "'none', 'proxy' or a policy")
        network = {"mode": network}
    try:
        req = _NetworkRequest.model_validate({"network": network, "secrets": secrets or {}})
    except pydantic.ValidationError as exc:
        raise invalid_request(exc, default="network") from None
    policy = req.network if req.network is not None and req.network.mode == "proxy" else None
    if req.secrets and policy is None:
        raise InvalidRequestError("secrets", "secrets need network mode 'proxy' (nothing else could use them)")
    for name in req.secrets:
        if not name.isidentifier() or not name.isascii():
            raise InvalidRequestError(f"secrets.{name}", "a secret name is an environment variable name")
    return policy, req.secrets


class SessionsNetwork(SessionsBase):
    _egress: LazyEgress

    def _init_egress(self, egress: Egress | EgressSettings | None, proxy_host_map: dict[str, str] | None) -> None:
        self._egress = LazyEgress(self.engine, egress, proxy_host_map)

    @property
    def egress(self) -> Egress:
        """The egress subsystem (created on first use; started by the first session that asks for it)."""
        return self._egress.get()

    def _grant(
        self,
        rec: Record,
        policy: NetworkPolicy,
        secrets: dict[str, Secret],
        ceiling: NetworkPolicy | None,
    ) -> EgressGrant:
        """Register the session with the proxy; the record keeps what re-establishes it."""
        grant = self.egress.prepare(rec.id, policy, secrets, ceiling=ceiling, tenant=rec.tenant, user_id=rec.user_id)
        rec.network, rec.policy, rec.egress = "proxy", policy, self.egress.binding(rec.id)
        return grant

    def _restore_grant(self, rec: Record) -> str | None:
        """Make sure this process's proxy serves the session; the reason to end it if it cannot.

        Errors of the proxy itself (it cannot start here) are raised: the session may be fine.
        """
        if rec.egress is None or rec.status != "ready":
            return None
        egress = self.egress
        if egress.serves(rec.id):
            return None
        egress.start()  # ConfigurationError/EngineError: not the session's fault
        try:
            egress.restore(rec.egress)
        except ConfigurationError as exc:
            return f"its egress grant cannot be re-established: {exc}"
        log.info("session %s: egress grant re-established", rec.id, extra={"session_id": rec.id})
        return None

    def _restore_grants(self, records: list[Record]) -> list[tuple[Record, str]]:
        """The reaper's pass over egress sessions: re-establish grants, report the ones that cannot be.

        Only sessions on this installation's network (``network_name``): a process with other
        egress settings over the same registry (a CLI, an MCP server) leaves the others alone.
        """
        lost = []
        name = self.egress.settings.network_name
        for rec in records:
            if rec.egress is None or rec.egress.network != name:
                continue
            try:
                reason = self._restore_grant(rec)
            except (ConfigurationError, EngineError) as exc:
                log.warning("session %s: egress proxy unavailable here, try later: %s", rec.id, exc)
                continue
            if reason is not None:
                lost.append((rec, reason))
        return lost

    def _take_log(self, rec: Record) -> list[NetworkLogEntry]:
        if rec.egress is None or self._egress.made is None:
            return []
        return self._egress.get().take_log(rec.id)

    def _release_grant(self, rec: Record) -> None:
        made = self._egress.made
        if rec.egress is not None and made is not None:
            made.finish(rec.id)

    def _close_egress(self) -> None:
        self._egress.close()
