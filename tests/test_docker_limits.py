"""Limits and hardening, each exercised for real in a sandbox."""

from __future__ import annotations

import threading

import pytest

from execbox import Executor

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


def test_inode_cap_of_tmpfs(executor: Executor) -> None:
    code = """
import os
n = 0
try:
    while n < 100000:
        open(f'/work/f{n}', 'w').close(); n += 1
except OSError as e:
    print(n, e.strerror)
"""
    r = executor.execute(code, language="python", limits={"inodes": 200})
    n, _, err = r.stdout.strip().partition(" ")
    assert err == "No space left on device" and 100 < int(n) < 200


def test_root_filesystem_is_read_only_and_user_is_not_root(executor: Executor) -> None:
    r = executor.execute(
        "id -u; touch /usr/x 2>&1; touch /etc/x 2>&1; touch /x 2>&1;"
        " grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status",
        language="bash",
    )
    lines = r.stdout.splitlines()
    assert int(lines[0]) != 0
    assert sum("Read-only file system" in line for line in lines) == 3  # EROFS, not EACCES
    status = dict(line.split(":\t") for line in lines[4:])
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[cap] == "0000000000000000", cap
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"


def test_init_process_and_no_docker_socket_or_host_mounts(executor: Executor) -> None:
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
    allowed_types = {"overlay", "proc", "tmpfs", "devpts", "sysfs", "mqueue", "cgroup", "cgroup2", "shm"}
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


def test_cpu_limit_is_applied(executor: Executor) -> None:
    r = executor.execute(
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us 2>/dev/null"
        " || cat /sys/fs/cgroup/cpu.max",
        language="bash",
        limits={"cpus": 0.5},
    )
    nums = [int(x) for x in r.stdout.split() if x.isdigit()]
    assert len(nums) == 2 and nums[0] * 2 == nums[1]
