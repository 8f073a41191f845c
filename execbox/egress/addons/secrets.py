"""Secrets that never enter the sandbox: placeholders swapped for real values on bound hosts only.

Requests: a placeholder in a header, the path/query or the body is replaced by the
real value when the destination matches the secret's hosts; sent anywhere else,
the request is denied (and logged). Responses: a real value coming back is replaced
by its placeholder before the sandbox sees it.
"""

from __future__ import annotations

from typing import Any

from .._mitm import http
from ..policy import normalize_host
from ..runs import RunState
from ._common import DECISION, deny, fail_closed, run_of

__all__ = ["SecretSubstitution"]


def _swap_headers(headers: http.Headers, old: str, new: str) -> bool:
    changed = False
    for name in list(headers.keys()):
        values = headers.get_all(name)
        if any(old in v for v in values):
            headers.set_all(name, [v.replace(old, new) for v in values])
            changed = True
    return changed


def _swap_body(message: http.Message, old: bytes, new: bytes) -> None:
    content = message.get_content(strict=False)
    if content and old in content:
        message.content = content.replace(old, new)


class SecretSubstitution:
    def _misuse(self, run: RunState, flow: http.HTTPFlow, host: str) -> str | None:
        req = flow.request
        body = req.get_content(strict=False) or b""
        headers: Any = req.headers
        head = "\n".join(f"{k}: {v}" for k, v in headers.items(multi=True))
        for s in run.secrets:
            if s.bound_to(host):
                continue
            if s.placeholder in req.path or s.placeholder in head or s.placeholder.encode() in body:
                return s.name
        return None

    @fail_closed("request")
    def request(self, flow: http.HTTPFlow) -> None:
        run = run_of(flow)
        if run is None or not run.secrets or flow.response is not None or flow.metadata.get(DECISION) != "allowed":
            return
        req = flow.request
        host = normalize_host(req.host)
        misused = self._misuse(run, flow, host)
        if misused is not None:
            deny(flow, "secret-misuse", f"the placeholder of secret {misused} may not be sent to {host}")
            return
        for s in run.secrets:
            if not s.bound_to(host):
                continue
            _swap_headers(req.headers, s.placeholder, s.value)
            if s.placeholder in req.path:
                req.path = req.path.replace(s.placeholder, s.value)
            _swap_body(req, s.placeholder.encode(), s.value.encode())

    @fail_closed("response")
    def response(self, flow: http.HTTPFlow) -> None:
        run = run_of(flow)
        if run is None or not run.secrets or flow.response is None:
            return
        for s in run.secrets:
            _swap_headers(flow.response.headers, s.value, s.placeholder)
            _swap_body(flow.response, s.value.encode(), s.placeholder.encode())
