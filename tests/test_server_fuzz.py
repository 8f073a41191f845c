"""Schemathesis fuzzing of the OpenAPI document against a real uvicorn server over real Docker.

Bounded: a few dozen examples per operation, cheap limits for the runs it causes. No answer may be a 5xx,
and every answer must match the documented status codes, content types and schemas.
"""

from __future__ import annotations

from collections.abc import Iterator

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

from .serverkit import LiveServer, live_server, write_tenants
from .serverkit import settings as server_settings

pytestmark = pytest.mark.docker

KEY = "test-key-fuzz-0123456789"
MAX_EXAMPLES = 40

TENANTS = f"""
[tenants.fuzz]
api_keys = ["{hash_key(KEY)}"]
max_concurrent = 64
executions_per_minute = 100000
webhook_secret = "whsec_fuzz_0123456789abcdef"

[tenants.fuzz.max_limits]
timeout = 2
memory = "128m"
cpus = 0.5
pids = 64
disk = "16m"
output_bytes = "64k"
"""


@pytest.fixture(scope="module")
def fuzz_server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tenants = write_tenants(tmp_path_factory.mktemp("fuzz"), TENANTS)
    s = server_settings(tenants, max_concurrent=2, max_queue=256, queue_timeout=120, max_body_bytes=256 << 10)
    with live_server(engine, s) as srv:
        yield srv


OPERATIONS = [
    ("POST", "/v1/execute"),
    ("POST", "/execute"),
    ("POST", "/v1/executions"),
    ("GET", "/v1/executions/{execution_id}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


# schemathesis' own pytest plugin (from_fixture) does not work with pytest 9, so drive hypothesis directly.
CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in schemathesis.GenerationMode
    # Operations without any input have no negative examples.
    if mode is schemathesis.GenerationMode.POSITIVE or method == "POST" or "{" in path
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_api_never_answers_5xx(
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
