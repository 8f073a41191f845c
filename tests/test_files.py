"""Files in and out of a run (real sandboxes)."""

from __future__ import annotations

import pytest

from execbox import Executor, InvalidRequestError
from execbox.models import ExecutionRequest, ExecutionResult

pytestmark = pytest.mark.docker


def test_files_in_bytes_and_text(executor: Executor) -> None:
    r = executor.execute(
        "import hashlib; print(open('in/data.bin','rb').read().hex(), open('t.txt').read())",
        language="python",
        files={"in/data.bin": b"\x00\xff\x10", "t.txt": "héllo"},
    )
    assert r.stdout == "00ff10 héllo\n"


def test_collect_returns_matching_files(executor: Executor) -> None:
    code = """
import os
os.makedirs('out/deep', exist_ok=True)
open('a.png', 'wb').write(b'\\x89PNG')
open('b.txt', 'w').write('not collected')
open('out/x.csv', 'w').write('1,2')
open('out/deep/y.json', 'w').write('{}')
"""
    r = executor.execute(code, language="python", collect=["*.png", "out/**"])
    assert r.files == {"a.png": b"\x89PNG", "out/deep/y.json": b"{}", "out/x.csv": b"1,2"}
    assert not r.files_truncated


def test_collect_never_follows_symlinks_out(executor: Executor) -> None:
    code = """
ln -s /etc/passwd passwd.txt
ln -s /etc linked
mkfifo fifo.txt
echo mine > real.txt
"""
    r = executor.execute(code, language="bash", collect=["*.txt", "**"])
    assert r.files == {"real.txt": b"mine\n", "main.sh": code.encode()}


def test_collect_is_capped(executor: Executor) -> None:
    code = "open('big.bin','wb').write(b'x' * 200000); open('small.bin','wb').write(b'y')"
    r = executor.execute(code, language="python", collect=["*.bin"], limits={"output_bytes": 100000})
    assert r.files == {"small.bin": b"y"} and r.files_truncated


@pytest.mark.parametrize("pattern", ["../x", "/etc/*", "a/../../b", ""])
def test_hostile_collect_patterns_are_refused(executor: Executor, pattern: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        executor.execute("1", collect=[pattern])
    assert info.value.field.startswith("collect")


def test_files_are_base64_in_json() -> None:
    req = ExecutionRequest.model_validate({"code": "x", "files": {"a": "AP8="}})
    assert req.files == {"a": b"\x00\xff"}
    with pytest.raises(ValueError, match="base64"):
        ExecutionRequest.model_validate({"code": "x", "files": {"a": "not base64!"}})
    res = ExecutionResult(id="i", language="python", exit_code=0, duration_ms=1, files={"f": b"\x00"})
    assert res.model_dump(mode="json")["files"] == {"f": "AA=="}
