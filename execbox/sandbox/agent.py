"""execbox in-sandbox agent (standard library only; runs as the container's main process).

It serves exactly one execution and exits:

0. with ``--warm SPEC`` it first starts the language runtime (a waiting Python
   interpreter or Node process, see ``warm_*.py/js``) and reports ``K`` (ready)
   once it waits; without, it reports ``K`` at once;
1. reads one request, a JSON object on a single line, from stdin (the attached stream);
2. writes the request's files and the program into the working directory;
3. runs the program as a fresh process in its own session, with exactly the
   environment the request carries (the agent's own environment never reaches it);
4. forwards the program's stdout/stderr as frames on its own stdout, up to a byte
   cap per stream, and kills the program's whole session when it exits or when
   the time limit passes;
5. writes a final result frame and, once the host lets it go (a byte, or the end,
   on stdin) or the request's ``linger`` seconds passed, exits with the program's
   exit code. The engine's work on a container's end then happens after the host
   has taken the answer on, not on its caller's path (it measured ~1.5 ms there).

Frames: one type byte, a big-endian uint32 length, then the payload.
``K`` ready, ``O`` stdout bytes, ``E`` stderr bytes, ``F`` a collected file (path, NUL, content),
``R`` result (JSON), ``X`` agent error (UTF-8).

The agent is not trusted by the host: the host enforces its own time limit and
byte caps, and only the program's own run can be misreported by a program that
subverts its agent.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import select
import selectors
import signal
import struct
import subprocess
import sys
import time
from typing import Any

MAX_REQUEST_BYTES = 64 * 1024 * 1024
READ_CHUNK = 65536
PR_SET_DUMPABLE = 4


def _frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


class Out:
    """Writes frames to fd 1 (blocking: the host's reading speed is the backpressure)."""

    def __init__(self) -> None:
        self.fd = 1

    def send(self, kind: bytes, payload: bytes) -> None:
        view = memoryview(_frame(kind, payload))
        while view:
            n = os.write(self.fd, view)
            view = view[n:]


def _make_undumpable() -> None:
    # Same-UID code could otherwise open /proc/1/fd/* or read our memory.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except Exception:
        pass


def _oom_kills() -> int:
    for path, key in (
        ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill"),
        ("/sys/fs/cgroup/memory.events", "oom_kill"),
    ):
        try:
            with open(path) as fh:
                for line in fh:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value)
        except (OSError, ValueError):
            continue
    return 0


def _child_setup() -> None:
    # Make the program, not the agent, the OOM killer's first choice.
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")
    except OSError:
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _safe_path(workdir: str, rel: str) -> str:
    if not rel or rel.startswith("/") or "\0" in rel:
        raise ValueError(f"bad file path {rel!r}")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad file path {rel!r}")
    return os.path.join(workdir, *parts)


def put_files(workdir: str, files: dict[str, str]) -> None:
    """Write files (path -> base64 content) under workdir (session calls use this too)."""
    for rel, b64 in files.items():
        path = _safe_path(workdir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(b64))


def _write_files(workdir: str, req: dict[str, Any]) -> None:
    put_files(workdir, req.get("files") or {})
    path = _safe_path(workdir, req["filename"])
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(req["code"])


def _glob_re(pattern: str) -> Any:
    import re

    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def collect(workdir: str, patterns: list[str], cap: int, out: Out) -> bool:
    """Send regular files under workdir matching the patterns; True if some were left out.

    Symlinks are never followed (neither directories nor files), so nothing
    outside the working directory can be reached.
    """
    import stat

    regexes = [_glob_re(p) for p in patterns]
    budget, count, left_out = cap, 0, False
    for root, dirs, files in os.walk(workdir, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, workdir)
            if not any(r.match(rel) for r in regexes):
                continue
            try:
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # a symlink (ELOOP), a FIFO without writer, unreadable
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if st.st_size > budget or count >= 1000:
                    left_out = True
                    continue
                data = b""
                while len(data) < st.st_size:
                    chunk = os.read(fd, st.st_size - len(data))
                    if not chunk:
                        break
                    data += chunk
            finally:
                os.close(fd)
            budget -= len(data)
            count += 1
            out.send(b"F", rel.encode("utf-8", "surrogateescape") + b"\0" + data)
    return left_out


def exit_fd(pid: int) -> int:
    """An fd that becomes readable when child ``pid`` exits (close it after); the child is
    left for the caller to reap.

    A pidfd where the kernel has them; gVisor's kernel (runsc 20221219) has no
    pidfd_open, so there a thread waits with WNOWAIT and writes to a pipe.
    """
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
    import threading

    r, w = os.pipe()

    def wait() -> None:
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except OSError:  # reaped already (the caller killed it first)
            pass
        try:
            os.write(w, b"x")
        except OSError:  # the caller is done with it
            pass
        os.close(w)

    threading.Thread(target=wait, name=f"exit-{pid}", daemon=True).start()
    return r


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _spawn(argv: list[str], workdir: str, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> Any:
    return subprocess.Popen(
        argv,
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_child_setup,
        close_fds=True,
        pass_fds=pass_fds,
    )


class Warm:
    """A language runtime started before the request, waiting on a control pipe."""

    def __init__(self, spec: dict[str, Any]) -> None:
        ctrl_r, self.ctrl_w = os.pipe()
        self.ready_r, ready_w = os.pipe()
        argv = list(spec["argv"]) + [str(ctrl_r), str(ready_w)] + list(spec.get("prime") or [])
        self.proc = _spawn(argv, spec["workdir"], spec["env"], pass_fds=(ctrl_r, ready_w))
        os.close(ctrl_r)
        os.close(ready_w)

    def wait_ready(self, timeout: float) -> bool:
        sel = selectors.DefaultSelector()
        sel.register(self.ready_r, selectors.EVENT_READ)
        ok = bool(sel.select(timeout)) and os.read(self.ready_r, 1) == b"R"
        sel.close()
        os.close(self.ready_r)
        return ok

    def start(self, filename: str, env: dict[str, str], preload: str | None = None) -> Any:
        data = json.dumps({"file": filename, "env": env, "preload": preload}).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.ctrl_w, view) :]
        os.close(self.ctrl_w)
        return self.proc

    def discard(self) -> None:
        _kill_session(self.proc.pid)
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()
        try:
            os.close(self.ctrl_w)
        except OSError:
            pass


def run(req: dict[str, Any], out: Out, warm: Warm | None = None, oom_before: int | None = None) -> int:
    workdir = req.get("workdir") or "/work"
    os.makedirs(workdir, exist_ok=True)
    _write_files(workdir, req)
    cap = int(req.get("output_bytes", 1 << 20))
    timeout = float(req.get("timeout", 10.0))
    stdin_data = base64.b64decode(req["stdin"]) if req.get("stdin") else b""
    env = req.get("env") or {}

    if oom_before is None:
        oom_before = _oom_kills()
    started = time.monotonic()
    if warm is not None and req.get("warm"):
        proc = warm.start(req["filename"], env, req.get("preload"))
    else:
        if warm is not None:
            warm.discard()
        proc = _spawn(req["argv"], workdir, env)
    if not stdin_data:
        proc.stdin.close()
        proc.stdin = None
    deadline = started + timeout
    sel = selectors.DefaultSelector()
    kinds = {}
    sent = {b"O": 0, b"E": 0}
    truncated = {b"O": False, b"E": False}
    for pipe, kind in ((proc.stdout, b"O"), (proc.stderr, b"E")):
        assert pipe is not None
        os.set_blocking(pipe.fileno(), False)
        sel.register(pipe.fileno(), selectors.EVENT_READ, kind)
        kinds[pipe.fileno()] = kind
    pidfd = exit_fd(proc.pid)
    sel.register(pidfd, selectors.EVENT_READ, b"P")
    stdin_view = memoryview(stdin_data)
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, b"I")

    def forward(fd: int) -> bool:
        """Read once from fd; False on EOF or nothing available."""
        kind = kinds[fd]
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return False
        if not data:
            sel.unregister(fd)
            del kinds[fd]
            return False
        room = cap - sent[kind]
        if len(data) > room:
            truncated[kind] = True
            data = data[: max(room, 0)]
        if data:
            sent[kind] += len(data)
            out.send(kind, data)
        return True

    timed_out = False
    exited = False
    while not exited:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in sel.select(remaining):
            tag = key.data
            if tag == b"P":
                exited = True
            elif tag == b"I":
                assert proc.stdin is not None
                try:
                    n = os.write(proc.stdin.fileno(), stdin_view[:READ_CHUNK])
                    stdin_view = stdin_view[n:]
                except BlockingIOError:
                    n = 0
                except BrokenPipeError:
                    stdin_view = stdin_view[:0]
                if not stdin_view:
                    sel.unregister(proc.stdin.fileno())
                    proc.stdin.close()
            elif key.fd in kinds:
                forward(key.fd)
    # End the program's whole session first (background children included, as a
    # container's end would), then drain what was already written: bounded by
    # what is buffered, never by background processes holding the pipes open.
    _kill_session(proc.pid)
    for fd in list(kinds):
        for _ in range(1024):
            if fd not in kinds or not forward(fd):
                break
    status: int = proc.wait()
    duration = time.monotonic() - started
    os.close(pidfd)
    signum = -status if status < 0 else None
    exit_code = 128 + signum if signum else status
    files_truncated = collect(workdir, req["collect"], cap, out) if req.get("collect") else False
    result = {
        "exit_code": exit_code,
        "signal": signum,
        "timed_out": timed_out,
        "stdout_truncated": truncated[b"O"],
        "stderr_truncated": truncated[b"E"],
        "duration_ms": round(duration * 1000, 3),
        "oom_kills": max(_oom_kills() - oom_before, 0),
        "files_truncated": files_truncated,
    }
    out.send(b"R", json.dumps(result).encode())
    return exit_code


MAX_LINGER = 60.0


def main(argv: list[str]) -> int:
    _make_undumpable()
    out = Out()
    try:
        warm = None
        if argv[:1] == ["--warm"]:
            warm = Warm(json.loads(argv[1]))
            if not warm.wait_ready(30.0):
                warm.discard()
                warm = None
        oom_before = _oom_kills()  # read now, off the request's path
        out.send(b"K", b"")
        line = sys.stdin.buffer.readline(MAX_REQUEST_BYTES)
        if not line:
            return 125
        req = json.loads(line)
        code = run(req, out, warm, oom_before)
        linger = req.get("linger")
        if isinstance(linger, (int, float)) and 0 < linger <= MAX_LINGER:
            select.select([sys.stdin], [], [], linger)  # until the host lets it go
        return code
    except Exception as exc:  # report, never hang the host
        try:
            out.send(b"X", f"{type(exc).__name__}: {exc}".encode("utf-8", "replace"))
        except OSError:
            pass
        return 125


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
