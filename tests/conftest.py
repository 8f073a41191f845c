"""Shared fixtures. Docker tests run against the real Docker Engine; with
EXECBOX_REQUIRE_DOCKER=1 (set by scripts/test.sh, hence CI) a missing engine or
image is a failure, never a skip."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox import Executor
from execbox.engine.base import Engine
from execbox.labels import MANAGED_FILTER, OWNER, owner_id

REQUIRE_DOCKER = os.environ.get("EXECBOX_REQUIRE_DOCKER") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRE_DOCKER:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    from execbox.engine.docker import DockerEngine
    from execbox.exceptions import ExecboxError
    from execbox.images import default_image

    try:
        eng = DockerEngine.from_env()
        eng.ping()
    except ExecboxError as exc:
        _unavailable(f"Docker Engine not available: {exc}")
    if not eng.image_exists(default_image()):
        _unavailable(f"sandbox image {default_image()} not built (execbox images build)")
    yield eng
    eng.close()


def ours(engine: Engine) -> list[str]:
    """Containers created by this test process that still exist."""
    return [
        r.id
        for r in engine.list_resources(MANAGED_FILTER)
        if r.kind == "container" and r.labels.get(OWNER) == owner_id()
    ]


def busy(ex: Executor) -> set[str]:
    """Sandboxes handed out for a run and not yet removed (pooled, waiting ones excluded)."""
    return {sb.id for sb in ex.factory.live() if sb.leased}


@pytest.fixture(scope="module")
def isolation() -> str:
    """The isolation of ``executor``: ``container`` here; every one in modules that import
    ``tests.isolations.every_isolation``."""
    return "container"


@pytest.fixture(params=["pool", "no-pool"])
def executor(request: pytest.FixtureRequest, engine: Engine, isolation: str) -> Iterator[Executor]:
    """An executor, with and without the warm pool: both paths must behave the same.

    After the test, nothing it created may remain (and anything left is removed).
    """
    ex = Executor(engine=engine, pool=request.param == "pool", isolation=isolation)
    yield ex
    ex.close()
    left = ours(engine)
    for cid in left:
        engine.remove(cid)
    assert not left, f"test leaked {len(left)} containers"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis on loopback: EXECBOX_TEST_REDIS_URL (scripts/test.sh starts one), or a private one."""
    import shutil
    import socket
    import subprocess
    import time

    url = os.environ.get("EXECBOX_TEST_REDIS_URL")
    if url:
        yield url
        return
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait()


@pytest.fixture
def vex(engine: Engine, tmp_path: Path) -> Iterator[Executor]:
    """An executor with per-user volumes of its own (a tenant of its own); every volume and container removed after."""
    ex = Executor(engine=engine, pool=False, data_dir=str(tmp_path / "data"), volume_quota=16 << 20)
    ex._test_tenant = "t" + uuid.uuid4().hex[:8]  # type: ignore[attr-defined]
    yield ex
    ex.close()
    vols = ex.volumes
    for img in (vols.root / "images").glob("*.ext4"):
        os.utime(img, (0, 0))
    vols.expire(0)
    assert list((vols.root / "images").glob("*.ext4")) == []
    assert ours(engine) == []
