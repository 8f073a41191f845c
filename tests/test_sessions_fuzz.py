"""Schemathesis fuzzing of the session endpoints against a real uvicorn server over real Docker.

Bounded: a few dozen examples per operation; the caps bound how many sessions the fuzzer can
start (the rest is 429), and every session it made ends afterwards. No answer may be a 5xx,
and every answer must match the documented status codes, content types and schemas.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from execbox.engine.base import Engine
from execbox.server.auth import hash_key
from execbox.state import open_store

from .serverkit import LiveServer, live_server, write_tenants
from .serverkit import settings as server_settings
from .test_sessions import end_all

pytestmark = pytest.mark.docker

KEY = "test-key-session-fuzz-0123"
MAX_EXAMPLES = 30

TENANTS = f"""
[tenants.fuzz]
api_keys = ["{hash_key(KEY)}"]
max_concurrent = 64
executions_per_minute = 100000

[tenants.fuzz.max_limits]
timeout = 2
memory = "128m"
cpus = 0.5
pids = 64
disk = "16m"
output_bytes = "64k"
"""

OPERATIONS = [
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/{session_id}"),
    ("DELETE", "/v1/sessions/{session_id}"),
    ("POST", "/v1/sessions/{session_id}/execute"),
]
CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in schemathesis.GenerationMode
    if mode is schemathesis.GenerationMode.POSITIVE or method == "POST" or "{" in path
]


@pytest.fixture(scope="module")
def fuzz_server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    directory: Path = tmp_path_factory.mktemp("session-fuzz")
    url = f"sqlite:///{directory}/registry.db"
    s = server_settings(
        write_tenants(directory, TENANTS),
        max_body_bytes=256 << 10,
        session_store_url=url,
        session_max_per_user=1,
        session_max_total=3,
    )
    try:
        with live_server(engine, s, pool=False) as srv:
            yield srv
    finally:
        store = open_store(url)
        try:
            left = end_all(engine, store)
        finally:
            store.close()
        assert not left


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_session_api_never_answers_5xx(
    api_schema: schemathesis.BaseSchema,
    fuzz_server: LiveServer,
    method: str,
    path: str,
    mode: schemathesis.GenerationMode,
) -> None:
    operation = api_schema[path][method]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=fuzz_server.url,
            headers={"Authorization": f"Bearer {KEY}"},
            checks=checks,
            timeout=60,
        )

    fuzz()
