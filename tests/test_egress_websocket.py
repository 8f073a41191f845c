"""WebSocket traffic through the egress proxy: allowed by its handshake, logged with bytes each way."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from execbox import Executor
from execbox.engine.base import Engine
from tests.conftest import ours

from .egress_support import WebSocketEcho

pytestmark = pytest.mark.docker

WS_HOST = "ws.example.test"

# A minimal client: the handshake and masked frames by hand (the sandbox has no WebSocket library).
CLIENT = r"""
import base64, json, os, socket, struct
def frame(opcode, payload):
    mask = os.urandom(4)
    body = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    return bytes([0x80 | opcode]) + size + mask + body
def read_frame(f):
    b1, b2 = f.read(2)
    n = b2 & 0x7F
    if n == 126:
        n = struct.unpack(">H", f.read(2))[0]
    return b1 & 0x0F, f.read(n)
s = socket.create_connection(("ws.example.test", 80), timeout=10)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET /chat HTTP/1.1\r\nHost: ws.example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
f = s.makefile("rb")
status = f.readline().split()[1].decode()
while f.readline() not in (b"\r\n", b""):
    pass
echoes = []
for text in ("hello", "x" * 300):
    s.sendall(frame(1, text.encode()))
    echoes.append(read_frame(f)[1].decode())
s.sendall(frame(8, struct.pack(">H", 1000)))
print(json.dumps({"status": status, "echoes": [len(e) for e in echoes], "close": read_frame(f)[0]}))
"""


@pytest.fixture(scope="module")
def ws() -> Iterator[WebSocketEcho]:
    server = WebSocketEcho()
    yield server
    server.close()


@pytest.fixture(scope="module")
def ex(engine: Engine, ws: WebSocketEcho) -> Iterator[Executor]:
    executor = Executor(engine=engine, pool=False, proxy_host_map={WS_HOST: f"127.0.0.1:{ws.port}"})
    yield executor
    executor.close()
    assert ours(engine) == []


def test_websocket_is_logged_with_bytes_each_way(ex: Executor, ws: WebSocketEcho) -> None:
    r = ex.execute(CLIENT, language="python", timeout=30, network={"mode": "proxy", "allow": [WS_HOST]})
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == {"status": "101", "echoes": [5, 300], "close": 8}
    assert ws.messages[-2:] == [b"hello", b"x" * 300]
    handshake, socket_ = r.network_log
    assert (handshake.method, handshake.status, handshake.decision) == ("GET", 101, "allowed")
    assert handshake.url == f"http://{WS_HOST}/chat"
    assert (socket_.method, socket_.url, socket_.status, socket_.decision) == (
        "WEBSOCKET",
        f"http://{WS_HOST}/chat",
        101,
        "allowed",
    )
    # Two text messages each way (close frames are not messages).
    assert (socket_.request_bytes, socket_.response_bytes) == (305, 305)
    assert socket_.reason.startswith("4 messages; closed by the client: 1000")


def test_websocket_to_a_denied_host_never_opens(ex: Executor, ws: WebSocketEcho) -> None:
    before = len(ws.messages)
    r = ex.execute(CLIENT, language="python", timeout=30, network={"mode": "proxy", "allow": ["other.example.test"]})
    assert r.exit_code != 0 and "not allowed by the policy" in r.stderr
    assert len(ws.messages) == before
    assert [(e.method, e.decision) for e in r.network_log] == [("CONNECT", "denied")]
