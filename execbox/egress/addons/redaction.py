"""Sensitive response headers (set-cookie, x-api-key, ...) never reach the sandbox; log redaction."""

from __future__ import annotations

from collections.abc import Iterable

from .._mitm import http
from ..models import DEFAULT_STRIP
from ._common import STRIPPED, fail_closed, run_of

__all__ = ["REDACTED", "ResponseHeaderFilter", "redact"]

REDACTED = "[REDACTED]"


def redact(headers: Iterable[tuple[str, str]], sensitive: frozenset[str]) -> dict[str, str]:
    """Headers as a dict for the log: sensitive values replaced, repeated names joined."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        shown = REDACTED if key in sensitive else value
        out[key] = f"{out[key]}, {shown}" if key in out else shown
    return out


class ResponseHeaderFilter:
    def __init__(self, strip: Iterable[str] = DEFAULT_STRIP) -> None:
        self.strip = frozenset(h.lower() for h in strip)

    @fail_closed("response")
    def response(self, flow: http.HTTPFlow) -> None:
        run = run_of(flow)
        if run is None or flow.response is None or not run.strip_response_headers:
            return
        removed: list[tuple[str, str]] = []
        for name in list(flow.response.headers.keys()):
            if name.lower() in self.strip:
                removed.extend((name, v) for v in flow.response.headers.get_all(name))
                del flow.response.headers[name]
        if removed:
            flow.metadata[STRIPPED] = removed
