"""Allow/deny by the run's policy (host patterns, methods, path prefixes; deny wins; default deny).

A tunnel is decided when it is asked for: a CONNECT to a host and port that no
rule allows (or that a host-wide rule denies) is answered 403 at once, with the
reason in ``x-execbox-denied``, instead of 200 and a tunnel that leads nowhere.
Each request inside an allowed tunnel is decided again, with its method and path.
"""

from __future__ import annotations

from .._mitm import http
from ..policy import decide, normalize_host
from ._common import DECISION, RULE, deny, fail_closed, run_of

__all__ = ["PolicyCheck"]


class PolicyCheck:
    @fail_closed("connect")
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:  # no credential: already answered 407
            return
        run = run_of(flow)
        if run is None:
            deny(flow, "unauthenticated", "no run credential")
            return
        decision = decide(run.policies, normalize_host(flow.request.host), flow.request.port)
        if not decision.allowed:
            deny(flow, decision.rule, decision.reason)

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
