"""One run's request in its sandbox: sent, its answer read, its outcome decided.

The answer is read either by a thread blocking on the sandbox's channel (``read``) or
on an event loop that waits for the channel to be readable (``read_async``: no thread
hand-off in either direction, which is most of what a pooled run costs the HTTP service
beyond the library). Both end in the same outcomes: the agent's result, the host's
kill at the deadline, a sandbox that died (the OOM killer), a broken protocol.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .agentlink import AgentError, CallOutput, LinkEnded, Outcome, OutputCallback
from .engine.base import Engine
from .exceptions import SandboxError
from .models import ExecutionResult, Limits
from .pool import Sandbox

__all__ = ["Offload", "SandboxCall"]

T = TypeVar("T")
# Runs a blocking function off the event loop (in a worker thread) and awaits its value.
Offload = Callable[[Callable[[], T]], Awaitable[T]]

_FAILURES = (TimeoutError, LinkEnded, AgentError, SandboxError, ValueError)


class SandboxCall:
    def __init__(
        self,
        engine: Engine,
        exec_id: str,
        sb: Sandbox,
        limits: Limits,
        kill_grace: float,
        on_output: OutputCallback | None,
        started: float,
    ) -> None:
        self.engine, self.exec_id, self.sb, self.started = engine, exec_id, sb, started
        self.call = CallOutput(limits.output_bytes, on_output)
        self.wait_s = limits.timeout + kill_grace
        self.deadline = 0.0

    def send(self, payload: dict[str, Any]) -> None:
        try:
            self.sb.link.send_json(payload)
        except LinkEnded as exc:
            raise SandboxError(f"execution {self.exec_id}: the sandbox ended before the request: {exc}") from None
        self.deadline = time.monotonic() + self.wait_s

    def read(self) -> ExecutionResult:
        """The run's result, this thread blocking until the agent answers (or the deadline)."""
        try:
            meta = self.sb.link.read_call(self.deadline, self.call)
        except _FAILURES as exc:
            return self.failed(exc)
        return self.answered(meta)

    async def read_async(self, offload: Offload[ExecutionResult]) -> ExecutionResult:
        """``read`` on an event loop; what needs the engine (a kill, a wait) is offloaded."""
        fd = self.sb.link.channel.fileno()
        if fd is None:
            return await offload(self.read)
        try:
            meta = await self.sb.link.read_call_async(self.deadline, self.call, fd)
        except _FAILURES as exc:
            return await offload(functools.partial(self.failed, exc))
        if meta.get("signal") == 9 and not meta.get("timed_out"):  # asks the engine whether it was OOM
            return await offload(functools.partial(self.answered, meta))
        return self.answered(meta)

    def answered(self, meta: dict[str, Any]) -> ExecutionResult:
        outcome = Outcome.of(meta, oom=lambda: self.engine.wait(self.sb.id, 2.0).oom_killed)
        return self._result(outcome)

    def failed(self, exc: BaseException) -> ExecutionResult:
        """The outcome of a call whose answer did not come; raises SandboxError when there is none."""
        if isinstance(exc, TimeoutError):
            # The agent did not enforce the limit (wedged or subverted): the host does.
            self.engine.kill(self.sb.id)
            return self._result(Outcome.killed_by_host())
        if isinstance(exc, LinkEnded):
            state = self.engine.wait(self.sb.id, 2.0)
            if not state.oom_killed:
                raise SandboxError(
                    f"execution {self.exec_id}: sandbox ended without a result (exit {state.exit_code})"
                    f" {self.sb.link.stderr_tail()}"
                ) from None
            return self._result(Outcome.died(oom_killed=True))
        if isinstance(exc, AgentError):
            raise SandboxError(f"execution {self.exec_id}: {exc}") from None
        self.engine.kill(self.sb.id)
        raise SandboxError(f"execution {self.exec_id}: {exc}") from exc

    def _result(self, outcome: Outcome) -> ExecutionResult:
        fields = self.call.fields(outcome, self.started)
        return ExecutionResult(id=self.exec_id, language="", sandbox_id=self.sb.id, **fields)
