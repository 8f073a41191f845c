"""The synchronous client's short way to a plain-HTTP service: one kept-alive connection.

httpx builds a request and a response object, merges headers and cookies and goes
through httpcore's pool and h11's parser on every call: about 0.7 ms of a paced call
on a 2-core machine (bench/api.py), as much as the service's own work for a pooled
run. ``Lane`` sends ``Client``'s JSON requests over ``http.client`` instead, and gives
back an ``httpx.Response`` so that everything after the wire is the same code.

It is taken only where it cannot differ from httpx: plain ``http://``, no transport
given, and no proxy from the environment for the service's host. A connection the
server has closed while idle is noticed before it is reused (as httpcore does); a
request that failed once sent is never sent again (an execution is not idempotent).
One thread at a time: a call that finds the lane busy goes through httpx's pool.
"""

from __future__ import annotations

import http.client
import json
import select
import threading
import urllib.parse
import urllib.request
from typing import Any

import httpx

__all__ = ["Lane", "LaneError"]

_CONNECT_TIMEOUT = 10.0


class LaneError(Exception):
    """The service could not be reached or answered nothing (as httpx's transport errors)."""


class Lane:
    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        url = urllib.parse.urlsplit(base_url)
        self.host, self.port = url.hostname or "localhost", url.port or 80
        self.prefix = url.path.rstrip("/")
        self.headers = {**headers, "Accept": "application/json", "User-Agent": "execbox-client"}
        self._conn: http.client.HTTPConnection | None = None
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
    ) -> httpx.Response | None:
        """The service's answer; None when another thread holds the lane (use httpx then)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._exchange(method, path, read_timeout, json_body, params)
        finally:
            self._lock.release()

    def _exchange(
        self, method: str, path: str, read_timeout: float | None, json_body: Any, params: dict[str, Any] | None
    ) -> httpx.Response:
        target = self.prefix + path + ("?" + urllib.parse.urlencode(params) if params else "")
        headers = dict(self.headers)
        body = None
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":"), ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, target, body=body, headers=headers)
            if conn.sock is not None:
                conn.sock.settimeout(read_timeout)
            answer = conn.getresponse()
            content = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise LaneError(f"{type(exc).__name__}: {exc}") from exc
        if answer.will_close:
            self.close()
        request = httpx.Request(method, f"http://{self.host}:{self.port}{target}")
        return httpx.Response(answer.status, headers=answer.getheaders(), content=content, request=request)

    def _connection(self) -> http.client.HTTPConnection:
        conn = self._conn
        if conn is not None and conn.sock is not None and _readable(conn.sock):
            # Something to read before we asked: the server closed it (idle), or is out of step.
            self.close()
            conn = None
        if conn is None:
            conn = self._conn = http.client.HTTPConnection(self.host, self.port, timeout=_CONNECT_TIMEOUT)
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _readable(sock: Any) -> bool:
    try:
        ready, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(ready)
