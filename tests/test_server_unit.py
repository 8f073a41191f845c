"""Unit tests of the service's parts, without Docker: quotas, auth, SSRF checks, metrics, logs, errors."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
from pathlib import Path

import httpx
import pytest

from execbox.exceptions import (
    AuthenticationError,
    ConfigurationError,
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    ServerBusyError,
    ServiceError,
)
from execbox.models import DEFAULT_MAX_LIMITS, ExecutionResult
from execbox.server.auth import Authenticator, hash_key, load_tenants_file, sign
from execbox.server.jobs import JobStore, check_callback_url, resolve_callback
from execbox.server.logging import JsonFormatter, bind
from execbox.server.metrics import Metrics, outcome_of
from execbox.server.quota import Gate, QueueFull, QuotaExceeded, RateWindow, TenantQuotas
from tests.serverkit import metric


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


# -- global gate ---------------------------------------------------------------------------------


def test_gate_caps_holders_queues_fifo_and_refuses_beyond_the_queue() -> None:
    async def scenario() -> list[str]:
        gate = Gate(limit=1, queue=2)
        order: list[str] = []
        await gate.acquire()

        async def waiter(name: str, bounded: bool = True) -> None:
            await gate.acquire(timeout=5, bounded=bounded)
            order.append(name)
            gate.release()

        t1 = asyncio.create_task(waiter("first"))
        t2 = asyncio.create_task(waiter("second"))
        await asyncio.sleep(0)
        assert gate.waiting == 2
        with pytest.raises(QueueFull):
            await gate.acquire()
        # Unbounded waiters (jobs) do not use the queue's room but still wait their turn.
        t3 = asyncio.create_task(waiter("job", bounded=False))
        await asyncio.sleep(0)
        gate.release()
        await asyncio.gather(t1, t2, t3)
        assert gate.active == 0 and gate.waiting == 0
        return order

    async def unbounded() -> None:
        gate = Gate(limit=1, queue=0)
        await gate.acquire()
        task = asyncio.create_task(gate.acquire(bounded=False))
        await asyncio.sleep(0)
        assert gate.waiting == 1
        gate.release()
        await task
        assert gate.active == 1

    assert run(scenario()) == ["first", "second", "job"]
    run(unbounded())


def test_gate_timeout_and_cancellation_leave_no_ghost_waiters() -> None:
    async def scenario() -> None:
        gate = Gate(limit=1, queue=4)
        await gate.acquire()
        with pytest.raises(TimeoutError):
            await gate.acquire(timeout=0.01)
        task = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.waiting == 0
        gate.release()
        assert gate.active == 0
        assert gate.try_acquire()

    run(scenario())


# -- tenant quotas -------------------------------------------------------------------------------


def test_rate_window_slides_and_says_how_long_to_wait() -> None:
    now = [1000.0]
    window = RateWindow(3, clock=lambda: now[0])
    assert [window.take() for _ in range(3)] == [0, 0, 0]
    now[0] += 10
    assert window.take() == 50  # the first event leaves the window 50 s from now
    now[0] += 50
    assert window.take() == 0
    window.refund()
    assert window.take() == 0


def test_tenant_quotas_refuse_over_concurrency_then_over_rate() -> None:
    quotas = TenantQuotas(clock=lambda: 0.0)
    st = quotas.state("t", max_concurrent=1, per_minute=2)
    quotas.admit_now(st)
    with pytest.raises(QuotaExceeded) as exc:
        quotas.admit_now(st)
    assert exc.value.reason == "tenant_concurrency"
    st.slots.release()
    quotas.admit_now(st)
    st.slots.release()
    with pytest.raises(QuotaExceeded) as exc:
        quotas.admit_now(st)
    assert exc.value.reason == "rate_limited" and exc.value.retry_after == 60
    assert st.slots.active == 0  # a refused admission holds nothing


# -- tenants and keys ----------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_map_to_tenants(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text(f'[tenants.acme]\napi_keys = ["{hash_key("k" * 20)}"]\nlanguages = ["py"]\n')
    f.chmod(0o600)
    auth = Authenticator.build(DEFAULT_MAX_LIMITS, tenants_file=f, api_keys={"env-tenant": "e" * 20})
    tenant = auth.authenticate("Bearer " + "k" * 20)
    assert tenant is not None and tenant.name == "acme" and tenant.policy.languages == ("python",)
    assert hash_key("k" * 20) == "sha256:" + hashlib.sha256(b"k" * 20).hexdigest()
    assert "k" * 20 not in repr(tenant.policy)
    assert auth.authenticate("Bearer " + "e" * 20).name == "env-tenant"  # type: ignore[union-attr]
    for bad in (None, "", "Bearer", "Basic " + "k" * 20, "Bearer wrong-key-0123456789"):
        assert auth.authenticate(bad) is None


def test_tenants_file_errors_name_the_tenant_and_field(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    cases = {
        '[tenants.a]\napi_keys = ["plaintext-key-0123456789"]\n': "api_keys",
        '[tenants.a]\nlanguages = ["cobol"]\n': "cobol",
        "[tenants.a]\nmax_concurent = 3\n": "max_concurent",
        "[tenants.a]\nmax_limits = { memory = 'lots' }\n": "max_limits",
        "not toml [": "tenants file",
    }
    for text, needle in cases.items():
        f.write_text(text)
        with pytest.raises(ConfigurationError, match=needle):
            load_tenants_file(f)
    f.write_text(f'[tenants.a]\napi_keys = ["{hash_key("x" * 20)}"]\nmax_limits = {{ memory = "64g" }}\n')
    with pytest.raises(ConfigurationError, match="above the service's maximum"):
        Authenticator.build(DEFAULT_MAX_LIMITS, tenants_file=f)
    with pytest.raises(ConfigurationError, match="no API keys"):
        Authenticator.build(DEFAULT_MAX_LIMITS)
    assert Authenticator.build(DEFAULT_MAX_LIMITS, no_auth=True).authenticate(None) is not None


def test_webhook_signature_is_hmac_sha256_of_the_body() -> None:
    body = b'{"id":"ex_1"}'
    expected = hmac.new(b"secret-0123456789", body, hashlib.sha256).hexdigest()
    assert sign("secret-0123456789", body) == "sha256=" + expected


# -- callback URLs (SSRF) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://localhost:8080/x",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://172.17.0.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",
    ],
)
def test_callbacks_to_internal_addresses_are_refused_by_default(url: str) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        run(resolve_callback(url, allow_private=False))
    assert exc.value.field == "callback_url"


def test_callback_url_checks() -> None:
    # A literal public address passes the check (nothing is sent anywhere here).
    assert run(resolve_callback("https://93.184.216.34/hook", allow_private=False)) == "93.184.216.34"
    assert run(resolve_callback("http://127.0.0.1:9/h", allow_private=True)) == "127.0.0.1"
    for bad in ("ftp://example.test/", "http:///nohost", "http://user:pw@127.0.0.1/", "http://127.0.0.1:99999/"):
        with pytest.raises(InvalidRequestError):
            check_callback_url(bad)


# -- jobs store ----------------------------------------------------------------------------------


def test_job_store_namespaces_by_tenant_and_expires_finished_jobs() -> None:
    from execbox.models import ExecutionRequest
    from execbox.server.jobs import Job

    now = [0.0]
    store = JobStore(ttl=10, max_jobs=2, clock=lambda: now[0])
    job = Job(store.new_id(), "a", ExecutionRequest(code="1"), 0.0)
    store.add(job)
    assert store.get("a", job.id) is job and store.get("b", job.id) is None
    assert store.pending("a") == 1 and store.has_room()
    store.add(Job(store.new_id(), "a", ExecutionRequest(code="1"), 0.0))
    assert not store.has_room()
    job.finished_at = 5.0
    now[0] = 14.9
    assert store.get("a", job.id) is job
    now[0] = 15.0
    assert store.get("a", job.id) is None and store.has_room()
    assert len({store.new_id() for _ in range(100)}) == 100


# -- metrics -------------------------------------------------------------------------------------


def _result(**kw: object) -> ExecutionResult:
    return ExecutionResult(id="x", language="python", exit_code=0, duration_ms=1.0).model_copy(update=kw)


def test_metrics_text_format() -> None:
    m = Metrics()
    m.started()
    assert metric(m.render(), "execbox_executions_in_flight") == 1
    m.finished("python", outcome_of(_result()), 0.003)  # a pooled run: milliseconds
    m.started()
    m.finished("python", outcome_of(_result(timed_out=True, exit_code=137)), 12.0)
    m.rejected("rate_limited")
    m.gauge("execbox_things", "Things now.", lambda: 7)
    text = m.render()
    assert metric(text, 'execbox_executions_total{language="python",outcome="ok"}') == 1
    assert metric(text, 'execbox_executions_total{language="python",outcome="timeout"}') == 1
    # Buckets from 1 ms: the 3 ms run is told apart from a 50 ms one.
    assert metric(text, 'execbox_execution_duration_seconds_bucket{language="python",le="0.0025"}') == 0
    assert metric(text, 'execbox_execution_duration_seconds_bucket{language="python",le="0.005"}') == 1
    assert metric(text, 'execbox_execution_duration_seconds_bucket{language="python",le="+Inf"}') == 2
    assert metric(text, 'execbox_execution_duration_seconds_count{language="python"}') == 2
    assert metric(text, 'execbox_rejections_total{reason="rate_limited"}') == 1
    assert metric(text, "execbox_executions_in_flight") == 0
    assert metric(text, "execbox_things") == 7 and "# TYPE execbox_things gauge" in text
    assert outcome_of(_result(oom_killed=True)) == "oom" and outcome_of(_result(exit_code=3)) == "error"
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2
    # Each app counts for itself (a registry per Metrics, not the process-global one).
    assert metric(Metrics().render(), 'execbox_rejections_total{reason="rate_limited"}') == 0


# -- logs ----------------------------------------------------------------------------------------


def test_json_logs_carry_bound_context_and_drop_unlisted_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("execbox.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)

    async def scenario() -> None:
        bind(tenant="acme", execution_id="e123")
        logger.info("finished", extra={"exit_code": 0, "env": {"SECRET": "hunter2"}, "body": "hunter2"})

    try:
        asyncio.run(scenario())
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["tenant"] == "acme" and line["execution_id"] == "e123" and line["exit_code"] == 0
    assert line["msg"] == "finished" and line["level"] == "info"
    assert "hunter2" not in stream.getvalue()


# -- client error mapping ------------------------------------------------------------------------


def test_client_maps_http_errors_onto_the_exception_tree() -> None:
    from execbox.client import raise_for_response

    def answer(status: int, type_: str, field: str | None = None, retry: str | None = None) -> httpx.Response:
        headers = {"Retry-After": retry} if retry else {}
        body = {"error": {"type": type_, "message": "m", "field": field}}
        return httpx.Response(status, json=body, headers=headers)

    cases: list[tuple[httpx.Response, type[Exception]]] = [
        (answer(401, "unauthorized"), AuthenticationError),
        (answer(403, "forbidden", "language"), PermissionDeniedError),
        (answer(404, "not_found"), NotFoundError),
        (answer(429, "quota_exceeded", retry="7"), QuotaExceededError),
        (answer(503, "server_busy", retry="2"), ServerBusyError),
        (answer(503, "engine_unavailable"), EngineUnavailableError),
        (answer(500, "internal_error"), ServiceError),
        (httpx.Response(502, text="<html>bad gateway</html>"), ServiceError),
    ]
    for response, kind in cases:
        with pytest.raises(kind):
            raise_for_response(response)
    with pytest.raises(InvalidRequestError) as exc:
        raise_for_response(answer(422, "invalid_request", "limits.memory"))
    assert exc.value.field == "limits.memory"
    with pytest.raises(QuotaExceededError) as q:
        raise_for_response(answer(429, "quota_exceeded", retry="7"))
    assert q.value.retry_after == 7 and q.value.status_code == 429
    raise_for_response(httpx.Response(200, json={}))


def test_a_failed_job_raises_its_error_from_wait() -> None:
    from execbox.client import _job_result
    from execbox.exceptions import SandboxError
    from execbox.server.schemas import ErrorBody, ExecutionJob

    job = ExecutionJob(
        id="ex_1",
        status="failed",
        language="python",
        created_at=0,
        error=ErrorBody(type="sandbox_error", message="agent died"),
    )
    with pytest.raises(SandboxError, match="agent died"):
        _job_result(job)
    job = job.model_copy(update={"error": ErrorBody(type="shutting_down", message="bye")})
    with pytest.raises(ServiceError, match="bye"):
        _job_result(job)


def test_settings_come_from_execbox_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from execbox.settings import Settings

    monkeypatch.setenv("EXECBOX_TENANTS_FILE", str(tmp_path / "t.toml"))
    monkeypatch.setenv("EXECBOX_MAX_CONCURRENT", "7")
    monkeypatch.setenv("EXECBOX_API_KEYS", '{"ci": "sha256:' + "0" * 64 + '"}')
    s = Settings()
    assert (s.tenants_file, s.max_concurrent, s.api_keys) == (tmp_path / "t.toml", 7, {"ci": "sha256:" + "0" * 64})
    assert (s.host, s.port, s.no_auth, s.allow_private_callbacks) == ("127.0.0.1", 8080, False, False)
    assert Settings(max_concurrent=2).max_concurrent == 2  # explicit values win


def test_key_helper_prints_a_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    from execbox.server.auth import main

    assert main([]) == 0
    out = capsys.readouterr().out.split()
    key, digest = out[1], out[3]
    assert key.startswith("xbx_") and len(key) > 30 and digest == hash_key(key)


def test_tenant_names_must_be_safe_ids(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text(f'[tenants."../etc"]\napi_keys = ["{hash_key("x" * 20)}"]\n')
    with pytest.raises(ConfigurationError, match="tenant name"):
        Authenticator.build(DEFAULT_MAX_LIMITS, tenants_file=f)
