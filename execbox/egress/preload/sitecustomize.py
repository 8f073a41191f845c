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
            _connect(sock, host, port, auth)
        except BaseException:
            sock.close()
            raise
        return sock

    socket.create_connection = create_connection  # type: ignore[assignment]
    _patch_http_client()


def _connect(sock: socket.socket, host: str, port: int, auth: str, headers: str = "") -> None:
    """Ask the proxy for a tunnel on ``sock``; a refusal raises with the proxy's reason."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}{headers}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: nothing after the reply head may be consumed
        if not chunk or len(head) > 65536:
            raise ConnectionError(f"egress proxy closed the tunnel to {target}")
        head += chunk
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)[1] if lines[0].count(" ") >= 1 else ""
    if status != "200":
        fields = (h.partition(":") for h in lines[1:])
        why = [v.strip() for k, _, v in fields if k.lower() == "x-execbox-denied"]
        detail = f" ({why[0]})" if why else ""
        raise ConnectionRefusedError(f"egress proxy refused {target}: {lines[0]}{detail}")


def _patch_http_client() -> None:
    """http.client's own CONNECT (urllib's HTTPS through HTTPS_PROXY) keeps only the status
    line of a refusal: ask for the tunnel here instead, so the error carries the reason.

    Done when http.client is first imported (importing it costs tens of milliseconds,
    which a program that never uses it should not pay), or now if it already is."""
    import sys

    if "http.client" in sys.modules:
        _patch(sys.modules["http.client"])
        return
    import importlib.abc
    import importlib.machinery

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name != "http.client":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            loader = spec.loader if spec is not None else None
            if loader is None or not hasattr(loader, "exec_module"):
                return spec
            run = loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                _patch(module)

            loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, _Finder())


def _patch(http_client: Any) -> None:
    def _tunnel(self: Any) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in getattr(self, "_tunnel_headers", {}).items())
        try:
            _connect(self.sock, self._tunnel_host, self._tunnel_port, "", extra)
        except ConnectionRefusedError as exc:
            self.close()
            raise OSError(f"Tunnel connection failed: {exc}") from None

    setattr(http_client.HTTPConnection, "_tunnel", _tunnel)  # noqa: B010 - a private method, replaced


_install()
