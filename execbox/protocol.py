"""Host side of the agent protocol (see ``execbox/sandbox/agent.py`` for the other side)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from .exceptions import SandboxError

__all__ = ["KINDS", "CappedOutput", "CollectedFiles", "FrameDecoder"]

_HEAD = struct.Struct(">cI")
KINDS = {b"K", b"O", b"E", b"F", b"R", b"X"}


class FrameDecoder:
    """Incremental decoder: feed raw stdout bytes, get whole (kind, payload) frames.

    The agent runs inside the sandbox and is not trusted: unknown kinds and frames
    longer than ``max_frame`` are protocol errors, so nothing is buffered unboundedly.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._buf += data
        while len(self._buf) >= _HEAD.size:
            kind, length = _HEAD.unpack_from(self._buf)
            if kind not in KINDS or length > self.max_frame:
                raise SandboxError(f"sandbox broke the protocol (frame {kind!r}, {length} bytes)")
            end = _HEAD.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[_HEAD.size : end])
            del self._buf[:end]
            yield kind, payload


class CappedOutput:
    """One output stream, capped at ``cap`` bytes: the excess is noted, never stored.

    ``on_output(name, chunk)`` sees each kept chunk as it arrives (streaming).
    """

    def __init__(self, cap: int, name: str = "", on_output: Callable[[str, bytes], None] | None = None) -> None:
        self.name, self.cap, self.on_output = name, cap, on_output
        self.buf = bytearray()
        self.truncated = False

    def add(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        if data:
            self.buf += data
            if self.on_output is not None:
                self.on_output(self.name, data)

    def text(self) -> str:
        return self.buf.decode("utf-8", "replace")


class CollectedFiles:
    """The ``F`` frames of one run or session call: files kept within a byte budget and a count cap.

    A file that does not fit is left out and noted (``truncated``), as the agent notes the
    files it did not send.
    """

    MAX_COUNT = 1000

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.files: dict[str, bytes] = {}
        self.truncated = False

    def add(self, frame: bytes) -> None:
        path, _, content = frame.partition(b"\0")
        if len(content) <= self.budget and len(self.files) < self.MAX_COUNT:
            self.files[path.decode("utf-8", "replace")] = content
            self.budget -= len(content)
        else:
            self.truncated = True
