"""Per-call files in, ``collect`` out and streamed output of session calls (library, real Docker Engine)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox import InvalidRequestError, SessionResult, Sessions
from execbox.engine.base import Engine
from execbox.state.sqlite import SQLiteStateStore

from .test_sessions import sessions_over

pytestmark = pytest.mark.docker


@pytest.fixture
def sessions(engine: Engine, tmp_path: Path) -> Iterator[Sessions]:
    store = SQLiteStateStore(tmp_path / "sessions.db")
    try:
        with sessions_over(engine, store, reap_interval=0.2) as s:
            yield s
    finally:
        store.close()


@pytest.mark.parametrize("language", ["python", "javascript", "bash"])
def test_files_in_stay_and_collect_returns_them(sessions: Sessions, language: str) -> None:
    s = sessions.create("u1", language)
    code = {
        "python": "import os\nopen('out/b.txt', 'w').write(open('in/a.txt').read().upper())",
        "javascript": "const fs = require('fs');\n"
        "fs.writeFileSync('out/b.txt', fs.readFileSync('in/a.txt', 'utf8').toUpperCase())",
        "bash": "tr a-z A-Z < in/a.txt > out/b.txt",
    }[language]
    first = sessions.execute(
        s.id, code, files={"in/a.txt": "hello", "out/.keep": b""}, collect=["out/*.txt", "nothing/*"]
    )
    assert first.exit_code == 0, first.stderr
    assert first.files == {"out/b.txt": b"HELLO"} and not first.files_truncated
    # Files written by a call stay for the next ones (the session's /work is its own).
    again = sessions.execute(s.id, None, collect=["**/*.txt"])
    assert again.files == {"in/a.txt": b"hello", "out/b.txt": b"HELLO"} and again.exit_code == 0


def test_a_files_only_call_runs_nothing_and_keeps_the_repl(sessions: Sessions) -> None:
    s = sessions.create("u1", "python")
    sessions.execute(s.id, "x = 41")
    put = sessions.execute(s.id, None, files={"data.bin": bytes(range(256))})
    assert (put.exit_code, put.stdout, put.stderr, put.files) == (0, "", "", {})
    got = sessions.execute(s.id, "print(x + 1, len(open('data.bin', 'rb').read()))")
    assert got.stdout == "42 256\n" and not got.repl_reset


def test_collect_is_capped_by_output_bytes(sessions: Sessions) -> None:
    s = sessions.create("u1", "python", limits={"output_bytes": 1000})
    r = sessions.execute(s.id, "open('big', 'wb').write(b'x' * 5000)\nopen('small', 'wb').write(b'y')", collect=["*"])
    assert r.files == {"small": b"y"} and r.files_truncated


def test_a_file_that_cannot_be_written_is_an_error_on_files_and_the_session_lives(sessions: Sessions) -> None:
    s = sessions.create("u1", "python")
    sessions.execute(s.id, "import os\nos.makedirs('taken/dir')\ny = 1")
    with pytest.raises(InvalidRequestError) as info:
        sessions.execute(s.id, "print('never')", files={"taken/dir": "a directory is in the way"})
    assert info.value.field == "files"
    assert sessions.execute(s.id, "print(y)").stdout == "1\n"


@pytest.mark.parametrize(
    ("files", "collect", "field"),
    [
        ({"../escape": "x"}, None, "files"),
        ({"/etc/passwd": "x"}, None, "files"),
        (None, ["../*"], "collect"),
        (None, None, "code"),
    ],
)
def test_bad_paths_name_the_field(
    sessions: Sessions, files: dict[str, str] | None, collect: list[str] | None, field: str
) -> None:
    s = sessions.create("u1", "bash")
    with pytest.raises(InvalidRequestError) as info:
        sessions.execute(s.id, None, files=files, collect=collect)  # type: ignore[arg-type]
    assert info.value.field.split(".")[0] == field
    assert sessions.get(s.id).calls == 0


def test_output_is_streamed_while_the_call_runs(sessions: Sessions) -> None:
    s = sessions.create("u1", "python")
    first_chunk = threading.Event()
    chunks: list[tuple[str, bytes]] = []
    results: list[SessionResult] = []

    def on_output(stream: str, chunk: bytes) -> None:
        chunks.append((stream, chunk))
        if b"".join(c for _, c in chunks) == b"one\n":  # print() may write "one" and "\n" apart
            first_chunk.set()

    # The second line comes only once the test saw the first and let the program go on.
    code = "import os, time\nprint('one', flush=True)\nwhile not os.path.exists('go'): time.sleep(0.01)\nprint('two')"
    worker = threading.Thread(target=lambda: results.append(sessions.execute(s.id, code, on_output=on_output)))
    worker.start()
    try:
        assert first_chunk.wait(20), "no output arrived while the call ran"
        assert {name for name, _ in chunks} == {"stdout"} and not results
    finally:
        record = sessions.store.get_record("session", f"default/{s.id}")
        assert record is not None
        user = f"{record['uid']}:{record['uid']}"
        channel = sessions.engine.exec(record["container_id"], ("touch", "/work/go"), user)
        try:
            while channel.recv(10) is not None:  # until touch ends
                pass
        finally:
            channel.close()
        worker.join(30)
    assert results and results[0].stdout == "one\ntwo\n"
    assert b"".join(c for _, c in chunks) == b"one\ntwo\n"
