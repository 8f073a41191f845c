"""Allow/deny by the run's policy (host patterns, methods, path prefixes; deny wins; default deny)."""

from __future__ import annotations

from .._mitm import http
from ..policy import decide, normalize_host
from ._common import DECISION, RULE, deny, fail_closed, run_of

__all__ = ["PolicyCheck"]


class PolicyCheck:
    @fail_closed("request")
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        run = run_of(flow)
        if run is None:
            deny(flow, "unauthenticated", "no run credential")
            return
        req = flow.request
        host = normalize_host(req.host)
        # Inside a CONNECT tunnel the destination is the tunnel's; a different Host header
        # would let the upstream serve another site than the one the policy checked.
        claimed = req.host_header
        if claimed is not None and normalize_host(req.pretty_host) != host:
            deny(flow, "host-mismatch", f"Host header {req.pretty_host!r} does not match the destination {host!r}")
            return
        decision = decide(run.policies, host, req.port, req.method, req.path)
        if not decision.allowed:
            deny(flow, decision.rule, decision.reason)
            return
        flow.metadata[DECISION] = "allowed"
        flow.metadata[RULE] = decision.rule
