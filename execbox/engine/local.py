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
    def __init__(self, box: _Box) -> None:
        self.box = box
        self.items: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        self._open_streams = 2

    def _pump(self, pipe: IO[bytes], stream: int) -> None:
        fd = pipe.fileno()
        for chunk in iter(lambda: os.read(fd, 1 << 16), b""):
            self.items.put((stream, chunk))
        self.items.put(None)

    def send(self, data: bytes) -> None:
        # The agent request names the sandbox's working directory: point it at ours.
        req = json.loads(data)
        req["workdir"] = self.box.workdir
        proc = self.box.proc
        if proc is None or proc.stdin is None:
            raise BrokenPipeError("sandbox not started")
        proc.stdin.write(json.dumps(req).encode() + b"\n")
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
        return self.box.proc is not None and self.box.proc.poll() is None

    def close(self) -> None:
        pass


@dataclass
class _Box:
    id: str
    spec: SandboxSpec
    workdir: str
    proc: subprocess.Popen[bytes] | None = None
    channel: _PipeChannel | None = None
    killed: bool = False
    threads: list[threading.Thread] = field(default_factory=list)


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
        box.channel = _PipeChannel(box)
        return box.channel

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
            self._argv(box), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=box.workdir
        )
        if box.channel is not None:
            for pipe, stream in ((box.proc.stdout, STDOUT), (box.proc.stderr, STDERR)):
                assert pipe is not None
                t = threading.Thread(target=box.channel._pump, args=(pipe, stream), daemon=True)
                t.start()
                box.threads.append(t)

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
        if box.proc is not None:
            if box.proc.poll() is None:
                box.proc.kill()
            box.proc.wait()
            for t in box.threads:
                t.join(5)
            for f in (box.proc.stdin, box.proc.stdout, box.proc.stderr):
                if f is not None:
                    f.close()
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
