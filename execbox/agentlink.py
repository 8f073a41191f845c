"""The host's end of a link to an in-sandbox agent, for runs, the pool and sessions alike.

One place reads the agent's frames (``K`` ready, ``O``/``E`` output, ``F`` a collected
file, ``R`` the result, ``X`` an error), applies the host's own caps to what a call
produced, and turns the agent's answer (or its absence) into an outcome: exit code,
signal, timeout, OOM kill. The agent runs inside the sandbox and is not trusted: the
host bounds every frame, every byte kept and every wait.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .engine.base import STDERR, Channel
from .exceptions import SandboxError
from .protocol import CappedOutput, CollectedFiles, FrameDecoder

__all__ = ["AgentError", "AgentLink", "CallOutput", "LinkEnded", "Outcome"]

OutputCallback = Callable[[str, bytes], None]
_AGENT_STDERR_CAP = 16 << 10


class LinkEnded(Exception):
    """The link's stream ended: the agent (or its sandbox, or the connection) is gone."""


class AgentError(SandboxError):
    """The agent reported that it failed (an ``X`` frame)."""


class AgentLink:
    """A channel to an agent, its frame decoder and the agent's own stderr (kept, capped)."""

    def __init__(self, channel: Channel, max_frame: int = 1 << 16) -> None:
        self.channel = channel
        self.decoder = FrameDecoder(max_frame=max_frame)
        self.agent_stderr = bytearray()

    def send_json(self, message: dict[str, Any]) -> None:
        # One JSON line: json.dumps escapes control characters, so Docker's detach keys
        # (ctrl-p ctrl-q), which would end an attach or exec stream, never appear in it.
        try:
            self.channel.send(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        except OSError as exc:
            raise LinkEnded(str(exc)) from exc

    def frames(self, deadline: float) -> Iterator[tuple[bytes, bytes]]:
        """Frames as they come; TimeoutError at ``deadline`` (monotonic), LinkEnded at the end."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                item = self.channel.recv(remaining)
            except TimeoutError:  # an OSError too, but not the end of the stream
                raise
            except OSError as exc:
                raise LinkEnded(str(exc)) from exc
            if item is None:
                raise LinkEnded("the agent's stream ended")
            stream, data = item
            if stream == STDERR:
                self.agent_stderr += data[: max(_AGENT_STDERR_CAP - len(self.agent_stderr), 0)]
                continue
            yield from self.decoder.feed(data)

    def await_ready(self, deadline: float) -> None:
        """Wait for the agent's ``K`` (its runtime is started); SandboxError for anything else."""
        for kind, _ in self.frames(deadline):
            if kind != b"K":
                raise SandboxError(f"the agent sent {kind!r} before it was ready")
            return

    def reply(self, deadline: float) -> dict[str, Any]:
        """The next ``R`` answer to a control message (``K`` skipped)."""
        for kind, body in self.frames(deadline):
            if kind == b"K":
                continue
            if kind == b"R":
                answer: dict[str, Any] = json.loads(body)
                return answer
            if kind == b"X":
                raise AgentError(f"agent: {body.decode('utf-8', 'replace')}")
            raise SandboxError(f"the agent sent {kind!r} out of turn")
        raise AssertionError("unreachable")

    def read_call(self, deadline: float, call: CallOutput) -> dict[str, Any]:
        """Read one call's output into ``call`` until its ``R`` frame; return the agent's result."""
        self.decoder.max_frame = max(call.cap, 1 << 16) + (1 << 16)
        for kind, body in self.frames(deadline):
            if kind == b"O":
                call.stdout.add(body)
            elif kind == b"E":
                call.stderr.add(body)
            elif kind == b"F":
                call.files.add(body)
            elif kind == b"R":
                meta: dict[str, Any] = json.loads(body)
                call.meta = meta
                return meta
            elif kind == b"X":
                raise AgentError(f"agent failed: {body.decode('utf-8', 'replace')}")
        raise AssertionError("unreachable")

    def stderr_tail(self) -> str:
        return self.agent_stderr.decode("utf-8", "replace").strip()[-500:]

    def close(self) -> None:
        self.channel.close()


class CallOutput:
    """What one call (a run, or a call in a session) produced, within the host's caps."""

    def __init__(self, cap: int, on_output: OutputCallback | None = None) -> None:
        self.cap = cap
        self.stdout = CappedOutput(cap, "stdout", on_output)
        self.stderr = CappedOutput(cap, "stderr", on_output)
        self.files = CollectedFiles(cap)
        self.meta: dict[str, Any] | None = None

    def fields(self, outcome: Outcome, started: float) -> dict[str, Any]:
        """The fields of a ``RunResult`` (models) for this call and its outcome."""
        meta = self.meta or {}
        return {
            "stdout": self.stdout.text(),
            "stderr": self.stderr.text(),
            "exit_code": outcome.exit_code,
            "signal": outcome.signal,
            "duration_ms": round((time.monotonic() - started) * 1000, 3),
            "run_ms": meta.get("duration_ms"),
            "timed_out": outcome.timed_out,
            "oom_killed": outcome.oom_killed,
            "output_truncated": self.stdout.truncated
            or self.stderr.truncated
            or bool(meta.get("stdout_truncated") or meta.get("stderr_truncated")),
            "files": self.files.files,
            "files_truncated": self.files.truncated or bool(meta.get("files_truncated")),
        }


@dataclass(frozen=True)
class Outcome:
    """How a call ended."""

    exit_code: int
    signal: int | None
    timed_out: bool
    oom_killed: bool

    @classmethod
    def of(cls, meta: dict[str, Any], oom: Callable[[], bool] = lambda: False) -> Outcome:
        """From the agent's result. A SIGKILL that was not the timeout's is an OOM kill when
        the agent counted one (or ``oom``, the engine's view, says so)."""
        signal = meta.get("signal")
        timed_out = bool(meta.get("timed_out"))
        killed = signal == 9 and not timed_out
        return cls(int(meta["exit_code"]), signal, timed_out, killed and (bool(meta.get("oom_kills")) or oom()))

    @classmethod
    def killed_by_host(cls) -> Outcome:
        """The host killed it at the deadline (the agent did not: wedged or subverted)."""
        return cls(137, 9, True, False)

    @classmethod
    def died(cls, oom_killed: bool) -> Outcome:
        """The sandbox ended without an answer (e.g. the kernel's OOM killer took the agent too)."""
        return cls(137, 9, False, oom_killed)
