"""Limits and hardening, each exercised for real in a sandbox."""

from __future__ import annotations

import os
import threading

import pytest

from execbox import Executor
from execbox.hardening import host_pids
from tests.conftest import busy
from tests.isolations import every_isolation  # noqa: F401 (runs this module under every isolation)

pytestmark = pytest.mark.docker


def test_timeout_kills_and_is_reported(executor: Executor) -> None:
    r = executor.execute("console.log('start'); while (true) {}", timeout=1)
    assert r.timed_out and r.exit_code == 137 and r.signal == 9
    assert r.stdout == "start\n"
    r = executor.execute("sleep 30", language="bash", timeout=0.5)
    assert r.timed_out


def test_timeout_enforced_from_outside_when_agent_is_stopped(executor: Executor) -> None:
    # The code stops its own agent (same UID): the agent can no longer enforce the
    # limit, the host must. Stopping PID 1 (init) too must not matter.
    r = executor.execute("kill -STOP 1; kill -STOP $PPID; echo stopped; sleep 60", language="bash", timeout=1)
    assert r.timed_out and r.exit_code == 137
    assert r.stdout == ""  # the agent was stopped before it could forward anything


def test_background_children_do_not_outlive_or_delay_the_run(executor: Executor) -> None:
    r = executor.execute("(sleep 300 &); echo started", language="bash", timeout=20)
    assert r.stdout == "started\n" and not r.timed_out
    assert r.run_ms is not None and r.run_ms < 20_000


def test_memory_limit_oom_kill(executor: Executor) -> None:
    r = executor.execute(
        "b = bytearray(300 * 1024 * 1024); print('allocated')", language="python", limits={"memory": "64m"}
    )
    assert r.oom_killed and r.exit_code == 137
    assert "allocated" not in r.stdout
    ok = executor.execute("b = bytearray(20 * 1024 * 1024); print('fine')", language="python", limits={"memory": "64m"})
    assert ok.stdout == "fine\n" and not ok.oom_killed


def test_fork_bomb_fails_inside_the_sandbox(executor: Executor) -> None:
    code = """
import os, sys, time
n = 0
try:
    while n < 1000:
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        n += 1
except OSError as e:
    print('fork failed after', n, e.strerror)
"""
    r = executor.execute(code, language="python", limits={"pids": 32}, timeout=10)
    assert "fork failed after" in r.stdout
    assert int(r.stdout.split()[3]) < 32
    assert executor.execute("echo alive", language="bash").stdout == "alive\n"


def test_output_flood_is_capped(executor: Executor) -> None:
    r = executor.execute("yes | head -c 10000000", language="bash", limits={"output_bytes": 65536})
    assert r.output_truncated and len(r.stdout) == 65536 and r.exit_code == 0
    r = executor.execute("import sys; sys.stderr.write('e' * 200000)", language="python", limits={"output_bytes": 1000})
    assert r.output_truncated and len(r.stderr) == 1000


def test_disk_fill_of_tmpfs(executor: Executor) -> None:
    for path in ("/work/big", "/tmp/big"):
        r = executor.execute(
            f"dd if=/dev/zero of={path} bs=1M count=64 2>&1; echo rc=$?", language="bash", limits={"disk": "8m"}
        )
        assert "No space left on device" in r.stdout and "rc=1" in r.stdout


def test_inode_cap_of_tmpfs(executor: Executor, isolation: str) -> None:
    code = """
import os
n = 0
try:
    while n < 2000000:
        open(f'/work/f{n}', 'w').close(); n += 1
except OSError as e:
    print(n, e.strerror)
"""
    r = executor.execute(code, language="python", limits={"inodes": 200, "memory": "64m"}, timeout=60)
    if isolation == "gvisor":
        # gVisor's tmpfs has no inode cap (runsc 20221219): its files live in the sandbox's
        # memory, so endless creation ends at the memory limit, reported as such.
        assert r.oom_killed and r.exit_code == 137 and r.stdout == ""
        return
    n, _, err = r.stdout.strip().partition(" ")
    assert err == "No space left on device" and 100 < int(n) < 200


def test_root_filesystem_is_read_only_and_user_is_not_root(executor: Executor, isolation: str) -> None:
    r = executor.execute(
        "id -u; touch /usr/x 2>&1; touch /etc/x 2>&1; touch /x 2>&1; awk '$2 == \"/\" {print $4}' /proc/mounts;"
        " grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status",
        language="bash",
    )
    lines = r.stdout.splitlines()
    assert int(lines[0]) != 0
    # EROFS, not EACCES: the read-only root refuses, not only the user's lack of rights. gVisor
    # answers EACCES for its read-only root, so there the mount's own flags tell.
    refusal = "Permission denied" if isolation == "gvisor" else "Read-only file system"
    assert sum(refusal in line for line in lines[1:4]) == 3
    assert lines[4].split(",")[0] == "ro"
    status = dict(line.split(":\t") for line in lines[5:])
    # (gVisor's kernel shows no CapAmb line: it has no ambient capabilities to show.)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")[: 4 if isolation == "gvisor" else 5]:
        assert status[cap] == "0000000000000000", cap
    assert status["Seccomp"] == "2"
    # no_new_privs as the kernel answers it (gVisor's /proc/self/status has no NoNewPrivs line).
    r = executor.execute("import ctypes; print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))", language="python")
    assert r.stdout == "1\n"  # PR_GET_NO_NEW_PRIVS
    assert status.get("NoNewPrivs", "1") == "1"


def test_init_process_and_no_docker_socket_or_host_mounts(executor: Executor, isolation: str) -> None:
    r = executor.execute(
        "tr '\\0' ' ' < /proc/1/cmdline; echo; ls /var/run/docker.sock /run/docker.sock 2>&1 | wc -l;"
        " awk '{print $2, $3}' /proc/mounts",
        language="bash",
    )
    lines = r.stdout.splitlines()
    assert lines[0].startswith("/sbin/docker-init -- python3 -I -S /opt/execbox/agent.py")
    mounts = dict(line.split(" ", 1) for line in lines[2:])
    assert mounts["/work"] == "tmpfs" and mounts["/tmp"] == "tmpfs"
    assert "docker.sock" not in r.stdout
    # Only the rootfs, kernel filesystems and tmpfs: no bind mount of a host path
    # except what Docker itself provides (/etc/hosts, hostname, resolv.conf, its init).
    # (gVisor serves the image's root and Docker's files over 9p from its gofer.)
    root_type = "9p" if isolation == "gvisor" else "overlay"
    assert mounts["/"] == root_type
    allowed_types = {root_type, "proc", "tmpfs", "devpts", "sysfs", "mqueue", "cgroup", "cgroup2", "shm"}
    for target, fstype in mounts.items():
        if fstype not in allowed_types:
            assert target in ("/etc/resolv.conf", "/etc/hostname", "/etc/hosts", "/usr/sbin/docker-init"), (
                target,
                fstype,
            )


def test_seccomp_denies_ptrace_io_uring_and_namespaces(executor: Executor) -> None:
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    r = libc.syscall(nr, *args)
    return 'ok' if r >= 0 else os.strerror(ctypes.get_errno())
buf = ctypes.create_string_buffer(256)
print('ptrace', call(101, 0, 0, 0, 0))           # PTRACE_TRACEME
print('io_uring_setup', call(425, 8, buf))
print('unshare', call(272, 0x10000000))            # CLONE_NEWUSER
print('bpf', call(321, 0, 0, 0))
print('getpid', call(39))
"""
    r = executor.execute(code, language="python")
    got = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert got == {
        "ptrace": "Operation not permitted",
        "io_uring_setup": "Operation not permitted",
        "unshare": "Operation not permitted",
        "bpf": "Operation not permitted",
        "getpid": "ok",
    }
    r = executor.execute("unshare --user true 2>&1; echo rc=$?", language="bash")
    assert "rc=0" not in r.stdout


def test_per_uid_kernel_budget_is_not_shared_between_runs(executor: Executor) -> None:
    # fs.inotify.max_user_instances is counted per UID across all containers: a run
    # that exhausts it must not break a concurrent run.
    hog = """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while len(fds) < 10000:
    fd = libc.inotify_init()
    if fd < 0:
        break
    fds.append(fd)
print('held', len(fds), flush=True)
time.sleep(4)
"""
    results: dict[str, object] = {}
    started = threading.Event()

    def run_hog() -> None:
        results["hog"] = executor.execute(
            hog, language="python", on_output=lambda s, c: started.set(), limits={"pids": 64}
        )

    t = threading.Thread(target=run_hog)
    t.start()
    assert started.wait(30)
    other = executor.execute("import ctypes; print(ctypes.CDLL(None).inotify_init() >= 0)", language="python")
    t.join()
    assert other.stdout == "True\n"
    hog_out = results["hog"].stdout  # type: ignore[attr-defined]
    assert hog_out.startswith("held ") and int(hog_out.split()[1]) < 10000


def _host_cgroup(sandbox_id: str, controller: str, name: str) -> int:
    for root in (f"/sys/fs/cgroup/{controller}", "/sys/fs/cgroup"):  # cgroup v1, v2
        path = f"{root}/docker/{sandbox_id}/{name}"
        if os.path.exists(path):
            with open(path) as fh:
                return int(fh.read().split()[0])
    raise AssertionError(f"no cgroup file {name} for {sandbox_id[:12]}")


def test_cpu_limit_is_applied(executor: Executor, isolation: str) -> None:
    # From the host: the cgroup around the whole sandbox (gVisor's kernel included) has the
    # quota. From inside as well where the sandbox shows its cgroup (gVisor's kernel does not).
    seen: dict[str, int] = {}

    def on_output(stream: str, chunk: bytes) -> None:
        for sid in busy(executor):
            seen["quota"] = _host_cgroup(sid, "cpu", "cpu.cfs_quota_us")
            seen["period"] = _host_cgroup(sid, "cpu", "cpu.cfs_period_us")

    r = executor.execute(
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us 2>/dev/null"
        " || cat /sys/fs/cgroup/cpu.max 2>/dev/null; echo end",
        language="bash",
        limits={"cpus": 0.5},
        on_output=on_output,
    )
    assert seen["quota"] * 2 == seen["period"], seen
    if isolation == "container":
        nums = [int(x) for x in r.stdout.split() if x.isdigit()]
        assert len(nums) == 2 and nums[0] * 2 == nums[1]


def test_pids_limit_from_the_host(executor: Executor, isolation: str) -> None:
    # Inside, RLIMIT_NPROC is the run's limit (test_fork_bomb_fails_inside_the_sandbox); outside,
    # the cgroup's limit is that under runc, and above it under gVisor, whose own threads count.
    seen: dict[str, int] = {}

    def on_output(stream: str, chunk: bytes) -> None:
        for sid in busy(executor):
            seen["max"] = _host_cgroup(sid, "pids", "pids.max")

    r = executor.execute("ulimit -u", language="bash", limits={"pids": 40}, on_output=on_output)
    assert r.stdout == "40\n"
    assert seen["max"] == (40 if isolation == "container" else host_pids(40, "gvisor")) and seen["max"] >= 40
