"""Last line: deny whatever no addon explicitly allowed, and every non-HTTP flow.

If an earlier addon crashed without its own guard (mitmproxy swallows addon
exceptions), its decision is missing here and the request is denied.

HTTP(S) only: bytes in a tunnel that are neither TLS nor HTTP (a database's
startup packet, SSH, a client waiting for a server greeting) become a raw TCP
flow (the proxy runs with ``rawtcp``), which is ended at once and logged, so
the client fails now instead of at its own timeout.
"""

from __future__ import annotations

import time
from typing import Any

from .._mitm import http
from ..models import NetworkLogEntry
from ._common import DECISION, PINNED, ClientRuns, deny, fail_closed

__all__ = ["FailClosedGate"]

NOT_HTTP = "only HTTP and HTTPS pass the egress proxy: the tunnel's bytes were neither"


class FailClosedGate:
    def __init__(self, clients: ClientRuns | None = None) -> None:
        self.clients = clients

    @fail_closed("request")
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        if flow.metadata.get(DECISION) != "allowed" or not flow.metadata.get(PINNED):
            deny(flow, "undecided", "no egress check allowed this request")

    @staticmethod
    def _kill(flow: Any) -> None:
        flow.kill()

    # Raw TCP/UDP/DNS inside a tunnel would bypass every HTTP-level check.
    def tcp_start(self, flow: Any) -> None:
        try:
            self._log_refused(flow, "tcp")
        finally:
            self._kill(flow)

    def udp_start(self, flow: Any) -> None:
        self._kill(flow)

    def dns_request(self, flow: Any) -> None:
        self._kill(flow)

    def _log_refused(self, flow: Any, kind: str) -> None:
        run = self.clients.get(flow.client_conn) if self.clients is not None else None
        address = getattr(flow.server_conn, "address", None)
        if run is None or not address:
            return
        run.record(
            NetworkLogEntry(
                time=time.time(),
                method=kind.upper(),
                url=run.scrub(f"{address[0]}:{address[1]}"),
                decision="denied",
                rule="not-http",
                reason=NOT_HTTP,
            )
        )
