"""The HTTP API through a real uvicorn server on 127.0.0.1 and the real Docker Engine."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from execbox.engine.base import Engine

from .serverkit import (
    KEY_A,
    KEY_B,
    KEY_PY,
    SECRET_A,
    LiveServer,
    Receiver,
    live_server,
    metric,
    settings,
    write_tenants,
)

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tenants = write_tenants(tmp_path_factory.mktemp("tenants"))
    with live_server(engine, settings(tenants, max_code_bytes=64 << 10, max_body_bytes=256 << 10)) as srv:
        yield srv


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(KEY_A) as c:
        yield c


def error_of(r: httpx.Response) -> dict[str, str]:
    body = r.json()
    assert set(body) >= {"error"}, body
    return body["error"]  # type: ignore[no-any-return]


def wait_for(predicate: object, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- execute -------------------------------------------------------------------------------------


def test_execute_runs_each_language(client: httpx.Client) -> None:
    cases = {
        "javascript": "console.log(process.env.GREETING + ' js')",
        "python": "import os; print(os.environ['GREETING'] + ' py')",
        "bash": 'echo "$GREETING sh"; echo oops >&2; exit 3',
    }
    for language, code in cases.items():
        r = client.post("/v1/execute", json={"language": language, "code": code, "env": {"GREETING": "hi"}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["language"] == language
        assert body["stdout"] == {"javascript": "hi js\n", "python": "hi py\n", "bash": "hi sh\n"}[language]
        assert body["timed_out"] is False and body["oom_killed"] is False
    assert body["exit_code"] == 3 and body["stderr"] == "oops\n"


def test_execute_passes_stdin_files_and_limits(client: httpx.Client) -> None:
    r = client.post(
        "/v1/execute",
        json={
            "language": "python",
            "code": "import sys; print(sys.stdin.read(), open('d/f.txt').read()); print('x' * 5000)",
            "stdin": "in",
            "files": {"d/f.txt": base64.b64encode(b"file").decode()},
            "limits": {"output_bytes": 100, "memory": "128m"},
            "timeout": 5,
        },
    )
    body = r.json()
    assert r.status_code == 200 and body["stdout"].startswith("in file\nxxx") and body["output_truncated"] is True
    assert len(body["stdout"]) == 100
    r = client.post("/v1/execute", json={"language": "python", "code": "import time; time.sleep(30)", "timeout": 1})
    assert r.status_code == 200 and r.json()["timed_out"] is True


def test_seed_endpoint_takes_code_and_env_and_returns_output(client: httpx.Client) -> None:
    r = client.post(
        "/execute",
        json={"code": "console.log('Counter:', Number(process.env.STATE_COUNTER) + 1)", "env": {"STATE_COUNTER": "1"}},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output"] == body["stdout"] == "Counter: 2\n" and body["language"] == "javascript"
    r = client.post("/execute", json={"code": "print(1)", "env": {}, "language": "python"})
    assert r.json()["output"] == "1\n"
    r = client.post("/execute", json={"code": "x", "env": {"BAD-NAME": "v"}})
    assert r.status_code == 422 and error_of(r)["field"] == "env"
    r = client.post("/execute", json={"code": "x", "limits": {}})
    assert r.status_code == 422 and error_of(r)["field"] == "limits"


# -- streaming -----------------------------------------------------------------------------------


def test_stream_delivers_output_before_the_program_ends_then_the_result(server: LiveServer) -> None:
    code = "import sys, time\nprint('first')\nprint('warn', file=sys.stderr)\ntime.sleep(60)"
    events: list[tuple[str, dict[str, object]]] = []
    in_flight_at_first_line = None
    with (
        server.client() as c,
        c.stream(
            "POST",
            "/v1/execute",
            json={"language": "python", "code": code, "timeout": 3},
            headers={"Accept": "text/event-stream"},
        ) as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event or "", json.loads(line[6:])))
                if event == "stdout" and in_flight_at_first_line is None:
                    # The program sleeps until its 3 s timeout kills it: it is still running now.
                    with server.client() as probe:
                        in_flight_at_first_line = metric(probe.get("/metrics").text, "execbox_executions_in_flight")
    kinds = [k for k, _ in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    assert "".join(str(d["data"]) for k, d in events if k == "stdout") == "first\n"
    assert "".join(str(d["data"]) for k, d in events if k == "stderr") == "warn\n"
    assert kinds.index("stdout") < kinds.index("result")
    assert in_flight_at_first_line == 1
    result = events[-1][1]
    assert result["timed_out"] is True and result["stdout"] == "first\n" and result["stderr"] == "warn\n"


def test_stream_query_parameter_and_errors_before_streaming(client: httpx.Client) -> None:
    r = client.post("/v1/execute?stream=true", json={"language": "bash", "code": "echo a; echo b"})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert 0 <= r.text.index("event: stdout") < r.text.index("event: result")
    # Bad requests are plain error answers, not streams.
    r = client.post("/v1/execute?stream=true", json={"language": "cobol", "code": "x"})
    assert r.status_code == 422 and error_of(r)["field"] == "language"


# -- errors --------------------------------------------------------------------------------------


def test_missing_or_unknown_key_is_401_before_anything_else(server: LiveServer) -> None:
    for key in (None, "not-a-key-0123456789"):
        with server.client(key) as c:
            for r in (
                c.post("/v1/execute", json={"code": "1"}),
                c.post("/v1/execute", content=b"{not json", headers={"Content-Type": "application/json"}),
                c.post("/execute", json={"code": "1"}),
                c.get("/v1/executions/ex_whatever"),
            ):
                assert r.status_code == 401, r.text
                assert error_of(r)["type"] == "unauthorized"
                assert r.headers["www-authenticate"].startswith("Bearer")
    with server.client(None) as c:
        r = c.post("/v1/execute", json={"code": "1"}, headers={"Authorization": f"Basic {KEY_A}"})
        assert r.status_code == 401
        assert c.get("/healthz").status_code == 200


def test_bad_input_is_422_naming_the_field(client: httpx.Client, server: LiveServer) -> None:
    before = metric(client.get("/metrics").text, 'execbox_rejections_total{reason="invalid"}')
    cases = [
        ({"code": "1", "langauge": "python"}, "langauge"),
        ({"code": "1", "timeout": "soon"}, "timeout"),
        ({"code": "1", "limits": {"memory": "lots"}}, "limits.memory"),
        ({"code": "1", "limits": {"memory": "2g"}}, "limits.memory"),  # above alpha's 512m
        ({"code": "1", "timeout": 25}, "timeout"),  # above alpha's 20 s
        ({"code": "1", "limits": {"timeout": 25}}, "limits.timeout"),
        ({"code": "1", "limits": {"swap": 1}}, "limits.swap"),
        ({"code": "1", "language": "cobol"}, "language"),
        ({"code": "   "}, "code"),
        ({"language": "python"}, "code"),
        ({"code": "1", "env": {"A": 1}}, "env.A"),
        ({"code": "1", "files": {"../x": "eQ=="}}, "files"),
        ({"code": "1", "files": {"x": "not base64!"}}, "files.x"),
        ([1, 2], "body"),
    ]
    for body, field in cases:
        r = client.post("/v1/execute", json=body)
        assert r.status_code == 422, (body, r.text)
        assert error_of(r)["field"] == field, (body, r.json())
        assert error_of(r)["type"] == "invalid_request"
    r = client.post("/v1/execute", content=b'{"code": "1",', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and error_of(r)["field"] == "body" and "JSON" in error_of(r)["message"]
    r = client.post("/v1/execute", content=b'{"code": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and error_of(r)["field"] == "body"  # not UTF-8 (found by the fuzzer)
    # The offending values are never echoed back (they may be secrets).
    r = client.post("/v1/execute", json={"code": "1", "env": {"TOKEN": ["sk_live_secret"]}})
    assert r.status_code == 422 and "sk_live_secret" not in r.text
    after = metric(client.get("/metrics").text, 'execbox_rejections_total{reason="invalid"}')
    assert after - before == len(cases) + 3


def test_oversized_body_or_code_is_413(client: httpx.Client) -> None:
    r = client.post("/v1/execute", json={"code": "x" * (300 << 10)})
    assert r.status_code == 413 and error_of(r)["field"] == "body"
    r = client.post("/v1/execute", json={"code": "#" + "x" * (80 << 10), "language": "python"})
    assert r.status_code == 413 and error_of(r)["field"] == "code"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies while reading
        yield b'{"code": "'
        for _ in range(300):
            yield b"x" * 1024
        yield b'"}'

    r = client.post("/v1/execute", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert metric(client.get("/metrics").text, 'execbox_rejections_total{reason="too_large"}') >= 3


def test_tenant_policy_forbids_languages_and_images(server: LiveServer) -> None:
    with server.client(KEY_PY) as c:
        r = c.post("/v1/execute", json={"code": "console.log(1)", "language": "js"})
        assert r.status_code == 403 and error_of(r)["field"] == "language"
    with server.client(KEY_A) as c:
        r = c.post("/v1/execute", json={"code": "1", "image": "alpine:latest"})
        assert r.status_code == 403 and error_of(r)["field"] == "image"


# -- async executions and webhooks ---------------------------------------------------------------


def test_async_execution_result_and_signed_webhook(server: LiveServer) -> None:
    with Receiver() as hook, server.client(KEY_A) as c:
        r = c.post(
            "/v1/executions",
            json={"language": "python", "code": "print(6 * 7)", "callback_url": hook.url},
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.json()["status"] == "queued"
        r = c.get(f"/v1/executions/{job_id}", params={"wait": 30})
        body = r.json()
        assert body["status"] == "completed" and body["result"]["stdout"] == "42\n", body
        assert body["expires_at"] > body["finished_at"]
        assert hook.event.wait(30), "webhook not delivered"
        headers, raw = hook.received[0]
        expected = "sha256=" + hmac.new(SECRET_A.encode(), raw, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-execbox-signature"], expected)
        assert headers["x-execbox-delivery"] == job_id  # receivers de-duplicate on it
        assert headers["x-execbox-signature"] != "sha256=" + hmac.new(b"wrong", raw, hashlib.sha256).hexdigest()
        assert hook.json()["id"] == job_id and hook.json()["result"]["stdout"] == "42\n"
        wait_for(lambda: c.get(f"/v1/executions/{job_id}").json()["callback_status"] == "delivered", "delivery")
    # Another tenant cannot see it: the same 404 as an unknown id.
    with server.client(KEY_B) as c:
        r = c.get(f"/v1/executions/{job_id}")
        assert r.status_code == 404 and error_of(r)["type"] == "not_found"
        assert c.get("/v1/executions/ex_unknown").json() == r.json()


def test_async_execution_validation_and_callback_rules(server: LiveServer) -> None:
    with server.client(KEY_A) as c:
        r = c.post("/v1/executions", json={"code": "1", "limits": {"memory": "2g"}})
        assert r.status_code == 422 and error_of(r)["field"] == "limits.memory"
        r = c.post("/v1/executions", json={"code": "1", "callback_url": "ftp://127.0.0.1/"})
        assert r.status_code == 422 and error_of(r)["field"] == "callback_url"
    with server.client(KEY_B) as c:  # bravo has no webhook secret
        r = c.post("/v1/executions", json={"code": "1", "callback_url": "http://127.0.0.1:9/"})
        assert r.status_code == 422 and error_of(r)["field"] == "callback_url"


def test_failed_program_is_a_completed_job_with_its_exit_code(server: LiveServer) -> None:
    with server.client(KEY_B) as c:
        job_id = c.post("/v1/executions", json={"language": "bash", "code": "echo no >&2; exit 4"}).json()["id"]
        body = c.get(f"/v1/executions/{job_id}", params={"wait": 30}).json()
        assert body["status"] == "completed" and body["result"]["exit_code"] == 4 and body["error"] is None


# -- health, metrics, OpenAPI --------------------------------------------------------------------


def test_health_readiness_and_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"engine": "ok", "image": "ok"}
    client.post("/v1/execute", json={"language": "bash", "code": "exit 0"})
    client.post("/v1/execute", json={"language": "bash", "code": "exit 1"})
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert metric(text, 'execbox_executions_total{language="bash",outcome="ok"}') >= 1
    assert metric(text, 'execbox_executions_total{language="bash",outcome="error"}') >= 1
    assert metric(text, 'execbox_execution_duration_seconds_count{language="bash"}') >= 2
    assert "# TYPE execbox_executions_in_flight gauge" in text
    assert "# TYPE execbox_rejections_total counter" in text


def test_openapi_describes_every_field(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert {
        "/v1/execute",
        "/execute",
        "/v1/executions",
        "/v1/executions/{execution_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(spec["paths"])
    missing = [
        f"{name}.{prop}"
        for name, schema in spec["components"]["schemas"].items()
        for prop, p in schema.get("properties", {}).items()
        if not p.get("description")
    ]
    assert not missing, missing
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert set(spec["paths"]["/v1/execute"]["post"]["responses"]) >= {"200", "401", "413", "422", "429", "503"}


def test_concurrent_requests_are_all_served(server: LiveServer) -> None:
    results: list[int] = []

    def one(i: int) -> None:
        # Three per tenant (within each tenant's concurrency), six in all: the global cap of 2 queues them.
        with server.client(KEY_A if i % 2 else KEY_B) as c:
            r = c.post("/v1/execute", json={"language": "bash", "code": f"echo {i}"})
            results.append(r.status_code if r.json().get("stdout") == f"{i}\n" else -1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [200] * 6
