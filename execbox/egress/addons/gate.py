"""Last line: deny whatever no addon explicitly allowed, and every non-HTTP flow.

If an earlier addon crashed without its own guard (mitmproxy swallows addon
exceptions), its decision is missing here and the request is denied.
"""

from __future__ import annotations

from typing import Any

from .._mitm import http
from ._common import DECISION, PINNED, deny, fail_closed

__all__ = ["FailClosedGate"]


class FailClosedGate:
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
        self._kill(flow)

    def udp_start(self, flow: Any) -> None:
        self._kill(flow)

    def dns_request(self, flow: Any) -> None:
        self._kill(flow)
