"""Parts of the session agent (standard library only): a connection the agent serves, and
the REPL worker process it keeps. See ``session_agent.py``."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import time
from typing import Any

import agent  # the one-shot agent: framing, process helpers (on sys.path: see session_agent.py)

MAX_LINE = 64 * 1024 * 1024
READ_CHUNK = 65536


class Conn:
    """One connection to a host: the attach stream (fds 0/1) or a socket (via a relay)."""

    def __init__(self, rfd: int, wfd: int, sock: socket.socket | None = None, authed: bool = False) -> None:
        self.rfd, self.wfd, self.sock, self.authed = rfd, wfd, sock, authed
        self.buf = bytearray()
        self.dead = False
        self.opened = time.monotonic()

    def send(self, kind: bytes, payload: bytes) -> None:
        """Write one frame; a host that went away only makes this connection dead."""
        if self.dead:
            return
        view = memoryview(agent._frame(kind, payload))
        try:
            while view:
                view = view[os.write(self.wfd, view) :]
        except OSError:
            self.dead = True

    def reply(self, result: dict[str, Any]) -> None:
        self.send(b"R", json.dumps(result).encode())

    def error(self, message: str) -> None:
        self.send(b"X", message.encode("utf-8", "replace"))

    def lines(self) -> list[bytes]:
        out = []
        while True:
            end = self.buf.find(b"\n")
            if end < 0:
                break
            out.append(bytes(self.buf[:end]))
            del self.buf[: end + 1]
        if len(self.buf) > MAX_LINE:
            self.error("request line too long")
            self.dead = True
        return out

    def close(self) -> None:
        self.dead = True
        if self.sock is not None:
            self.sock.close()


class Worker:
    """The REPL process: code in on a control pipe, one status line per call on another."""

    def __init__(self, argv: list[str], env: dict[str, str], workdir: str) -> None:
        ctrl_r, self.ctrl_w = os.pipe()
        self.status_r, status_w = os.pipe()
        self.proc = subprocess.Popen(
            [*argv, str(ctrl_r), str(status_w)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=agent._child_setup,
            close_fds=True,
            pass_fds=(ctrl_r, status_w),
        )
        os.close(ctrl_r)
        os.close(status_w)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out_fd, self.err_fd = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        for fd in (self.out_fd, self.err_fd, self.status_r, self.ctrl_w):
            os.set_blocking(fd, False)
        self.pidfd = agent.exit_fd(self.proc.pid)
        self._status = bytearray()
        self.closed = False
        # Pipes at end of file (the program closed its stdout, say): never polled again, or
        # select() would report them ready for ever and the agent would spin.
        self.eof: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def statuses(self) -> list[dict[str, Any]]:
        """Status lines available now (non-blocking)."""
        try:
            data = os.read(self.status_r, READ_CHUNK)
            if not data:
                self.eof.add(self.status_r)
        except BlockingIOError:
            data = b""
        self._status += data
        out = []
        while b"\n" in self._status:
            line, _, rest = bytes(self._status).partition(b"\n")
            self._status = bytearray(rest)
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.status_r, selectors.EVENT_READ)
        sel.register(self.pidfd, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                for key, _ in sel.select(deadline - time.monotonic()):
                    if key.fd == self.pidfd:
                        return False
                    if any(s.get("ready") for s in self.statuses()):
                        return True
        finally:
            sel.close()
        return False

    def drain(self, fd: int, limit: int = 1024) -> list[bytes]:
        chunks = []
        for _ in range(limit):
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.eof.add(fd)
                break
            chunks.append(data)
        return chunks

    def kill(self) -> int:
        """Kill the worker's process group; its wait status (negative: the signal)."""
        agent._kill_session(self.proc.pid)
        status: int = self.proc.wait()
        return status

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self.ctrl_w, self.status_r, self.pidfd):
            try:
                os.close(fd)
            except OSError:
                pass
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
