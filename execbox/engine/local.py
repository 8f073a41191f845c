"""A fake engine for unit tests: "sandboxes" are local agent processes. NO ISOLATION.

It speaks the same agent protocol as a real sandbox (the agent, the warm runtimes,
frames), so the executor's and the pool's logic can be tested in milliseconds
without a container engine. Never run untrusted code with it.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import IO

from ..exceptions import EngineError
from .base import STDERR, STDOUT, Channel, Engine, ResourceInfo, SandboxSpec, SandboxState

__all__ = ["LocalEngine"]

_SANDBOX_DIR = "/opt/execbox/"


class _PipeChannel(Channel):
    """A process's stdin, and its stdout/stderr as frames (pumped by threads)."""

    def __init__(self, box: _Box, sandbox_dir: str) -> None:
        self.box = box
        self.sandbox_dir = sandbox_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.items: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        self._open_streams = 2
        self.threads: list[threading.Thread] = []

    def pump(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        for pipe, stream in ((proc.stdout, STDOUT), (proc.stderr, STDERR)):
            assert pipe is not None
            t = threading.Thread(target=self._pump, args=(pipe, stream), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, pipe: IO[bytes], stream: int) -> None:
        fd = pipe.fileno()
        for chunk in iter(lambda: os.read(fd, 1 << 16), b""):
            self.items.put((stream, chunk))
        self.items.put(None)

    def send(self, data: bytes) -> None:
        # Messages name paths inside the sandbox (its working directory, the agent's helpers):
        # point them at ours.
        if data.strip():  # not a bare newline (that lets a lingering agent go)
            req = json.loads(data)
            if "workdir" in req:
                req["workdir"] = self.box.workdir
            if "repl_argv" in req:
                req["repl_argv"] = [a.replace(_SANDBOX_DIR, self.sandbox_dir) for a in req["repl_argv"]]
            data = json.dumps(req).encode() + b"\n"
        proc = self.proc
        if proc is None or proc.stdin is None:
            raise BrokenPipeError("sandbox not started")
        proc.stdin.write(data)
        proc.stdin.flush()

    def recv(self, timeout: float) -> tuple[int, bytes] | None:
        while True:
            try:
                item = self.items.get(timeout=max(timeout, 0.0))
            except queue.Empty:
                raise TimeoutError from None
            if item is not None:
                return item
            self._open_streams -= 1
            if self._open_streams == 0:
                return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        pass

    def reap(self) -> None:
        """Kill and wait for the process; close its pipes."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for t in self.threads:
            t.join(5)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


@dataclass
class _Box:
    id: str
    spec: SandboxSpec
    workdir: str
    proc: subprocess.Popen[bytes] | None = None
    channel: _PipeChannel | None = None
    killed: bool = False
    execs: list[_PipeChannel] = field(default_factory=list)


class LocalEngine(Engine):
    """Runs each sandbox's agent as a local process in a temporary directory."""

    name = "local"

    def __init__(self) -> None:
        self._boxes: dict[str, _Box] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.sandbox_dir = str(resources.files("execbox") / "sandbox") + "/"
        self.created = 0

    def ping(self) -> None:
        pass

    def image_exists(self, image: str) -> bool:
        return True

    def _box(self, sandbox_id: str) -> _Box:
        with self._lock:
            box = self._boxes.get(sandbox_id)
        if box is None:
            raise EngineError(f"No such container: {sandbox_id}")
        return box

    def create(self, spec: SandboxSpec) -> str:
        sid = f"local{next(self._ids):08d}"
        box = _Box(sid, spec, tempfile.mkdtemp(prefix="execbox-local-"))
        with self._lock:
            self._boxes[sid] = box
            self.created += 1
        return sid

    def attach(self, sandbox_id: str) -> Channel:
        box = self._box(sandbox_id)
        box.channel = _PipeChannel(box, self.sandbox_dir)
        return box.channel

    def _env(self, box: _Box) -> dict[str, str]:
        # Boxes share the host's network namespace: each session agent gets a socket name of its own.
        return {**os.environ, **box.spec.env, "EXECBOX_SESSION_SOCKET": f"execbox-session-{box.id}"}

    def exec(self, sandbox_id: str, argv: tuple[str, ...], user: str) -> Channel:
        box = self._box(sandbox_id)
        if box.proc is None or box.proc.poll() is not None:
            raise EngineError(f"container {sandbox_id} is not running")
        mapped = [a.replace(_SANDBOX_DIR, self.sandbox_dir) for a in argv]
        channel = _PipeChannel(box, self.sandbox_dir)
        proc = subprocess.Popen(
            [sys.executable if mapped[0] == "python3" else mapped[0], *mapped[1:]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=box.workdir,
            env=self._env(box),
        )
        channel.pump(proc)
        box.execs.append(channel)
        return channel

    def _argv(self, box: _Box) -> list[str]:
        out = []
        for arg in box.spec.command:
            if arg.startswith("{"):  # the warm runtime's spec: paths inside the sandbox
                warm = json.loads(arg)
                warm["argv"] = [a.replace(_SANDBOX_DIR, self.sandbox_dir) for a in warm["argv"]]
                warm["workdir"] = box.workdir
                arg = json.dumps(warm)
            out.append(arg.replace(_SANDBOX_DIR, self.sandbox_dir))
        return [sys.executable if out[0] == "python3" else out[0], *out[1:]]

    def start(self, sandbox_id: str) -> None:
        box = self._box(sandbox_id)
        box.proc = subprocess.Popen(
            self._argv(box),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=box.workdir,
            env=self._env(box),
        )
        if box.channel is None:  # nobody attached: what it writes goes nowhere
            box.channel = _PipeChannel(box, self.sandbox_dir)
        box.channel.pump(box.proc)

    def kill(self, sandbox_id: str) -> None:
        try:
            box = self._box(sandbox_id)
        except EngineError:
            return
        if box.proc is not None and box.proc.poll() is None:
            box.killed = True
            box.proc.kill()

    def wait(self, sandbox_id: str, timeout: float) -> SandboxState:
        box = self._box(sandbox_id)
        if box.proc is not None:
            try:
                box.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.state(sandbox_id)

    def state(self, sandbox_id: str) -> SandboxState:
        box = self._box(sandbox_id)
        code = box.proc.poll() if box.proc is not None else None
        return SandboxState(running=box.proc is not None and code is None, exit_code=code, oom_killed=False)

    def remove(self, sandbox_id: str) -> None:
        with self._lock:
            box = self._boxes.pop(sandbox_id, None)
        if box is None:
            return
        for channel in [*box.execs, *([box.channel] if box.channel is not None else [])]:
            channel.reap()
        shutil.rmtree(box.workdir, ignore_errors=True)

    def list_resources(self, label: str) -> list[ResourceInfo]:
        key, _, value = label.partition("=")
        with self._lock:
            boxes = list(self._boxes.values())
        return [
            ResourceInfo("container", b.id, dict(b.spec.labels))
            for b in boxes
            if key in b.spec.labels and (not value or b.spec.labels[key] == value)
        ]

    def remove_resource(self, resource: ResourceInfo) -> None:
        self.remove(resource.id)

    def live(self) -> list[str]:
        with self._lock:
            return list(self._boxes)

    def close(self) -> None:
        for sid in self.live():
            self.remove(sid)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"LocalEngine({len(self._boxes)} sandboxes)"
