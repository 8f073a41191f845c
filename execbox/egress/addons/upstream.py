"""Where the proxy connects: the host map, then a public resolved address, pinned.

At request time the destination is resolved and every address checked (private,
loopback, link-local, metadata: denied with a 403); the checked address is pinned
and ``server_connect`` connects to exactly that address, so a name cannot resolve
differently between the check and the connection (DNS rebinding). ``server_connect``
also refuses any connection it cannot attribute to a run and a pinned address.
Hosts in the operator's host map go to their mapped address unchecked.
"""

from __future__ import annotations

from .._mitm import http, server_hooks
from ..addresses import Resolver, pick_address
from ..policy import decide, normalize_host
from ._common import DECISION, PINNED, ClientRuns, deny, fail_closed

__all__ = ["UpstreamGuard", "parse_host_map"]


def _split(value: str) -> tuple[str, int | None]:
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, int(port)
    return value, None


def parse_host_map(host_map: dict[str, str]) -> dict[tuple[str, int | None], tuple[str, int | None]]:
    """{'api.example.test': '127.0.0.1:8081'} -> {('api.example.test', None): ('127.0.0.1', 8081)}."""
    out: dict[tuple[str, int | None], tuple[str, int | None]] = {}
    for key, value in host_map.items():
        host, port = _split(key)
        out[(normalize_host(host), port)] = _split(value)
    return out


class UpstreamGuard:
    def __init__(self, clients: ClientRuns, host_map: dict[str, str], resolve: Resolver) -> None:
        self.clients = clients
        self.host_map = parse_host_map(host_map)
        self.resolve = resolve

    def mapped(self, host: str, port: int) -> tuple[str, int] | None:
        host = normalize_host(host)
        target = self.host_map.get((host, port)) or self.host_map.get((host, None))
        if target is None:
            return None
        return target[0], target[1] or port

    @fail_closed("request")
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.metadata.get(DECISION) != "allowed":
            return
        host, port = normalize_host(flow.request.host), flow.request.port
        mapped = self.mapped(host, port)
        if mapped is not None:
            address = mapped[0]
        else:
            picked, reason = await pick_address(host, port, self.resolve)
            if picked is None:
                deny(flow, "private-address", reason or "forbidden address")
                return
            address = picked
        flow.metadata[PINNED] = address
        self.clients.pin(flow.client_conn, host, port, address)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            self._server_connect(data)
        except Exception as exc:  # fail closed: no connection
            data.server.error = f"execbox denied (internal-error): {type(exc).__name__}"

    def _server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        run = self.clients.get(data.client)
        if data.server.address is None:
            data.server.error = "execbox denied (no-destination)"
            return
        host, port = normalize_host(str(data.server.address[0])), int(data.server.address[1])
        if run is None:
            data.server.error = "execbox denied (unauthenticated): no run for this connection"
            return
        verdict = decide(run.policies, host, port)
        if not verdict.allowed:
            data.server.error = f"execbox denied ({verdict.rule}): {verdict.reason}"
            return
        pinned = self.clients.pinned(data.client, host, port)
        if pinned is None:
            data.server.error = "execbox denied (unchecked-destination): no checked address"
            return
        mapped = self.mapped(host, port)
        data.server.address = (pinned, mapped[1] if mapped else port)
        # Upstream TLS names the host the policy checked, never a client-chosen SNI.
        data.server.sni = host
