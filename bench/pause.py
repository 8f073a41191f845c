"""Pause and resume of gVisor sessions holding ~50 MB of state: p50 of each (resume split into
the engine's restore and the reconnection to the agent), the checkpoint's size on disk, and
the host memory the paused session stops holding (its sandbox's usage before the pause).

    .venv/bin/python bench/pause.py [--sessions 5] [--cycles 3] [--languages python,javascript] [--gap 0]

Each session is paused and resumed ``--cycles`` times (by its next call); a cycle that fails
is counted and its session replaced. Real runsc checkpoints through the local Docker Engine.
``--gap`` seconds pass between a pause and the call that resumes (default 0: at once).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from execbox import Sessions
from execbox.sessions import RECORD_KIND
from execbox.state.sqlite import SQLiteStateStore

STATE = {
    "python": "blob = bytearray(50 << 20)\nfor i in range(0, len(blob), 4096):\n    blob[i] = 1\nx = 41",
    "javascript": "globalThis.blob = Buffer.alloc(50 << 20, 1); globalThis.x = 41",
}
CHECK = {"python": "print(x + 1, len(blob))", "javascript": "console.log(x + 1, blob.length)"}


class Splits(logging.Handler):
    """The restore and reconnect times the sessions log for each resume."""

    def __init__(self) -> None:
        super().__init__()
        self.restore: list[float] = []
        self.reconnect: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("session %s resumed in") and isinstance(record.args, tuple):
            self.restore.append(float(record.args[2]))
            self.reconnect.append(float(record.args[3]))


def rss_mib(cid: str) -> float:
    out = subprocess.run(
        ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", cid], capture_output=True, text=True
    )
    used = out.stdout.split("/")[0].strip()
    value = float(used.rstrip("KMGiB").strip() or 0)
    return value / 1024 if used.endswith("KiB") else value * 1024 if used.endswith("GiB") else value


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sessions", type=int, default=5)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--languages", default="python,javascript")
    p.add_argument("--gap", type=float, default=0.0, help="seconds between a pause and the resuming call")
    args = p.parse_args()
    n, cycles = min(args.sessions, 20), max(args.cycles, 1)
    splits = Splits()
    log = logging.getLogger("execbox.sessions")
    log.addHandler(splits)
    log.setLevel(logging.INFO)
    store = SQLiteStateStore(Path(tempfile.mkdtemp(prefix="execbox-bench-pause-")) / "s.db")
    with Sessions(None, store, start_reaper=False, isolation="gvisor", max_per_user=20) as sessions:
        for language in args.languages.split(","):
            pause, resume, held, disk, failures = [], [], [], [], []
            splits.restore.clear()
            splits.reconnect.clear()
            for _ in range(n):
                s = sessions.create("bench", language)
                sessions.execute(s.id, STATE[language], timeout=30)
                cid = str(store.get_record(RECORD_KIND, f"default/{s.id}")["container_id"])
                held.append(rss_mib(cid))
                for cycle in range(cycles):
                    try:
                        t = time.perf_counter()
                        info = sessions.pause(s.id)
                        pause.append((time.perf_counter() - t) * 1000)
                        disk.append(info.checkpoint_bytes / (1 << 20))
                        time.sleep(min(max(args.gap, 0.0), 60.0))
                        r = sessions.execute(s.id, CHECK[language])
                        assert r.resumed and r.stdout.startswith("42 "), (r.stdout, r.stderr)
                        resume.append(float(r.resume_ms or 0))
                    except Exception as exc:  # counted: the point is how often it works
                        failures.append(f"cycle {cycle + 1}: {type(exc).__name__}: {exc}")
                        break
                try:
                    sessions.delete(s.id)
                except Exception as exc:
                    failures.append(f"delete: {exc}")
            worst = max(resume, default=float("nan"))
            print(
                f"{language:<10} pause p50 {med(pause):5.0f} ms   resume p50 {med(resume):5.0f} ms (restore"
                f" {med(splits.restore):4.0f} + reconnect {med(splits.reconnect):4.0f}), max {worst:5.0f} ms"
                f"   checkpoint p50 {med(disk):5.1f} MiB   memory released p50 {med(held):5.0f} MiB"
                f"   (n={n} sessions x {cycles} cycles, {len(resume)} resumes, {len(failures)} failures,"
                f" gap {args.gap:g} s)"
            )
            for failure in failures:
                print(f"    failure: {failure}")
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
