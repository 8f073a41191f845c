"""The Docker Engine's transport for ``DockerEngine``: errors translated onto execbox's tree,
the hijacked attach/exec stream demultiplexed as a ``Channel``, and docker-py's unix
connect made to close its socket when it fails."""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import docker
import docker.errors
import requests.exceptions

from ..exceptions import EngineError, EngineUnavailableError, ImageNotFoundError
from .base import STDERR, STDOUT, Channel

__all__ = ["DockerChannel", "patch_unix_connect", "translate"]

_HEADER = struct.Struct(">BxxxI")


def _connect_closing_on_failure(self: Any) -> None:
    # docker-py's UnixHTTPConnection.connect leaks its socket when the connect fails
    # (dockerd down or restarting): every retry would leave an open fd behind.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(self.timeout)
    try:
        sock.connect(self.unix_socket)
    except BaseException:
        sock.close()
        raise
    self.sock = sock


def patch_unix_connect() -> None:
    from docker.transport import unixconn

    if getattr(unixconn.UnixHTTPConnection.connect, "__name__", "") != _connect_closing_on_failure.__name__:
        unixconn.UnixHTTPConnection.connect = _connect_closing_on_failure


@contextmanager
def translate(what: str) -> Iterator[None]:
    """Map docker SDK / transport errors onto the execbox tree."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise ImageNotFoundError(f"{what}: {exc.explanation or exc}") from exc
    except docker.errors.APIError as exc:
        raise EngineError(f"{what}: {exc.explanation or exc}") from exc
    except (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError) as exc:
        raise EngineUnavailableError(f"{what}: the Docker Engine does not answer ({exc})") from exc
    except docker.errors.DockerException as exc:
        raise EngineError(f"{what}: {exc}") from exc


class DockerChannel(Channel):
    """A hijacked attach connection, demultiplexed (no TTY: 8-byte frame headers)."""

    def __init__(self, sock: socket.socket, keepalive: Any) -> None:
        self._sock = sock
        self._keepalive = keepalive  # the SDK's SocketIO; closing it closes the connection
        self._buf = bytearray()
        self._eof = False

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        ready, _, _ = select.select([self._sock], [], [], remaining)
        if not ready:
            raise TimeoutError
        chunk = self._sock.recv(1 << 16)
        if not chunk:
            self._eof = True
        self._buf += chunk

    def recv(self, timeout: float) -> tuple[int, bytes] | None:
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) >= _HEADER.size:
                stream, length = _HEADER.unpack_from(self._buf)
                if len(self._buf) >= _HEADER.size + length:
                    data = bytes(self._buf[_HEADER.size : _HEADER.size + length])
                    del self._buf[: _HEADER.size + length]
                    return (STDERR if stream == 2 else STDOUT), data
            if self._eof:
                return None
            self._fill(deadline)

    def alive(self) -> bool:
        if self._eof:
            return False
        ready, _, _ = select.select([self._sock], [], [], 0)
        if not ready:
            return True
        try:
            # A waiting sandbox sends nothing: readable means EOF (or garbage).
            return bool(self._sock.recv(1, socket.MSG_PEEK)) and False
        except OSError:
            return False

    def close(self) -> None:
        for closer in (self._sock.close, self._keepalive.close):
            try:
                closer()
            except OSError:
                pass
