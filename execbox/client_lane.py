"""The synchronous client's short way to a plain-HTTP service: one kept-alive connection.

httpx builds request and response objects, merges headers and cookies, and goes through
httpcore's pool and h11's parser on every call; ``http.client`` parses headers with the
email package. On a 2-core machine, with the caches cold between paced calls, that is
about 1 ms of a call (bench/api.py): as much as the service's own work for a pooled run.
``Lane`` writes ``Client``'s JSON requests itself and reads the answer with a strict,
small HTTP/1.1 reader (a status line, headers, a body by length or chunks, or up to the
close), and gives back an ``Answer`` that the client reads as it reads httpx's responses.

It is taken only where it cannot differ from httpx: plain ``http://``, no transport
given, and no proxy from the environment for the service's host. A connection the
server has closed while idle is noticed before it is reused (as httpcore does); a
request that failed once sent is never sent again (an execution is not idempotent).
One thread at a time: a call that finds the lane busy goes through httpx's pool.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import urllib.parse
import urllib.request
from http import HTTPStatus
from typing import Any

__all__ = ["Answer", "Lane", "LaneError"]

_CONNECT_TIMEOUT = 10.0
_MAX_HEAD = 64 << 10  # status line and headers
_MAX_BODY = 1 << 30


class LaneError(Exception):
    """The service could not be reached or answered nothing readable (as httpx's transport errors)."""


class Answer:
    """An HTTP answer, read as the client reads an ``httpx.Response``."""

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code, self.headers, self.content = status_code, headers, content

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def reason_phrase(self) -> str:
        try:
            return HTTPStatus(self.status_code).phrase
        except ValueError:
            return ""

    def json(self) -> Any:
        return json.loads(self.content)


class Lane:
    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        url = urllib.parse.urlsplit(base_url)
        self.host, self.port = url.hostname or "localhost", url.port or 80
        self.prefix = url.path.rstrip("/")
        fixed = {"Host": url.netloc, **headers, "Accept": "application/json", "User-Agent": "execbox-client"}
        self._head = "".join(f"{name}: {value}\r\n" for name, value in fixed.items()).encode("latin-1")
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._lock = threading.Lock()

    @classmethod
    def for_client(
        cls, base_url: str, headers: dict[str, str], transport: object | None, trust_env: bool
    ) -> Lane | None:
        """A lane for this client, or None when only httpx can do what it was asked."""
        url = urllib.parse.urlsplit(base_url)
        if transport is not None or url.scheme != "http" or url.username or url.password:
            return None
        if trust_env:
            proxies = urllib.request.getproxies_environment()
            bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
            if ("http" in proxies or "all" in proxies) and not bypass(url.netloc, proxies):
                return None
        return cls(base_url, headers)

    def request(
        self,
        method: str,
        path: str,
        read_timeout: float | None,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Answer | None:
        """The service's answer; None when another thread holds the lane (use httpx then)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._exchange(method, path, read_timeout, json_body, params)
        finally:
            self._lock.release()

    def _exchange(
        self, method: str, path: str, read_timeout: float | None, json_body: Any, params: dict[str, Any] | None
    ) -> Answer:
        target = urllib.parse.quote(self.prefix + path, safe="/%:@")  # the query is encoded once, below
        if params:
            target += "?" + urllib.parse.urlencode(params)
        body = b""
        head = f"{method} {target} HTTP/1.1\r\n".encode("latin-1") + self._head
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":"), ensure_ascii=False).encode()
            head += b"Content-Type: application/json\r\n"
        if body or method in ("POST", "PUT", "PATCH"):
            head += b"Content-Length: %d\r\n" % len(body)
        try:
            sock = self._connection()
            sock.settimeout(_CONNECT_TIMEOUT)
            sock.sendall(head + b"\r\n" + body)
            sock.settimeout(read_timeout)
            answer, keep = _read_answer(self._file, method)
        except (OSError, ValueError, LaneError) as exc:
            self.close()
            raise LaneError(f"{type(exc).__name__}: {exc}") from exc
        if not keep:
            self.close()
        return answer

    def _connection(self) -> socket.socket:
        if self._sock is not None and _readable(self._sock):
            # Something to read before we asked: the server closed it (idle), or is out of step.
            self.close()
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=_CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock, self._file = sock, sock.makefile("rb")
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            for closer in (self._file.close, self._sock.close):
                try:
                    closer()
                except OSError:
                    pass
            self._sock = self._file = None


def _read_answer(f: Any, method: str) -> tuple[Answer, bool]:
    """One HTTP/1.1 answer from ``f``, and whether the connection may carry another."""
    line = f.readline(_MAX_HEAD)
    if not line:
        raise LaneError("the service closed the connection without answering")
    version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
    code = rest.partition(" ")[0]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise LaneError(f"not an HTTP/1.x answer: {line[:80]!r}")
    headers: dict[str, str] = {}
    size = len(line)
    while True:
        line = f.readline(_MAX_HEAD)
        size += len(line)
        if size > _MAX_HEAD or not line.endswith(b"\n"):
            raise LaneError("the answer's headers are too long or cut off")
        if line in (b"\r\n", b"\n"):
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise LaneError(f"a malformed header line: {line[:80]!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    status = int(code)
    keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return Answer(status, headers, b""), keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Answer(status, headers, _read_chunks(f)), keep
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > _MAX_BODY:
            raise LaneError(f"a bad Content-Length: {length!r}")
        content = f.read(int(length))
        if len(content) != int(length):
            raise LaneError("the answer's body was cut off")
        return Answer(status, headers, content), keep
    return Answer(status, headers, f.read(_MAX_BODY)), False  # up to the close


def _read_chunks(f: Any) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        line = f.readline(_MAX_HEAD)
        size_text = line.split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise LaneError(f"a malformed chunk size: {line[:80]!r}") from None
        if size == 0:
            while f.readline(_MAX_HEAD) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts)
        total += size
        if total > _MAX_BODY:
            raise LaneError("the answer is too large")
        chunk = f.read(size)
        if len(chunk) != size or f.readline(_MAX_HEAD) not in (b"\r\n", b"\n"):
            raise LaneError("a chunk was cut off")
        parts.append(chunk)


def _readable(sock: socket.socket) -> bool:
    try:
        ready, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(ready)
