"""Where a container lifecycle's CPU goes: machine-wide CPU time per run, and the
shares of dockerd and containerd, for a plain docker-py run with default options,
the same with network none + no log driver, and an execbox run with the pool off.

    .venv/bin/python bench/lifecycle_cpu.py [--runs 30]

Other load on the machine adds to "machine"; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable

import docker

from execbox import Executor
from execbox.images import default_image

TICK = os.sysconf("SC_CLK_TCK")


def busy_ms() -> float:
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) * 1000 / TICK


def proc_ms(name: str) -> float:
    total = 0.0
    for pid in subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split():
        try:
            with open(f"/proc/{pid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) * 1000 / TICK  # incl. reaped children
        except OSError:
            pass
    return total


def measure(name: str, fn: Callable[[], object], runs: int) -> None:
    fn()  # warm-up
    b0, d0, c0 = busy_ms(), proc_ms("dockerd"), proc_ms("containerd")
    t0 = time.monotonic()
    for _ in range(runs):
        fn()
    wall = (time.monotonic() - t0) * 1000 / runs
    b, d, c = (busy_ms() - b0) / runs, (proc_ms("dockerd") - d0) / runs, (proc_ms("containerd") - c0) / runs
    print(
        f"  {name:<44} wall {wall:6.1f} ms  machine CPU {b:6.1f} ms  dockerd {d:5.1f}  containerd+shims {c:5.1f}"
        f"  rest {b - d - c:5.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    api = docker.from_env().api
    image = default_image()
    cmd = ["python3", "-c", "print(1)"]
    labels = {"execbox.managed": "1", "execbox.kind": "bench"}

    def plain(**host: object) -> None:
        cid = api.create_container(image, cmd, labels=labels, host_config=api.create_host_config(**host))["Id"]
        try:
            api.start(cid)
            api.wait(cid)
        finally:
            api.remove_container(cid, force=True)

    print(f"per run, averaged over {args.runs} sequential runs (python print(1)):")
    measure("docker-py, default options", plain, args.runs)
    measure(
        "docker-py, network none + log driver none",
        lambda: plain(network_mode="none", log_config={"type": "none"}),
        args.runs,
    )
    with Executor(pool=False) as ex:
        measure("execbox, pool off (hardened, agent)", lambda: ex.execute("print(1)", language="python"), args.runs)


if __name__ == "__main__":
    main()
