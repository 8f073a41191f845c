"""Pause and resume of gVisor sessions holding ~50 MB of state: p50 of each, and the host memory
the paused session stops holding (its sandbox's resident memory before the pause).

    .venv/bin/python bench/pause.py [--sessions 5]

Each session is paused once (this engine restores a session's checkpoint once: see
execbox/sessions/pausing.py). Real runsc checkpoints through the local Docker Engine.
"""

from __future__ import annotations

import argparse
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


def rss_mib(cid: str) -> float:
    out = subprocess.run(
        ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", cid], capture_output=True, text=True
    )
    used = out.stdout.split("/")[0].strip()
    value = float(used.rstrip("KMGiB").strip() or 0)
    return value / 1024 if used.endswith("KiB") else value * 1024 if used.endswith("GiB") else value


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sessions", type=int, default=5)
    n = min(p.parse_args().sessions, 20)
    store = SQLiteStateStore(Path(tempfile.mkdtemp(prefix="execbox-bench-pause-")) / "s.db")
    with Sessions(None, store, start_reaper=False, isolation="gvisor", max_per_user=20) as sessions:
        for language in ("python", "javascript"):
            pause, resume, held = [], [], []
            for _ in range(n):
                s = sessions.create("bench", language)
                sessions.execute(s.id, STATE[language], timeout=30)
                cid = str(store.get_record(RECORD_KIND, f"default/{s.id}")["container_id"])
                held.append(rss_mib(cid))
                t = time.perf_counter()
                sessions.pause(s.id)
                pause.append((time.perf_counter() - t) * 1000)
                r = sessions.execute(s.id, CHECK[language])
                assert r.resumed and r.stdout.startswith("42 "), (r.stdout, r.stderr)
                resume.append(float(r.resume_ms or 0))
                sessions.delete(s.id)
            med = statistics.median
            print(
                f"{language:<10} pause p50 {med(pause):6.0f} ms   resume p50 {med(resume):6.0f} ms   memory"
                f" released while paused (the sandbox's usage before) p50 {med(held):5.0f} MiB  (n={n})"
            )
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
