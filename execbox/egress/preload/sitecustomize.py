"""execbox egress preload for Python (a sitecustomize on PYTHONPATH).

urllib honours HTTP(S)_PROXY by itself; other clients built on
``socket.create_connection`` (http.client, and so anything on top of it) are
tunnelled through the egress proxy with CONNECT. A convenience, not the boundary:
code that bypasses it reaches nothing, since the kernel lets the sandbox talk to
the proxy port only.
"""

from __future__ import annotations

import base64
import os
import socket
from typing import Any
from urllib.parse import unquote, urlsplit

_ORIGINAL = socket.create_connection


def _install() -> None:
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("HTTP_PROXY")
    if not url:
        return
    parts = urlsplit(url)
    if not parts.hostname:
        return
    proxy = (parts.hostname, parts.port or 80)
    auth = ""
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        auth = f"Proxy-Authorization: Basic {base64.b64encode(token).decode()}\r\n"
    no_proxy = [
        p.strip().lower()
        for p in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",")
        if p.strip()
    ]

    def bypass(host: str) -> bool:
        host = host.lower().strip("[]")
        if host == proxy[0]:
            return True
        return any(p == "*" or host == p or host.endswith(p if p.startswith(".") else "." + p) for p in no_proxy)

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host, port = str(address[0]), int(address[1])
        if bypass(host):
            return _ORIGINAL(address, *args, **kwargs)
        sock = _ORIGINAL(proxy, *args, **kwargs)
        try:
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(1)  # byte by byte: nothing after the reply head may be consumed
                if not chunk or len(head) > 65536:
                    raise ConnectionError(f"egress proxy closed the tunnel to {target}")
                head += chunk
            status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
            if status != b"200":
                first = head.split(b"\r\n", 1)[0].decode("latin-1")
                raise ConnectionRefusedError(f"egress proxy refused {target}: {first}")
        except BaseException:
            sock.close()
            raise
        return sock

    socket.create_connection = create_connection  # type: ignore[assignment]


_install()
