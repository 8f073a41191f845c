"""The synchronous client's kept-alive lane (``execbox/client_lane.py``), against a real
HTTP server on loopback: when it is taken, what it sends, connections it keeps or drops."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from execbox import Client
from execbox.client_lane import Lane
from execbox.exceptions import ServerBusyError, ServiceError

RESULT = {
    "id": "0123456789abcdef",
    "language": "python",
    "stdout": "1\n",
    "stderr": "",
    "exit_code": 0,
    "duration_ms": 1.0,
    "timed_out": False,
}


class Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        self.close_after_answer = False
        self.answer: tuple[int, dict[str, str], bytes] = (200, {}, json.dumps(RESULT).encode())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        status, headers, payload = self.server.answer
        self.send_response(status)
        for name, value in {"content-type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        if self.server.close_after_answer:  # as a server closing an idle kept-alive connection
            self.close_connection = True

    do_GET = do_POST = do_DELETE = _answer


@pytest.fixture
def server() -> Iterator[Recorder]:
    srv = Recorder()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_it_is_taken_only_where_it_cannot_differ_from_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert Lane.for_client("http://127.0.0.1:8080", {}, None, True) is not None
    assert Lane.for_client("https://127.0.0.1:8080", {}, None, True) is None
    assert Lane.for_client("http://127.0.0.1:8080", {}, httpx.HTTPTransport(), True) is None
    assert Lane.for_client("http://user:pw@127.0.0.1:8080", {}, None, True) is None
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert Lane.for_client("http://svc.test:8080", {}, None, True) is None  # httpx would use the proxy
    assert Lane.for_client("http://svc.test:8080", {}, None, False) is not None  # not when told not to
    monkeypatch.setenv("NO_PROXY", "svc.test")
    assert Lane.for_client("http://svc.test:8080", {}, None, True) is not None


def test_requests_go_over_one_kept_connection_as_httpx_would_send_them(server: Recorder) -> None:
    with Client(server.url + "/prefix", api_key="k3y") as c:
        assert c._lane is not None
        for _ in range(3):
            assert c.execute("print(1)", language="python").stdout == "1\n"
    assert server.connections == 1
    assert len(server.requests) == 3
    first = server.requests[0]
    assert first["method"] == "POST" and first["path"] == "/prefix/v1/execute"
    assert first["headers"]["Authorization"] == "Bearer k3y"
    assert first["headers"]["Host"] == server.url.removeprefix("http://")
    assert first["headers"]["Content-Type"] == "application/json"
    assert json.loads(first["body"]) == {"code": "print(1)", "language": "python", "env": {}}


def test_query_parameters_are_sent(server: Recorder) -> None:
    server.answer = (200, {}, json.dumps({"id": "0123456789abcdef", "status": "queued"}).encode())
    with Client(server.url) as c:
        c._send("GET", "/v1/executions/0123456789abcdef", 5.0, params={"wait": 1.5, "q": "a b+c/d"})
    assert server.requests[0]["path"] == "/v1/executions/0123456789abcdef?wait=1.5&q=a+b%2Bc%2Fd"


def test_a_connection_the_server_closed_is_replaced_and_no_request_is_sent_twice(server: Recorder) -> None:
    server.close_after_answer = True
    with Client(server.url) as c:
        for _ in range(3):
            assert c.execute("print(1)", language="python").exit_code == 0
            time.sleep(0.2)  # idle: the server's close arrives before the next call
    assert len(server.requests) == 3  # each sent once
    assert server.connections == 3


def test_error_answers_raise_what_they_raise_through_httpx(server: Recorder) -> None:
    body = {"error": {"type": "server_busy", "message": "too many executions queued"}}
    server.answer = (503, {"retry-after": "2"}, json.dumps(body).encode())
    for transport in (None, httpx.HTTPTransport()):
        with Client(server.url, transport=transport) as c, pytest.raises(ServerBusyError) as caught:
            c.execute("print(1)", language="python")
        assert caught.value.retry_after == 2.0 and "too many executions" in str(caught.value)


def test_a_service_that_is_not_there_is_a_service_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once it is closed
    with Client(f"http://127.0.0.1:{port}") as c, pytest.raises(ServiceError, match="cannot reach"):
        c.execute("print(1)", language="python")


def test_threads_sharing_a_client_all_get_their_answers(server: Recorder) -> None:
    answers: list[str] = []
    with Client(server.url) as c:

        def call() -> None:
            for _ in range(5):
                answers.append(c.execute("print(1)", language="python").stdout)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert answers == ["1\n"] * 20
    assert len(server.requests) == 20


def canned(answer: bytes) -> tuple[str, threading.Thread]:
    """A server on loopback that reads one request and writes ``answer`` as it is, then closes."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", thread


BODY = json.dumps(RESULT).encode()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(BODY[i : i + 50]), BODY[i : i + 50]) for i in range(0, len(BODY), 50))
        + b"0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + BODY,  # up to the close
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nConnection: close\r\n\r\n" % len(BODY) + BODY,
    ],
    ids=["chunked", "until-close", "length-then-close"],
)
def test_bodies_by_chunks_or_up_to_the_close_are_read(answer: bytes) -> None:
    url, thread = canned(answer)
    with Client(url) as c:
        assert c.execute("print(1)", language="python").stdout == "1\n"
        assert c._lane is not None
        assert (c._lane._sock is not None) == answer.startswith(b"HTTP/1.1 200 OK\r\nContent-Type")  # kept?
    thread.join(5)


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n{}",  # cut off
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n",
        b"",
    ],
    ids=["not-http", "cut-off", "bad-length", "bad-chunk", "huge-header", "nothing"],
)
def test_what_is_not_a_readable_answer_is_a_service_error(answer: bytes) -> None:
    url, thread = canned(answer)
    with Client(url) as c, pytest.raises(ServiceError, match="cannot reach"):
        c.execute("print(1)", language="python")
    thread.join(5)
