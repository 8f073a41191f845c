"""Helpers shared by the addons: flow metadata keys, denial responses, fail-closed wrappers."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from .._mitm import connection, http
from ..runs import RunState

__all__ = ["ClientRuns", "deny", "fail_closed", "run_of"]

log = logging.getLogger("execbox.egress")

RUN = "execbox.run"
DECISION = "execbox.decision"  # "allowed" | "denied" | "mocked"
RULE = "execbox.rule"
REASON = "execbox.reason"
URL = "execbox.url"  # the URL as the sandbox sent it (placeholders, not secrets)
PINNED = "execbox.pinned"  # the upstream address the upstream addon checked
STRIPPED = "execbox.stripped"  # response headers removed before the sandbox saw them
STARTED = "execbox.started"

_UNSAFE = re.compile(r"[^\x20-\x7e]")


class ClientRuns:
    """Which run each client connection (one sandbox's TCP connection to the proxy) belongs to."""

    def __init__(self) -> None:
        self._runs: weakref.WeakKeyDictionary[connection.Client, RunState] = weakref.WeakKeyDictionary()
        # (client, host, port) -> address checked at request time; the connection uses exactly it.
        self.pins: weakref.WeakKeyDictionary[connection.Client, dict[tuple[str, int], str]] = (
            weakref.WeakKeyDictionary()
        )

    def bind(self, client: connection.Client, run: RunState) -> None:
        self._runs[client] = run

    def get(self, client: connection.Client) -> RunState | None:
        return self._runs.get(client)

    def pin(self, client: connection.Client, host: str, port: int, address: str) -> None:
        self.pins.setdefault(client, {})[(host, port)] = address

    def pinned(self, client: connection.Client, host: str, port: int) -> str | None:
        return self.pins.get(client, {}).get((host, port))


def run_of(flow: http.HTTPFlow) -> RunState | None:
    run = flow.metadata.get(RUN)
    return run if isinstance(run, RunState) else None


def header_safe(text: str) -> str:
    return _UNSAFE.sub("?", text)[:300]


def deny(flow: http.HTTPFlow, rule: str, reason: str, status: int = 403) -> None:
    """Answer the sandbox with a clear denial (and record why on the flow)."""
    run = run_of(flow)
    if run is not None:
        reason = run.scrub(reason)
    flow.metadata[DECISION] = "denied"
    flow.metadata[RULE] = rule
    flow.metadata[REASON] = reason
    body = json.dumps({"error": "denied by the execbox egress proxy", "rule": rule, "reason": reason})
    flow.response = http.Response.make(
        status,
        body,
        {
            "content-type": "application/json",
            "x-execbox-denied": header_safe(reason),
            "x-execbox-rule": header_safe(rule),
        },
    )


F = TypeVar("F", bound=Callable[..., Any])


def _fail(self: object, flow: Any, phase: str) -> None:
    who = type(self).__name__
    log.exception("egress addon %s failed in %s; failing closed", who, phase)
    if isinstance(flow, http.HTTPFlow):
        status = 502 if phase == "response" else 403
        deny(flow, "internal-error", f"{who} failed while handling the {phase}", status=status)
    elif hasattr(flow, "kill"):
        try:
            flow.kill()
        except Exception:
            log.exception("could not kill flow")


def fail_closed(phase: str) -> Callable[[F], F]:
    """Wrap an addon hook ``(self, flow)`` so that any exception denies the flow."""

    def wrap(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(self: object, flow: Any) -> None:
                try:
                    await fn(self, flow)
                except Exception:
                    _fail(self, flow, phase)

            return awrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(self: object, flow: Any) -> None:
            try:
                fn(self, flow)
            except Exception:
                _fail(self, flow, phase)

        return wrapper  # type: ignore[return-value]

    return wrap


def now() -> float:
    return time.time()
