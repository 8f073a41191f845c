"""Per-run proxy credential: which run a request belongs to (Proxy-Authorization, Basic).

The sandbox's HTTP(S)_PROXY URL carries ``run-<id>:<token>``. A CONNECT that
authenticates binds its client connection to the run, so requests inside the tunnel
belong to it too. No or a wrong credential: 407. A credential whose run finished: 403.
"""

from __future__ import annotations

import binascii

from .._mitm import http
from ..runs import RunRegistry
from ._common import RUN, STARTED, URL, ClientRuns, deny, fail_closed, now

__all__ = ["RunCredentials"]


def _parse_basic(value: str) -> tuple[str, str] | None:
    scheme, _, data = value.strip().partition(" ")
    if scheme.lower() != "basic" or not data:
        return None
    try:
        user, sep, password = binascii.a2b_base64(data.strip().encode()).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _auth_required(flow: http.HTTPFlow) -> None:
    flow.response = http.Response.make(
        407,
        b"execbox egress proxy: proxy authentication required\n",
        {"proxy-authenticate": 'Basic realm="execbox"', "content-type": "text/plain"},
    )


class RunCredentials:
    def __init__(self, registry: RunRegistry, clients: ClientRuns) -> None:
        self.registry = registry
        self.clients = clients

    def _authenticate(self, flow: http.HTTPFlow) -> bool:
        creds = _parse_basic(flow.request.headers.get("proxy-authorization", ""))
        run = self.registry.authenticate(*creds) if creds else None
        flow.request.headers.pop("proxy-authorization", None)
        if run is None:
            _auth_required(flow)
            return False
        flow.metadata[RUN] = run
        self.clients.bind(flow.client_conn, run)
        return True

    @fail_closed("connect")
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._authenticate(flow)

    @fail_closed("request")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.metadata[STARTED] = now()
        run = self.clients.get(flow.client_conn)
        if run is None:
            # An absolute-form request straight to the proxy (plain HTTP): it carries the credential.
            if not self._authenticate(flow):
                return
            run = self.clients.get(flow.client_conn)
            assert run is not None
        else:
            flow.request.headers.pop("proxy-authorization", None)
        flow.metadata[RUN] = run
        flow.metadata[URL] = flow.request.pretty_url
        if not self.registry.is_live(run):
            deny(flow, "run-finished", "this run has finished")
