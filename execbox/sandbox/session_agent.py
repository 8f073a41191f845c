"""execbox session agent (standard library only): the main process of a session's container.

Where ``agent.py`` serves one execution and exits, this agent serves calls, one at a
time, for the whole life of a session:

0. it binds the abstract Unix socket ``@execbox-session``, reports ``K`` (alive) on
   stdout and reads one ``init`` line from stdin (the attach stream of the host that
   created the session): the session's token, its runtime, whether it is a REPL, the
   environment of every call and files to write first (egress: CA, preloads);
1. in REPL mode it starts a worker (``session_repl.py`` or ``session_repl.js``) that keeps
   the interpreter's globals between calls, and reports ``R`` {"ok": true} once it waits;
2. it serves requests, one JSON line each, from every authenticated connection: the
   attach stream of the creating host, and connections to the socket, which a host that
   adopts the session makes with ``docker exec ... session_agent.py --relay`` (Docker
   closes a container's stdin for good when its first attached client goes away, so a
   second host cannot re-attach to it). A socket connection must first send
   {"op": "hello", "token": ...}: same-UID code of the session could connect too;
3. it answers each request on the connection it came from, with ``agent.py``'s frames:
   ``O``/``E`` output of this call only, then ``R`` (JSON) or ``X`` (agent error).

Requests: {"op": "exec", "id", "code", "env", "timeout", "output_bytes", "files", "collect"},
{"op": "ping"} and {"op": "pause"} (see below). ``files`` (path -> base64) are written under
the working directory before the code runs; files matching ``collect`` are sent as ``F``
frames after it, before ``R`` (as ``agent.py`` does for a run). Without ``code`` a call
only writes and collects files.

REPL calls: the code goes to the worker over a pipe; the worker runs it in its
persistent namespace and reports the call's status on another pipe. At the timeout
the worker gets SIGINT (the call is interrupted, its globals survive); if it has not
answered ``interrupt_grace`` seconds later, its process group is killed and a new
worker started (``reset``: variables are gone, files in /work stay). Output the
worker writes between calls (background threads, timers) belongs to no call and is
discarded. Non-REPL calls run exactly as ``agent.py`` runs a program (``agent.run``):
a fresh process per call, killed with its whole process group at the end.

Pause: {"op": "pause"} announces a checkpoint of the sandbox. Whoever restores it attaches
a new stream first, and after the restore fds 0/1 are that stream (gVisor hands the new
container's stdio to the restored processes): it says hello (also where stdin was an
authenticated stream before) and is served, and no ``docker exec`` of a relay is needed.
But an epoll registration made before the checkpoint does not fire for the restored stdin
(runsc 20221219, measured: the data is there for a read; a fresh registration reports
it). The selector is made anew on every turn, so from the announcement on the agent turns
every ``RESTORE_POLL`` seconds; and a stdin that had ended (its host left: Docker closes it
with the first attached stream) is read without blocking on each turn, a new connection
once a restore's stream speaks. Polling stops at the next hello (the restore's stream, or
a relay after a pause that did not happen) or after ``RESTORE_POLLS`` turns.

The host does not trust this agent: it applies its own deadline and output caps.
"""

from __future__ import annotations

import hmac
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import agent  # noqa: E402  (the one-shot agent: framing, OOM counter, run() for non-REPL calls)
from session_parts import MAX_LINE, READ_CHUNK, Conn, Worker  # noqa: E402

# Abstract (per network namespace: each sandbox has its own). The fake local engine, whose
# "sandboxes" share the host's, names one per sandbox in EXECBOX_SESSION_SOCKET.
SOCKET_NAME = "\0" + os.environ.get("EXECBOX_SESSION_SOCKET", "execbox-session")
HELLO_TIMEOUT = 10.0
RESTORE_POLL = 0.002  # seconds between reads of stdin while a restore is awaited
RESTORE_POLLS = 30000  # at most this many (a minute awake), then only a relay comes in
SEND_TIMEOUT = 30.0
WORKER_READY_TIMEOUT = 30.0
_LEN = struct.Struct(">I")


class Session:
    def __init__(self, init: dict[str, Any]) -> None:
        self.token = str(init["token"]).encode()
        self.repl = bool(init.get("repl"))
        self.workdir = init.get("workdir") or "/work"
        self.env: dict[str, str] = dict(init.get("env") or {})
        self.run_spec: dict[str, Any] = init.get("run") or {}
        self.repl_argv: list[str] = list(init.get("repl_argv") or [])
        self.grace = float(init.get("interrupt_grace", 1.0))
        self.worker: Worker | None = None
        self.reset_pending = False
        self.calls = 0
        self.restore_polls = 0  # > 0: paused by the host; stdin is polled (see the module's doc)
        os.makedirs(self.workdir, exist_ok=True)
        # The session's own files (egress: the proxy's CA, the runtimes' preloads), path -> base64.
        agent.put_files(self.workdir, init.get("files") or {})

    # -- the REPL worker ------------------------------------------------------------------

    def start_worker(self) -> Worker:
        worker = Worker(self.repl_argv, self.env, self.workdir)
        if not worker.wait_ready(WORKER_READY_TIMEOUT):
            detail = b"".join(worker.drain(worker.err_fd)).decode("utf-8", "replace")[-2000:]
            worker.kill()
            worker.close()
            raise RuntimeError(f"the REPL worker did not start: {detail.strip()}")
        self.worker = worker
        return worker

    def end_worker(self) -> int:
        worker, self.worker = self.worker, None
        if worker is None:
            return 0
        status: int = worker.kill()
        worker.close()
        return status

    def worker_died(self) -> None:
        """Between calls: the worker exited (os._exit in a thread, a signal)."""
        if self.worker is None or self.worker.proc.poll() is None:
            return  # a stale event: this worker is alive
        self.end_worker()
        self.reset_pending = True

    def background_fds(self) -> dict[int, str]:
        w = self.worker
        if w is None:
            return {}
        fds = {w.out_fd: "discard", w.err_fd: "discard", w.pidfd: "worker", w.status_r: "discard-status"}
        return {fd: what for fd, what in fds.items() if fd not in w.eof}

    # -- calls ----------------------------------------------------------------------------

    def call(self, req: dict[str, Any], conn: Conn) -> None:
        self.calls += 1
        files, patterns = req.get("files") or {}, req.get("collect") or []
        try:
            agent.put_files(self.workdir, files)
        except (OSError, ValueError) as exc:
            # Nothing ran: the host reports it as a bad ``files`` value, the session lives on.
            conn.reply({"files_error": f"{type(exc).__name__}: {exc}"})
            return
        if req.get("code") is None:  # files in and/or out, no program
            cap = int(req.get("output_bytes", 1 << 20))
            left_out = agent.collect(self.workdir, patterns, cap, conn) if patterns else False
            conn.reply({"exit_code": 0, "signal": None, "duration_ms": 0.0, "files_truncated": left_out})
            return
        if not self.repl:
            run_req = {
                "argv": self.run_spec["argv"],
                "filename": self.run_spec["filename"],
                "code": req["code"],
                "env": {**self.env, **(req.get("env") or {})},
                "workdir": self.workdir,
                "timeout": req.get("timeout", 10.0),
                "output_bytes": req.get("output_bytes", 1 << 20),
                "collect": patterns,
            }
            agent.run(run_req, conn)  # Conn has the send() of agent.Out; files are written above
            return
        self._repl_call(req, conn)

    def _repl_call(self, req: dict[str, Any], conn: Conn) -> None:
        reset_before = self.reset_pending
        self.reset_pending = False
        w = self.worker
        if w is None:
            w = self.start_worker()
            reset_before = True
        for fd in (w.out_fd, w.err_fd):
            w.drain(fd)  # output of no call (background threads, timers): not this call's
        w.statuses()
        cap = int(req.get("output_bytes", 1 << 20))
        timeout = float(req.get("timeout", 10.0))
        call_id = str(req.get("id", self.calls))
        body = json.dumps({"id": call_id, "code": req["code"], "env": req.get("env") or {}}).encode()
        pending = memoryview(_LEN.pack(len(body)) + body)
        sent = {b"O": 0, b"E": 0}
        truncated = {b"O": False, b"E": False}

        def forward(kind: bytes, chunks: list[bytes]) -> None:
            for data in chunks:
                room = cap - sent[kind]
                if len(data) > room:
                    truncated[kind] = True
                    data = data[: max(room, 0)]
                if data:
                    sent[kind] += len(data)
                    conn.send(kind, data)

        sel = selectors.DefaultSelector()
        sel.register(w.out_fd, selectors.EVENT_READ, b"O")
        sel.register(w.err_fd, selectors.EVENT_READ, b"E")
        sel.register(w.status_r, selectors.EVENT_READ, b"S")
        sel.register(w.pidfd, selectors.EVENT_READ, b"P")
        sel.register(w.ctrl_w, selectors.EVENT_WRITE, b"C")
        oom_before = agent._oom_kills()
        started = time.monotonic()
        deadline = started + timeout
        status: dict[str, Any] | None = None
        died = interrupted = killed = False
        while status is None and not died:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if interrupted:
                    killed = True
                    break
                # Interrupt the call (KeyboardInterrupt / vm's breakOnSigint); globals survive.
                interrupted = True
                try:
                    os.kill(w.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + self.grace
                continue
            for key, _ in sel.select(remaining):
                tag = key.data
                if tag == b"C":
                    try:
                        pending = pending[os.write(w.ctrl_w, pending) :]
                    except BlockingIOError:
                        pass
                    except OSError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(w.ctrl_w)
                elif tag in (b"O", b"E"):
                    forward(tag, w.drain(key.fd, limit=1))
                elif tag == b"S":
                    for st in w.statuses():
                        if str(st.get("id")) == call_id:
                            status = st
                    if status is None and w.status_r in w.eof:
                        died = True  # it can no longer report this call
                elif tag == b"P":
                    died = True
                if key.fd in w.eof and key.fd in sel.get_map():
                    sel.unregister(key.fd)
        sel.close()
        duration = time.monotonic() - started
        signum: int | None = None
        reset = False
        if status is not None:
            # Written before the status line, so already in the pipes.
            forward(b"O", w.drain(w.out_fd))
            forward(b"E", w.drain(w.err_fd))
            exit_code = int(status.get("exit_code", 0))
            if interrupted or status.get("interrupted"):
                interrupted, signum = True, signal.SIGINT
        else:
            wait_status = w.kill()  # died by itself, or killed past the grace
            forward(b"O", w.drain(w.out_fd))
            forward(b"E", w.drain(w.err_fd))
            self.end_worker()
            reset = True
            if killed:
                exit_code, signum = 128 + signal.SIGKILL, signal.SIGKILL
            elif wait_status < 0:
                signum = -wait_status
                exit_code = 128 + signum
            else:
                exit_code = wait_status
        result = {
            "exit_code": exit_code,
            "signal": signum,
            "timed_out": interrupted or killed,
            "stdout_truncated": truncated[b"O"],
            "stderr_truncated": truncated[b"E"],
            "duration_ms": round(duration * 1000, 3),
            "oom_kills": max(agent._oom_kills() - oom_before, 0),
            "reset": reset,
            "reset_before": reset_before,
        }
        patterns = req.get("collect") or []
        result["files_truncated"] = agent.collect(self.workdir, patterns, cap, conn) if patterns else False
        conn.reply(result)
        if self.worker is None:
            # Ready for the next call; the host has its answer already.
            try:
                self.start_worker()
            except Exception as exc:
                self.reset_pending = True
                sys.stderr.write(f"session agent: {exc}\n")


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(SOCKET_NAME)
    sock.listen(8)
    return sock


def _handle(session: Session, conn: Conn, line: bytes) -> None:
    try:
        req = json.loads(line)
        op = req.get("op") if isinstance(req, dict) else None
    except ValueError:
        op = req = None
    if op == "hello" or not conn.authed:  # also on stdin after a restore: a new stream behind the same fd
        token = str(req.get("token", "")).encode() if isinstance(req, dict) else b""
        if op == "hello" and hmac.compare_digest(token, session.token):
            conn.authed = True
            session.restore_polls = 0  # a host is back: the restore's stream, or a relay (no restore)
            conn.reply({"ok": True, "calls": session.calls})
        else:
            conn.error("unauthenticated")
            conn.close()
        return
    assert isinstance(req, dict)
    if op == "exec":
        try:
            session.call(req, conn)
        except Exception as exc:  # report, never hang the host
            conn.error(f"{type(exc).__name__}: {exc}")
    elif op == "ping":
        conn.reply({"ok": True, "calls": session.calls, "repl": session.repl})
    elif op == "pause":
        os.set_blocking(0, False)  # polled, and nothing else reads it
        session.restore_polls = RESTORE_POLLS
        conn.reply({"ok": True})
    else:
        conn.error(f"unknown request {op!r}")


def serve(session: Session, listener: socket.socket, stdin_conn: Conn) -> None:
    conns: dict[int, Conn] = {stdin_conn.rfd: stdin_conn}
    while True:
        sel = selectors.DefaultSelector()  # made anew each time: see the module's doc (Pause)
        sel.register(listener.fileno(), selectors.EVENT_READ, "listen")
        for fd in conns:
            sel.register(fd, selectors.EVENT_READ, "conn")
        for fd, what in session.background_fds().items():
            sel.register(fd, selectors.EVENT_READ, what)
        waiting = [c.opened + HELLO_TIMEOUT for c in conns.values() if not c.authed]
        timeout = max(min(waiting) - time.monotonic(), 0.0) if waiting else None
        if session.restore_polls:
            timeout = RESTORE_POLL if timeout is None else min(timeout, RESTORE_POLL)
        events = sel.select(timeout)
        sel.close()
        if session.restore_polls:
            session.restore_polls -= 1
            data = _restored_stdin() if 0 not in conns else b""
            if data:  # stdin had ended (its host left): this is the stream of whoever restored the sandbox
                conns[0] = Conn(0, 1)
                _feed(session, conns[0], data)
        for key, _ in events:
            if key.data == "listen":
                sock, _ = listener.accept()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT), 0))
                conns[sock.fileno()] = Conn(sock.fileno(), sock.fileno(), sock)
            elif key.data == "conn":
                conn = conns.get(key.fd)
                if conn is None or conn.dead:
                    continue
                try:
                    if conn.sock is not None:
                        data = conn.sock.recv(READ_CHUNK, socket.MSG_DONTWAIT)
                    else:
                        data = os.read(key.fd, READ_CHUNK)
                except BlockingIOError:
                    continue  # a stale event (the fd was reused during a call)
                except OSError:
                    data = b""
                if not data:
                    conn.dead = True
                    continue
                _feed(session, conn, data)
            elif key.data == "worker":
                if session.worker is not None and key.fd == session.worker.pidfd:
                    session.worker_died()
            elif session.worker is not None:
                w = session.worker
                if key.fd == w.status_r:
                    w.statuses()
                    if w.status_r in w.eof:  # it can no longer report a call: as good as dead
                        session.end_worker()
                        session.reset_pending = True
                elif key.fd in (w.out_fd, w.err_fd):
                    w.drain(key.fd, limit=16)
        now = time.monotonic()
        for fd, conn in list(conns.items()):
            if not conn.authed and now - conn.opened > HELLO_TIMEOUT:
                conn.close()
            if conn.dead:
                if conn.sock is not None:
                    conn.sock.close()
                del conns[fd]


def _feed(session: Session, conn: Conn, data: bytes) -> None:
    conn.buf += data
    for line in conn.lines():
        if conn.dead:
            break
        _handle(session, conn, line)


def _restored_stdin() -> bytes:
    """One read of an ended stdin while a restore is awaited: what a new stream sent, or b""."""
    try:
        return os.read(0, READ_CHUNK)  # b"": the end of the stream before the checkpoint
    except OSError:  # BlockingIOError: nothing yet
        return b""


def relay() -> int:
    """``--relay``: join the attached stdin/stdout (a ``docker exec`` stream) to the agent's socket."""
    agent._make_undumpable()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(SOCKET_NAME)
    except OSError as exc:
        sys.stderr.write(f"session relay: the session agent does not answer: {exc}\n")
        return 1
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "in")
    sel.register(sock.fileno(), selectors.EVENT_READ, "sock")
    while True:
        for key, _ in sel.select():
            if key.data == "in":
                data = os.read(0, READ_CHUNK)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    sel.unregister(0)
                else:
                    sock.sendall(data)
            else:
                data = sock.recv(READ_CHUNK)
                if not data:
                    return 0
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view) :]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--relay"]:
        return relay()
    agent._make_undumpable()
    stdin_conn = Conn(0, 1, authed=True)
    try:
        listener = _listener()
        stdin_conn.send(b"K", b"")
        # Read with os.read, not sys.stdin: nothing may stay in a buffer that serve() does not see.
        while b"\n" not in stdin_conn.buf:
            data = os.read(0, READ_CHUNK)
            if not data or len(stdin_conn.buf) > MAX_LINE:
                return 125
            stdin_conn.buf += data
        end = stdin_conn.buf.index(b"\n")
        init = json.loads(bytes(stdin_conn.buf[:end]))
        del stdin_conn.buf[: end + 1]  # the host waits for the answer before it sends more
        session = Session(init)
        if session.repl:
            session.start_worker()
        stdin_conn.reply({"ok": True, "repl": session.repl, "pid": os.getpid()})
    except Exception as exc:
        stdin_conn.error(f"{type(exc).__name__}: {exc}")
        return 125
    serve(session, listener, stdin_conn)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
