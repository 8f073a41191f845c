"""Egress: a policy-enforcing proxy that the kernel makes unavoidable.

Runs default to no network at all. A run with ``NetworkPolicy(mode="proxy", ...)``
sits on an internal Docker network whose only reachable address is the egress
proxy (mitmproxy, used as a library) on the network's gateway; host firewall rules
make that so. The proxy attributes every request to its run by a per-run
credential, applies the policy (deny wins, default deny, private addresses refused
on the resolved address), swaps secret placeholders for real values on bound
hosts only, runs operator hooks, strips sensitive response headers and keeps a
per-run network log with redacted headers. Every deciding step fails closed.

Seam for the executor::

    egress = Egress(engine, EgressSettings(...))
    grant = egress.prepare(run_id, policy, secrets)     # .network .env .files
    ...                                                   # run the sandbox
    network_log = egress.finish(run_id)
    egress.close()
"""

from .hooks import EgressHook, HookContext, HookRequest, HookResponse
from .manager import Egress
from .models import DEFAULT_REDACT, DEFAULT_STRIP, EgressGrant, EgressSettings, NetworkLogEntry, Secret
from .policy import NetworkPolicy, Rule

__all__ = [
    "DEFAULT_REDACT",
    "DEFAULT_STRIP",
    "Egress",
    "EgressGrant",
    "EgressHook",
    "EgressSettings",
    "HookContext",
    "HookRequest",
    "HookResponse",
    "NetworkLogEntry",
    "NetworkPolicy",
    "Rule",
    "Secret",
]
