"""Pure unit tests: no Docker needed."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import execbox
from execbox import ExecutionRequest, InvalidRequestError, Limits
from execbox.engine.base import Tmpfs
from execbox.exceptions import SandboxError
from execbox.hardening import sandbox_spec
from execbox.models import DEFAULT_MAX_LIMITS, parse_size
from execbox.protocol import FrameDecoder
from execbox.runtimes import RUNTIMES, get_runtime
from execbox.seccomp import ALLOWED, DENIED, profile

AGENT = Path(execbox.__file__).parent / "sandbox" / "agent.py"


def test_exported_members() -> None:
    for name in execbox.__all__:
        assert hasattr(execbox, name), name
    public = {n for n in dir(execbox) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(execbox.__all__)


@pytest.mark.parametrize(
    ("text", "value"),
    [("256m", 256 << 20), ("1g", 1 << 30), ("1GiB", 1 << 30), ("64k", 64 << 10), (1024, 1024), ("0.5m", 512 << 10)],
)
def test_parse_size(text: object, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["lots", "-1m", "", "1x", True, None, 1.5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_limits_merge_only_given_fields_and_check_maximum() -> None:
    base = Limits()
    merged = base.merged({"memory": "128m"})
    assert merged.memory == 128 << 20 and merged.pids == base.pids and merged.timeout == base.timeout
    assert base.merged(None) is base
    assert Limits(memory="8g").exceeding(DEFAULT_MAX_LIMITS) == ["memory"]
    assert Limits().exceeding(DEFAULT_MAX_LIMITS) == []


def test_request_validation_names_fields() -> None:
    with pytest.raises(ValueError, match="invalid environment variable name"):
        ExecutionRequest(code="x", env={"A B": "1"})
    with pytest.raises(ValueError, match="code is empty"):
        ExecutionRequest(code=" \n")
    with pytest.raises(ValueError):
        ExecutionRequest(code="x", unknown=1)  # type: ignore[call-arg]


def test_runtimes_table_and_aliases() -> None:
    assert {rt.name for rt in RUNTIMES} == {"javascript", "python", "bash"}
    assert get_runtime("JS").name == "javascript" and get_runtime("py").name == "python"
    with pytest.raises(InvalidRequestError) as info:
        get_runtime("cobol")
    assert info.value.field == "language" and "python" in info.value.message
    env = get_runtime("python").environment({"PATH": "/x", "K": "v"})
    assert env["PATH"] == "/x" and env["K"] == "v" and env["HOME"] == "/work"


def test_frame_decoder_handles_splits_and_rejects_garbage() -> None:
    frames = b"O" + struct.pack(">I", 3) + b"abc" + b"R" + struct.pack(">I", 2) + b"{}"
    dec = FrameDecoder(max_frame=100)
    got = []
    for i in range(len(frames)):
        got += list(dec.feed(frames[i : i + 1]))
    assert got == [(b"O", b"abc"), (b"R", b"{}")]
    with pytest.raises(SandboxError):
        list(FrameDecoder(100).feed(b"Z" + struct.pack(">I", 1) + b"x"))
    with pytest.raises(SandboxError):
        list(FrameDecoder(100).feed(b"O" + struct.pack(">I", 101)))


def test_seccomp_profile_is_an_allowlist_without_dangerous_calls() -> None:
    p = profile()
    assert p["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {n for rule in p["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for n in rule["names"]}
    for name in ("ptrace", "io_uring_setup", "unshare", "setns", "mount", "bpf", "keyctl", "userfaultfd", "clone3"):
        assert name not in allowed
    assert not set(ALLOWED) & set(DENIED)
    clone = next(r for r in p["syscalls"] if r["names"] == ["clone"])
    assert clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"


def test_sandbox_spec_is_hardened() -> None:
    spec = sandbox_spec(Limits(memory="128m", cpus=0.5, disk="32m", inodes=100), "img", 123456, {"l": "1"})
    assert spec.network is None and spec.read_only and spec.user == "123456:123456"
    assert spec.memory_bytes == 128 << 20 and spec.nano_cpus == 500_000_000 and spec.nproc == spec.pids
    assert spec.tmpfs["/work"] == Tmpfs(32 << 20, 100, 0o700, 123456)
    assert spec.tmpfs["/tmp"] == Tmpfs(32 << 20, 100, 0o1777, 123456)
    assert spec.seccomp["defaultAction"] == "SCMP_ACT_ERRNO"
    assert not spec.env


def _run_agent(tmp_path: Path, **req: object) -> tuple[list[tuple[bytes, bytes]], int]:
    request = {"argv": ["python3", "main.py"], "filename": "main.py", "workdir": str(tmp_path), "env": {}, **req}
    proc = subprocess.run([sys.executable, str(AGENT)], input=json.dumps(request).encode() + b"\n", capture_output=True)
    frames = list(FrameDecoder(1 << 24).feed(proc.stdout))
    assert frames[0] == (b"K", b"")  # ready before the request
    return frames[1:], proc.returncode


def test_agent_protocol_locally(tmp_path: Path) -> None:
    frames, rc = _run_agent(
        tmp_path,
        code="import os,sys; print(os.environ['K'], sys.stdin.read(), open('d/f').read()); sys.exit(3)",
        env={"K": "v", "PATH": "/usr/bin:/bin"},
        stdin=base64.b64encode(b"in").decode(),
        files={"d/f": base64.b64encode(b"file").decode()},
    )
    assert rc == 3
    assert frames[0] == (b"O", b"v in file\n")
    meta = json.loads(frames[-1][1])
    assert frames[-1][0] == b"R" and meta["exit_code"] == 3 and not meta["timed_out"]


def test_agent_caps_output_and_times_out(tmp_path: Path) -> None:
    frames, _ = _run_agent(
        tmp_path, code="import sys\nsys.stdout.write('x' * 100000)\nwhile True: pass", output_bytes=1000, timeout=0.5
    )
    out = b"".join(p for k, p in frames if k == b"O")
    meta = json.loads(frames[-1][1])
    assert len(out) == 1000 and meta["stdout_truncated"] and meta["timed_out"] and meta["signal"] == 9


def test_agent_refuses_path_traversal(tmp_path: Path) -> None:
    frames, rc = _run_agent(tmp_path / "w", code="print(1)", files={"../evil": base64.b64encode(b"x").decode()})
    assert rc == 125 and frames[0][0] == b"X" and b"bad file path" in frames[0][1]
    assert not (tmp_path / "evil").exists()


def test_capped_output_keeps_the_cap_and_streams_what_it_keeps() -> None:
    from execbox.protocol import CappedOutput

    seen: list[tuple[str, bytes]] = []
    out = CappedOutput(5, "stdout", lambda name, chunk: seen.append((name, chunk)))
    for chunk in (b"abc", b"defg", b"hij"):
        out.add(chunk)
    assert out.text() == "abcde" and out.truncated
    assert seen == [("stdout", b"abc"), ("stdout", b"de")]
