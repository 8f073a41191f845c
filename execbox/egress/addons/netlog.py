"""The network log of each run: one entry per request, with redacted headers, no secret values.

A WebSocket (after a handshake the policy allowed, logged as its own request with
status 101) gets a second entry when it ends: method ``WEBSOCKET``, the messages'
bytes in each direction (``request_bytes``: sandbox to server), how long it was open
and how it closed. Messages are counted as they pass and not kept.
"""

from __future__ import annotations

import time
from typing import Any

from .._mitm import http
from ..models import NetworkLogEntry
from ..runs import RunState
from ._common import DECISION, REASON, RULE, STARTED, STRIPPED, URL, fail_closed, run_of
from .redaction import redact

__all__ = ["NetworkLog"]

WS_SENT = "execbox.ws.sent"
WS_RECEIVED = "execbox.ws.received"
WS_MESSAGES = "execbox.ws.messages"


def _scrubbed(run: RunState, headers: dict[str, str]) -> dict[str, str]:
    return {k: run.scrub(v) for k, v in headers.items()}


def _url(req: Any) -> str:
    return f"{req.host}:{req.port}" if req.method == "CONNECT" else str(req.pretty_url)


class NetworkLog:
    def _record(self, flow: http.HTTPFlow, error: str | None = None) -> None:
        run = run_of(flow)
        if run is None or flow.metadata.get("execbox.logged"):
            return
        flow.metadata["execbox.logged"] = True
        req, resp = flow.request, flow.response
        started = float(flow.metadata.get(STARTED) or req.timestamp_start or time.time())
        ended = (resp.timestamp_end if resp is not None and resp.timestamp_end else None) or time.time()
        decision = flow.metadata.get(DECISION)
        rule = str(flow.metadata.get(RULE, ""))
        reason = str(flow.metadata.get(REASON, ""))
        if error is not None and decision == "allowed":
            if error.startswith("execbox denied") or "execbox denied" in error:
                decision, rule, reason = "denied", error.split("(", 1)[-1].split(")", 1)[0], error
        if decision not in ("allowed", "denied", "mocked"):
            decision = "denied"
        sensitive = run.redact
        req_headers: Any = req.headers
        response_headers: dict[str, str] = {}
        if resp is not None:
            stripped = flow.metadata.get(STRIPPED) or []
            resp_headers: Any = resp.headers
            response_headers = redact([*resp_headers.items(multi=True), *stripped], sensitive)
        run.record(
            NetworkLogEntry(
                time=started,
                method=req.method,
                url=run.scrub(str(flow.metadata.get(URL) or _url(req))),
                status=resp.status_code if resp is not None else None,
                request_bytes=len(req.raw_content or b""),
                response_bytes=len(resp.raw_content or b"") if resp is not None else 0,
                duration_ms=round(max(ended - started, 0.0) * 1000, 3),
                decision=decision,
                rule=run.scrub(rule),
                reason=run.scrub(reason),
                request_headers=_scrubbed(run, redact(req_headers.items(multi=True), sensitive)),
                response_headers=_scrubbed(run, response_headers),
                error=run.scrub(error) if error else None,
            )
        )

    @fail_closed("response")
    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        ws = flow.websocket
        if ws is None or not ws.messages:
            return
        message = ws.messages[-1]
        key = WS_SENT if message.from_client else WS_RECEIVED
        flow.metadata[key] = int(flow.metadata.get(key, 0)) + len(message.content)
        flow.metadata[WS_MESSAGES] = int(flow.metadata.get(WS_MESSAGES, 0)) + 1
        del ws.messages[:-1]  # counted: a long-lived socket must not pile its messages up here

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        try:
            self._record_websocket(flow)
        except Exception:  # the socket is over; only its log entry is lost
            pass

    def _record_websocket(self, flow: http.HTTPFlow) -> None:
        run = run_of(flow)
        ws = flow.websocket
        if run is None or ws is None:
            return
        started = flow.response.timestamp_end if flow.response is not None and flow.response.timestamp_end else None
        started = started or time.time()
        closed = f"closed by the {'client' if ws.closed_by_client else 'server'}: {ws.close_code} {ws.close_reason}"
        run.record(
            NetworkLogEntry(
                time=started,
                method="WEBSOCKET",
                url=run.scrub(str(flow.metadata.get(URL) or flow.request.pretty_url)),
                status=101,
                request_bytes=int(flow.metadata.get(WS_SENT, 0)),
                response_bytes=int(flow.metadata.get(WS_RECEIVED, 0)),
                duration_ms=round(max(time.time() - started, 0.0) * 1000, 3),
                decision="allowed",
                rule=run.scrub(str(flow.metadata.get(RULE, ""))),
                reason=run.scrub(f"{flow.metadata.get(WS_MESSAGES, 0)} messages; {closed.strip()}"),
            )
        )

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # A tunnel refused when it was asked for (its requests never happen): log the CONNECT.
        if flow.response is not None and flow.metadata.get(DECISION) == "denied":
            try:
                self._record(flow)
            except Exception:  # the refusal stands; only its log entry is lost
                pass

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            self._record(flow, error=flow.error.msg if flow.error else "error")
        except Exception:  # the flow already failed; nothing to close
            pass
