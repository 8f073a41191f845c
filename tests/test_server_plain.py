"""``POST /v1/execute`` answers the same whether the Guard takes it (a JSON body, no stream:
``routes.execute.execute_plain``) or the framework does (here forced with ``?stream=false``).

A real server over the real engine: successes, every kind of refusal, and the counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from execbox.engine.base import Engine
from execbox.server.middleware import _plain_execute

from .serverkit import KEY_A, KEY_PY, LiveServer, live_server, metric, settings, write_tenants

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tenants = write_tenants(tmp_path_factory.mktemp("tenants"))
    with live_server(engine, settings(tenants, max_code_bytes=4096, max_body_bytes=64 << 10)) as srv:
        yield srv


def both(c: httpx.Client, **kw: Any) -> tuple[httpx.Response, httpx.Response]:
    """The same request by the Guard's path and by the framework's."""
    return c.post("/v1/execute", **kw), c.post("/v1/execute", params={"stream": "false"}, **kw)


def comparable(r: httpx.Response) -> tuple[int, Any, str | None, str | None]:
    body = r.json()
    if r.status_code == 200:
        for volatile in ("id", "sandbox_id", "duration_ms", "run_ms"):
            body.pop(volatile)
    return r.status_code, body, r.headers.get("content-type"), r.headers.get("retry-after")


def test_only_a_plain_json_execute_takes_the_short_path() -> None:
    json_post = {"type": "http", "path": "/v1/execute", "method": "POST", "query_string": b""}
    ct = {b"content-type": b"application/json; charset=utf-8"}
    assert _plain_execute(json_post, ct)
    assert not _plain_execute({**json_post, "query_string": b"stream=1"}, ct)
    assert not _plain_execute(json_post, {**ct, b"accept": b"text/event-stream"})
    assert not _plain_execute(json_post, {b"content-type": b"text/plain"})
    assert not _plain_execute(json_post, {})
    assert not _plain_execute({**json_post, "path": "/execute"}, ct)
    assert not _plain_execute({**json_post, "method": "PUT"}, ct)


def test_results_and_refusals_are_the_same_on_both_paths(server: LiveServer) -> None:
    with server.client(KEY_A) as c:
        cases: list[dict[str, Any]] = [
            {
                "json": {
                    "code": "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)",
                    "language": "python",
                    "env": {"A": "1"},
                }
            },
            {"json": {"code": "console.log(process.env.A)", "language": "javascript", "env": {"A": "2"}}},
            {"json": {"code": "print(1)", "language": "cobol"}},  # not validated: the framework answers
            {"json": {"code": "print(1)", "language": "python", "limits": {"memory": "64g"}}},  # over the tenant's max
            {"json": {"code": "x" * 5000, "language": "python"}},  # over max_code_bytes
            {"json": {"code": "print(1)", "language": "python", "image": "no-such-image:1"}},
            {"json": {"code": "print(1)", "language": "python", "persist_state": True}},  # needs user_id
            {"json": ["not", "an", "object"]},
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}},
        ]
        for case in cases:
            plain, framework = both(c, **case)
            assert comparable(plain) == comparable(framework), case
            assert plain.headers.get("x-request-id") and framework.headers.get("x-request-id")
        ok = c.post("/v1/execute", json={"code": "print(6 * 7)", "language": "python"}).json()
        assert ok["stdout"] == "42\n" and ok["exit_code"] == 0


def test_tenant_policy_and_rate_limits_hold_on_the_short_path(server: LiveServer) -> None:
    with server.client(KEY_PY) as c:
        plain, framework = both(c, json={"code": "console.log(1)", "language": "javascript"})
        assert comparable(plain) == comparable(framework)
        assert plain.status_code == 403 and plain.json()["error"]["field"] == "language"
        # pyonly may run 2 executions a minute: the third is refused, on either path.
        codes = [c.post("/v1/execute", json={"code": "print(1)", "language": "python"}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        refused = c.post("/v1/execute", json={"code": "print(1)", "language": "python"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    with server.client(KEY_A) as c:
        text = c.get("/metrics").text
        assert metric(text, 'execbox_rejections_total{reason="rate_limited"}') >= 2
        assert metric(text, 'execbox_executions_total{language="python",outcome="ok"}') >= 3
