"""Test servers of the egress tests' own, on loopback (and a sandbox driver for end-to-end tests)."""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PLAIN_HOST = "plain.example.test"
SECURE_HOST = "secure.example.test"
OTHER_HOST = "other.example.test"


@dataclass
class Upstream:
    """An HTTP(S) server that echoes each request as JSON and records it."""

    server: http.server.ThreadingHTTPServer
    hits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(upstream: Upstream) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            hit = {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode("utf-8", "replace"),
            }
            upstream.hits.append(hit)
            out = json.dumps(hit).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            if self.path.startswith("/cookie"):
                self.send_header("set-cookie", "session=abc123; HttpOnly")
                self.send_header("x-api-key", "upstream-key-xyz")
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def start_upstream(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Upstream:
    server = http.server.ThreadingHTTPServer((host, 0), http.server.BaseHTTPRequestHandler)
    server.daemon_threads = True
    upstream = Upstream(server)
    server.RequestHandlerClass = _handler(upstream)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return upstream


def self_signed(directory: Path, hostname: str = SECURE_HOST) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for ``hostname``; returns its path and a server context."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "upstream-cert.pem", directory / "upstream-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return cert_path, ctx


class Listener:
    """A TCP (or UDP) server of the tests' own that counts whatever reaches it."""

    def __init__(self, host: str, port: int = 0, udp: bool = False) -> None:
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = int(self.sock.getsockname()[1])
        self.udp = udp
        self.hits = 0
        self._stop = False
        if not udp:
            self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                if self.udp:
                    self.sock.recvfrom(4096)
                else:
                    conn, _ = self.sock.accept()
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nreached")
                    conn.close()
                self.hits += 1
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


# -- driving a sandbox through the agent protocol --------------------------------------------

_HEAD = struct.Struct(">cI")


@dataclass
class SandboxResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    container_id: str

    def json(self) -> Any:
        lines = [line for line in self.stdout.splitlines() if line.startswith(("{", "["))]
        assert lines, f"no JSON output; stdout={self.stdout!r} stderr={self.stderr[-2000:]!r}"
        return json.loads(lines[-1])


RUNTIMES = {
    "python": ("main.py", ("python3", "main.py")),
    "javascript": ("main.js", ("node", "main.js")),
    "bash": ("main.sh", ("bash", "main.sh")),
}


@contextmanager
def sandbox(engine: Any, network: str, uid: int, isolation: Any = "container") -> Iterator[Any]:
    """A created, not yet started sandbox on ``network``; removed afterwards whatever happens."""
    from execbox.hardening import sandbox_spec
    from execbox.images import default_image
    from execbox.labels import labels_for
    from execbox.models import Limits

    labels = labels_for("run", ttl=600)
    spec = sandbox_spec(Limits(timeout=20), default_image(), uid, labels, network=network, isolation=isolation)
    sid = engine.create(spec)
    try:
        yield sid
    finally:
        engine.remove(sid)


def run_in_sandbox(
    engine: Any,
    network: str,
    code: str,
    language: str = "python",
    env: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
    timeout: float = 15,
    uid: int = 150_000,
    on_started: Any = None,
    isolation: str = "container",
) -> SandboxResult:
    from execbox.runtimes import BASE_ENV

    filename, argv = RUNTIMES[language]
    request = {
        "argv": list(argv),
        "filename": filename,
        "code": code,
        "env": {**BASE_ENV, "PYTHONUNBUFFERED": "1", **(env or {})},
        "stdin": None,
        "files": {p: base64.b64encode(t.encode()).decode() for p, t in (files or {}).items()},
        "workdir": "/work",
        "timeout": timeout,
        "output_bytes": 1 << 20,
    }
    with sandbox(engine, network, uid, isolation) as sid:
        chan = engine.attach(sid)
        try:
            engine.start(sid)
            if on_started is not None:
                on_started(sid)
            chan.send(json.dumps(request).encode() + b"\n")
            out, err, buf = bytearray(), bytearray(), bytearray()
            deadline = time.monotonic() + timeout + 10
            while True:
                item = chan.recv(max(deadline - time.monotonic(), 0.01))
                if item is None:
                    raise AssertionError(f"sandbox ended without a result: {bytes(out)!r} {bytes(err)!r}")
                stream, data = item
                if stream == 2:
                    err += data
                    continue
                buf += data
                while len(buf) >= _HEAD.size:
                    kind, length = _HEAD.unpack_from(buf)
                    if len(buf) < _HEAD.size + length:
                        break
                    body = bytes(buf[_HEAD.size : _HEAD.size + length])
                    del buf[: _HEAD.size + length]
                    if kind == b"K":  # "ready" (newer agents)
                        continue
                    if kind == b"O":
                        out += body
                    elif kind == b"E":
                        err += body
                    elif kind == b"R":
                        meta = json.loads(body)
                        return SandboxResult(
                            int(meta["exit_code"]),
                            out.decode("utf-8", "replace"),
                            err.decode("utf-8", "replace"),
                            bool(meta.get("timed_out")),
                            sid,
                        )
                    else:
                        raise AssertionError(f"agent error: {body!r}")
        finally:
            chan.close()


class WebSocketEcho:
    """A WebSocket server on loopback that echoes each text/binary message, then closes when asked."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.messages: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        import hashlib

        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            key = next(
                line.split(":", 1)[1].strip()
                for line in head.decode("latin-1").split("\r\n")
                if line.lower().startswith("sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
            conn.sendall(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
            )
            reader = conn.makefile("rb")
            while True:
                b1, b2 = reader.read(2)
                opcode, length = b1 & 0x0F, b2 & 0x7F
                if length == 126:
                    length = struct.unpack(">H", reader.read(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", reader.read(8))[0]
                mask = reader.read(4) if b2 & 0x80 else b"\0\0\0\0"
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(reader.read(length)))
                if opcode == 8:  # close: answer it
                    conn.sendall(bytes([0x88, len(payload)]) + payload)
                    return
                self.messages.append(payload)
                header = bytes([0x80 | opcode]) + (
                    bytes([length]) if length < 126 else bytes([126]) + struct.pack(">H", length)
                )
                conn.sendall(header + payload)

    def close(self) -> None:
        self.sock.close()
