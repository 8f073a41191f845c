"""Isolation without an engine: the spec, the Docker runtimes it maps to, their registration by
setup, tenant policy, and bad values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from execbox.engine.base import ISOLATIONS
from execbox.engine.docker import RUNTIMES_FILE, runtime_of
from execbox.exceptions import ConfigurationError
from execbox.hardening import host_pids, sandbox_spec
from execbox.models import ExecutionRequest, Limits, invalid_request
from execbox.server.auth import Tenant, TenantPolicy, load_tenants_file

MERGE = Path(__file__).resolve().parents[1] / "scripts" / "docker-runtimes.py"


def spec(isolation: str, network: str | None = None, pids: int = 64) -> object:
    return sandbox_spec(Limits(pids=pids), "img", 100_001, {}, network=network, isolation=isolation)  # type: ignore[arg-type]


def test_gvisor_spec_keeps_every_limit_and_moves_the_process_cap_inside() -> None:
    runc, gvisor = spec("container"), spec("gvisor")
    assert (runc.pids, runc.nproc) == (64, 64)  # type: ignore[attr-defined]
    assert (gvisor.pids, gvisor.nproc) == (host_pids(64, "gvisor"), 64)  # type: ignore[attr-defined]
    assert host_pids(64, "gvisor") > 64 * 5  # gVisor's own threads and stubs count on the host (~5.7 per task)
    same = ("memory_bytes", "nano_cpus", "tmpfs", "read_only", "user", "network", "nofile")
    assert all(getattr(runc, f) == getattr(gvisor, f) for f in same)

    def clone3(s: object) -> dict[str, object]:
        return next(r for r in s.seccomp["syscalls"] if r["names"] == ["clone3"])  # type: ignore[attr-defined]

    # runc: ENOSYS from the filter; gVisor: through to its kernel, which answers ENOSYS itself.
    assert clone3(runc) == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    assert clone3(gvisor) == {"names": ["clone3"], "action": "SCMP_ACT_ALLOW"}
    strip = [r for r in gvisor.seccomp["syscalls"] if r["names"] != ["clone3"]]  # type: ignore[attr-defined]
    assert strip == [r for r in runc.seccomp["syscalls"] if r["names"] != ["clone3"]]  # type: ignore[attr-defined]


def test_a_pausable_gvisor_session_has_its_cpu_limit_enforced_over_a_longer_window() -> None:
    import docker

    from execbox.engine.docker import DockerEngine

    limits = Limits(cpus=0.5)
    pausable = sandbox_spec(limits, "img", 100_001, {}, isolation="gvisor", pausable=True)
    assert (pausable.nano_cpus, pausable.cpu_period_us) == (500_000_000, 1_000_000)
    runc_session = sandbox_spec(limits, "img", 100_001, {}, pausable=True)
    gvisor_run = sandbox_spec(limits, "img", 100_001, {}, isolation="gvisor")
    assert runc_session.cpu_period_us == gvisor_run.cpu_period_us == 0
    engine = DockerEngine(docker.APIClient(base_url="unix:///nonexistent.sock", version="1.41"))  # never connects
    host = engine._host_config(pausable)
    assert (host.get("NanoCpus"), host["CpuPeriod"], host["CpuQuota"]) == (None, 1_000_000, 500_000)  # the same share
    assert engine._host_config(gvisor_run)["NanoCpus"] == 500_000_000 and "CpuPeriod" not in engine._host_config(
        gvisor_run
    )


def test_docker_runtimes_of_each_isolation_are_the_registered_ones() -> None:
    registered = json.loads(RUNTIMES_FILE.read_text())
    assert runtime_of(spec("container")) is None and runtime_of(spec("container", "net")) is None  # type: ignore[arg-type]
    none, net = runtime_of(spec("gvisor")), runtime_of(spec("gvisor", "net"))  # type: ignore[arg-type]
    assert none in registered and net in registered and none != net
    assert registered[none]["runtimeArgs"] == ["--network=none", "--oci-seccomp"]
    assert registered[net]["runtimeArgs"] == ["--network=host", "--oci-seccomp"]
    assert all(r["path"] == "/usr/bin/runsc" for r in registered.values())


def _merge(daemon: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(MERGE), str(daemon), str(RUNTIMES_FILE)], capture_output=True, text=True)


def test_setup_merges_runtimes_into_daemon_json_without_clobbering(tmp_path: Path) -> None:
    daemon = tmp_path / "docker" / "daemon.json"
    assert _merge(daemon).stdout == "changed\n"  # no file: made
    daemon.write_text(json.dumps({"log-level": "warn", "runtimes": {"other": {"path": "/x"}}}))
    assert _merge(daemon).stdout == "changed\n"
    merged = json.loads(daemon.read_text())
    assert merged["log-level"] == "warn" and merged["runtimes"]["other"] == {"path": "/x"}
    assert {k: v for k, v in merged["runtimes"].items() if k != "other"} == json.loads(RUNTIMES_FILE.read_text())
    assert _merge(daemon).stdout == "unchanged\n"  # idempotent: no restart needed
    daemon.write_text("{not json")
    r = _merge(daemon)
    assert r.returncode == 1 and "not valid JSON" in r.stderr and daemon.read_text() == "{not json"  # never replaced


def test_tenant_policy_forces_or_allows_isolations() -> None:
    def tenant(isolation: object) -> Tenant:
        return Tenant("t", TenantPolicy(isolation=isolation), Limits())  # type: ignore[arg-type]

    forced, runc_only, both, any_ = (
        tenant("gvisor"),
        tenant(["container"]),
        tenant(["gvisor", "container"]),
        tenant(None),
    )
    assert forced.isolation_for(None, "container") == "gvisor"
    assert forced.isolation_for("gvisor", "container") == "gvisor"
    assert forced.isolation_for("container", "container") is None  # 403
    assert runc_only.isolation_for(None, "gvisor") == "container"  # the default is not allowed: the first allowed
    assert runc_only.isolation_for("gvisor", "container") is None
    assert both.isolation_for(None, "container") == "container"
    assert any_.isolation_for(None, "gvisor") == "gvisor" and any_.isolation_for("container", "gvisor") == "container"


def test_tenants_file_isolation_values(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.a]\nisolation = "gvisor"\n[tenants.b]\nisolation = ["container", "gvisor"]\n')
    policies = load_tenants_file(path)
    assert policies["a"].isolation == "gvisor" and policies["b"].isolation == ("container", "gvisor")
    path.write_text('[tenants.a]\nisolation = "kata"\n')
    with pytest.raises(ConfigurationError, match="isolation"):
        load_tenants_file(path)


@pytest.mark.parametrize("value", ["kata", "", "GVISOR", 1])
def test_bad_isolation_names_the_field(value: object) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        ExecutionRequest(code="1", isolation=value)  # type: ignore[arg-type]
    assert invalid_request(info.value).field == "isolation"
    assert ExecutionRequest(code="1").isolation is None and set(ISOLATIONS) == {"container", "gvisor"}


def test_restore_retries_only_the_known_containerd_races() -> None:
    from execbox.engine._checkpoints import transient_restore_error as _transient_restore_error

    assert _transient_restore_error("restore ab: id already in use")
    assert _transient_restore_error(
        "restore ab: failed to upload checkpoint to containerd: commit failed: content sha256:3c: already exists"
    )
    assert not _transient_restore_error("restore ab: container name already exists")
    assert not _transient_restore_error("restore ab: no such checkpoint")
