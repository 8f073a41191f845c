"""Resume time of gVisor sessions under two CPU limit windows, alternating: the p50 and mean
of each, and how long the sandbox's cgroup was throttled around each resume.

    .venv/bin/python bench/pause_window.py [--language javascript] [--windows 300,1000]
                                           [--rounds 6] [--cycles 3] [--cpus 1]

Each round makes one session per window (``CpuPeriod`` in ms, the quota scaled to the same
share), gives it ~50 MB of state, and pauses and resumes it ``--cycles`` times. Throttled
time comes from the container's ``cpu.stat`` (cgroup v1 ``cpu`` controller on this host;
"n/a" where it cannot be read). Real runsc checkpoints through the local Docker Engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import docker

from execbox import Sessions, hardening
from execbox.sessions import RECORD_KIND
from execbox.state.sqlite import SQLiteStateStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pause import CHECK, STATE  # noqa: E402  (the same state and check as bench/pause.py)

CGROUP = Path("/sys/fs/cgroup/cpu/docker")


def throttled_ms(full_id: str) -> float | None:
    try:
        text = (CGROUP / full_id / "cpu.stat").read_text()
    except OSError:
        return None
    stats = dict(line.split() for line in text.splitlines() if line.strip())
    return int(stats["throttled_time"]) / 1e6


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--language", default="javascript", choices=sorted(STATE))
    p.add_argument("--windows", default="300,1000", help="CPU limit windows in ms, comma-separated")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--cpus", type=float, default=1.0)
    args = p.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    if any(not 1 <= w <= 1000 for w in windows):
        p.error("--windows: each between 1 and 1000 ms (the CFS period's range)")
    rounds, cycles = min(max(args.rounds, 1), 20), min(max(args.cycles, 1), 10)
    api = docker.APIClient(version="1.41")
    resumes: dict[int, list[float]] = {w: [] for w in windows}
    throttled: dict[int, list[float]] = {w: [] for w in windows}
    store = SQLiteStateStore(Path(tempfile.mkdtemp(prefix="execbox-bench-window-")) / "s.db")
    with Sessions(None, store, start_reaper=False, isolation="gvisor", max_per_user=20) as sessions:
        for _ in range(rounds):
            for window in windows:
                hardening.PAUSABLE_CPU_PERIOD_US = window * 1000  # read when the session's sandbox is made
                s = sessions.create("bench", args.language, limits={"cpus": args.cpus})
                try:
                    sessions.execute(s.id, STATE[args.language], timeout=30)
                    cid = str(store.get_record(RECORD_KIND, f"default/{s.id}")["container_id"])
                    full = str(api.inspect_container(cid)["Id"])
                    for _ in range(cycles):
                        before = throttled_ms(full)
                        sessions.pause(s.id)
                        r = sessions.execute(s.id, CHECK[args.language])
                        assert r.resumed and r.stdout.startswith("42 "), (r.stdout, r.stderr)
                        resumes[window].append(float(r.resume_ms or 0))
                        after = throttled_ms(full)
                        if after is not None:  # a cgroup made anew by the restore starts from 0
                            fresh = before is None or after < before
                            throttled[window].append(after if fresh else after - (before or 0.0))
                finally:
                    sessions.delete(s.id)
    store.close()
    base = statistics.median(resumes[windows[0]])
    for window in windows:
        values, thr = resumes[window], throttled[window]
        shown = f"throttled p50 {statistics.median(thr):4.0f} ms, max {max(thr):4.0f} ms" if thr else "throttled n/a"
        print(
            f"{args.language:<10} window {window:4d} ms   resume p50 {statistics.median(values):4.0f} ms"
            f"  mean {statistics.mean(values):4.0f} ms  ({statistics.median(values) / base:4.2f}x)   {shown}"
            f"   (n={len(values)}, cpus={args.cpus})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
