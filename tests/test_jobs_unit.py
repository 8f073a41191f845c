"""Pure unit tests of the job records and webhook backoff (the Redis side is in test_jobs_replicas.py)."""

from __future__ import annotations

from execbox.models import ExecutionRequest, ExecutionResult
from execbox.server import jobrecords
from execbox.server.schemas import ErrorBody, JobRequest
from execbox.server.webhooks import WebhookSender


def test_a_queued_request_keeps_its_secrets_and_files_for_the_replica_that_runs_it() -> None:
    request = ExecutionRequest(
        code="print(1)",
        language="python",
        env={"TOKEN": "t0k"},
        files={"in/data.bin": b"\x00\xffbytes"},
        secrets={"STRIPE": {"value": "sk_live_123456", "hosts": ["api.stripe.com"]}},
    )
    raw = jobrecords.dump_request(request)
    assert "sk_live_123456" in raw  # model_dump would have masked it: the run would get "**********"
    again = jobrecords.load_request(raw)
    assert again == request
    assert again.secrets["STRIPE"].value.get_secret_value() == "sk_live_123456"
    assert again.files["in/data.bin"] == b"\x00\xffbytes"


def test_a_record_reads_back_as_the_job_its_tenant_sees() -> None:
    result = ExecutionResult(id="r", language="python", exit_code=0, duration_ms=1.5, stdout="1\n")
    rec = {
        "id": "ex_1",
        "tenant": "alpha",
        "language": "python",
        "created_at": "100.5",
        "started_at": "101.0",
        "finished_at": "102.0",
        "status": "completed",
        "owner": "host:1:abc",
        "attempts": "2",
        "retries": "1",
        "callback_url": "",
        "result": result.model_dump_json(),
    }
    job = jobrecords.view(rec, ttl=60)
    assert (job.status, job.attempts, job.retries, job.expires_at) == ("completed", 2, 1, 162.0)
    assert job.result == result and job.error is None and job.callback_url is None and job.callback_status is None
    failed = jobrecords.view(
        rec | {"status": "failed", "result": "", "error": ErrorBody(type="interrupted", message="m").model_dump_json()},
        ttl=60,
    )
    assert failed.result is None and failed.error is not None and failed.error.type == "interrupted"
    queued = jobrecords.view(rec | {"status": "queued", "started_at": "", "finished_at": ""}, ttl=60)
    assert queued.started_at is None and queued.expires_at is None


def test_webhook_backoff_grows_four_times_per_attempt() -> None:
    sender = WebhookSender(timeout=1, attempts=5, allow_private=False, backoff=0.5)
    assert [sender.delay(n) for n in (1, 2, 3, 4)] == [0.5, 2.0, 8.0, 32.0]


def test_retries_are_bounded_and_named_when_invalid() -> None:
    import pydantic
    import pytest

    assert JobRequest(code="1", retries=5).retries == 5
    for bad in (-1, 6, "many"):
        with pytest.raises(pydantic.ValidationError) as exc:
            JobRequest(code="1", retries=bad)
        assert exc.value.errors()[0]["loc"] == ("retries",)


def test_jobs_are_shared_through_redis_only_when_one_is_configured() -> None:
    from execbox.settings import Settings

    assert Settings().job_queue() is None  # the embedded default
    assert Settings(state_url="sqlite:///x.db").job_queue() is None
    assert Settings(state_url="redis://h:6379/0").job_queue() == "redis://h:6379/0"
    assert Settings(state_url="redis://h/0", queue_url="redis://q/1").job_queue() == "redis://q/1"
