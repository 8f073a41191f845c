"""Operator hooks (``execbox.egress.hooks.EgressHook``) on each request and response; fail closed."""

from __future__ import annotations

import logging

from .._mitm import http
from ..hooks import EgressHook, HookContext, HookRequest, HookResponse
from ._common import DECISION, RULE, deny, fail_closed, run_of

__all__ = ["OperatorHooks"]

log = logging.getLogger("execbox.egress.hooks")
HOOK_REQUEST = "execbox.hook_request"


class OperatorHooks:
    def __init__(self, hooks: list[EgressHook]) -> None:
        self.hooks = hooks

    @fail_closed("request")
    def request(self, flow: http.HTTPFlow) -> None:
        run = run_of(flow)
        if not self.hooks or run is None or flow.response is not None or flow.metadata.get(DECISION) != "allowed":
            return
        ctx = HookContext(run.run_id, run.tenant, run.user_id)
        wrapped = HookRequest(flow.request)
        flow.metadata[HOOK_REQUEST] = wrapped
        for hook in self.hooks:
            try:
                hook.request(ctx, wrapped)
            except Exception as exc:
                log.exception("egress hook %s failed on a request of run %s", hook.name, run.run_id)
                deny(flow, f"hook-error:{hook.name}", f"hook {hook.name} failed: {type(exc).__name__}")
                return
            if wrapped.blocked is not None:
                deny(flow, f"hook:{hook.name}", wrapped.blocked)
                return
            if wrapped.mock is not None:
                status, body, headers = wrapped.mock
                flow.response = http.Response.make(status, body, headers)
                flow.metadata[DECISION] = "mocked"
                flow.metadata[RULE] = f"hook:{hook.name}"
                return

    @fail_closed("response")
    def response(self, flow: http.HTTPFlow) -> None:
        run = run_of(flow)
        if not self.hooks or run is None or flow.response is None:
            return
        if flow.metadata.get(DECISION) not in ("allowed", "mocked"):
            return
        ctx = HookContext(run.run_id, run.tenant, run.user_id)
        wrapped = flow.metadata.get(HOOK_REQUEST)
        if not isinstance(wrapped, HookRequest):
            wrapped = HookRequest(flow.request)
        resp = HookResponse(flow.response)
        for hook in self.hooks:
            try:
                hook.response(ctx, wrapped, resp)
            except Exception as exc:
                log.exception("egress hook %s failed on a response of run %s", hook.name, run.run_id)
                deny(flow, f"hook-error:{hook.name}", f"hook {hook.name} failed: {type(exc).__name__}", status=502)
                return
