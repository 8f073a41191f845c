"""The sandbox's seccomp profile: an allowlist, tighter than Docker's default.

Docker's default profile still allows ``ptrace`` (same-UID code could stop or
inspect the agent) and ``io_uring_*`` (a large kernel attack surface). This
profile allows the system calls that Python, Node.js and the shell tools use and
nothing that manipulates namespaces, mounts, keys, BPF, perf, io_uring, ptrace or
other processes' memory. Unknown system calls fail with ENOSYS so that libc
falls back (``clone3`` -> ``clone``); the dangerous ones listed in ``DENIED``
fail with EPERM.

Sockets: only the address families a sandbox needs can be created: AF_UNIX,
AF_INET, AF_INET6, and AF_NETLINK with protocol NETLINK_ROUTE (getifaddrs(),
which glibc's getaddrinfo(AI_ADDRCONFIG), Node's os.networkInterfaces() and
Python's if_nameindex() use; it only shows the sandbox's own interfaces). Every
other family (AF_VSOCK, which reaches the hypervisor whatever the container's
network, AF_PACKET, AF_CAN, AF_ALG, AF_BLUETOOTH, ...) fails with EAFNOSUPPORT,
another netlink protocol with EPROTONOSUPPORT. ``socketpair`` is AF_UNIX only.

Under gVisor (``profile(gvisor=True)``) runsc applies the same profile to the
program's system calls inside the sandbox (its ``--oci-seccomp``), but the runsc of
Debian bookworm (20221219) ignores the profile's errno values: every refusal is
EPERM there, including the ENOSYS meant to make libc fall back from ``clone3`` to
``clone``. So that profile lets ``clone3`` through to gVisor's own kernel, which does
not implement it and answers ENOSYS itself (measured).
"""

from __future__ import annotations

import platform
from functools import cache
from typing import Any

__all__ = ["ALLOWED_FAMILIES", "DENIED", "profile"]

EPERM = 1
ENOSYS = 38
EPROTONOSUPPORT = 93
EAFNOSUPPORT = 97

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
NETLINK_ROUTE = 0
ALLOWED_FAMILIES = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
# Families are small integers (AF_MAX is 46 on Linux 6.x); anything past this range
# matches no rule and gets the default ENOSYS.
_FAMILY_RANGE = 64

# Namespace-creating clone flags: CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET.
CLONE_NS_MASK = 0x7E020000

ALLOWED = """
accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown
clock_getres clock_gettime clock_nanosleep close close_range connect copy_file_range
creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2
epoll_wait eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2
fadvise64 fallocate fchdir fchmod fchmodat fchmodat2 fchown fchownat fcntl fdatasync
fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstatfs fsync ftruncate
futex futex_waitv futimesat get_mempolicy get_robust_list getcpu getcwd getdents
getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp
getpid getppid getpriority getrandom getresgid getresuid getrlimit getrusage getsid
getsockname getsockopt gettid gettimeofday getuid getxattr inotify_add_watch
inotify_init inotify_init1 inotify_rm_watch ioctl ioprio_get ioprio_set kill
landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lgetxattr
link linkat listen listxattr llistxattr lremovexattr lseek lsetxattr lstat madvise
mbind membarrier memfd_create mincore mkdir mkdirat mknod mknodat mlock mlock2
mlockall mmap mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend
mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock munlockall munmap
nanosleep newfstatat open openat openat2 pause pidfd_open pidfd_send_signal pipe
pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll prctl pread64 preadv preadv2
prlimit64 pselect6 pwrite64 pwritev pwritev2 read readahead readlink readlinkat
readv recvfrom recvmmsg recvmsg remap_file_pages removexattr rename renameat
renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask
rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo
sched_get_priority_max sched_get_priority_min sched_getaffinity sched_getattr
sched_getparam sched_getscheduler sched_rr_get_interval sched_setaffinity
sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl
semget semop semtimedop sendfile sendmmsg sendmsg sendto set_mempolicy
set_robust_list set_tid_address setfsgid setfsuid setgid setgroups setitimer
setpgid setpriority setregid setresgid setresuid setreuid setrlimit setsid
setsockopt setuid setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd
signalfd4 splice stat statfs statx symlink symlinkat sync
sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete
timer_getoverrun timer_gettime timer_settime timerfd_create timerfd_gettime
timerfd_settime times tkill truncate umask uname unlink unlinkat utime utimensat
utimes vfork vmsplice wait4 waitid write writev
""".split()

# Refused with EPERM (listed so that the refusal is explicit and testable).
DENIED = """
ptrace process_vm_readv process_vm_writev kcmp pidfd_getfd io_uring_setup
io_uring_enter io_uring_register unshare setns mount umount2 pivot_root chroot
open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr bpf
perf_event_open userfaultfd keyctl add_key request_key personality syslog
kexec_load kexec_file_load init_module finit_module delete_module reboot swapon
swapoff acct quotactl name_to_handle_at open_by_handle_at lookup_dcookie iopl
ioperm modify_ldt clock_adjtime clock_settime settimeofday adjtimex sethostname
setdomainname vhangup
""".split()

_ARCHES = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64", "arm64": "SCMP_ARCH_AARCH64"}


@cache
def profile(gvisor: bool = False) -> dict[str, Any]:
    """The profile as a dict in the OCI/Docker seccomp format, for this host's architecture
    (``gvisor``: as applied inside gVisor, see the module docstring)."""
    arch = _ARCHES.get(platform.machine())
    clone3: dict[str, Any] = {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}
    if gvisor:
        clone3 = {"names": ["clone3"], "action": "SCMP_ACT_ALLOW"}
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": ENOSYS,
        "architectures": [arch] if arch else [],
        "syscalls": [
            {"names": sorted(ALLOWED), "action": "SCMP_ACT_ALLOW"},
            # clone without namespace flags only.
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": CLONE_NS_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            },
            # clone3 cannot be filtered by flags (they are behind a pointer): ENOSYS, libc falls back.
            clone3,
            {"names": sorted(DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
            *_socket_rules(),
        ],
    }


def _arg(index: int, value: int, op: str = "SCMP_CMP_EQ") -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": 0, "op": op}


def _socket_rules() -> list[dict[str, Any]]:
    """socket(family, type, protocol) by family; socketpair for AF_UNIX only."""
    rules: list[dict[str, Any]] = [
        {"names": ["socket", "socketpair"], "action": "SCMP_ACT_ALLOW", "args": [_arg(0, AF_UNIX)]},
        *({"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [_arg(0, af)]} for af in (AF_INET, AF_INET6)),
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [_arg(0, AF_NETLINK), _arg(2, NETLINK_ROUTE)]},
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPROTONOSUPPORT,
            "args": [_arg(0, AF_NETLINK), _arg(2, NETLINK_ROUTE, "SCMP_CMP_NE")],
        },
    ]
    for af in range(_FAMILY_RANGE):
        if af == AF_UNIX:
            continue
        names = ["socketpair"] if af in ALLOWED_FAMILIES else ["socket", "socketpair"]
        rules.append({"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": EAFNOSUPPORT, "args": [_arg(0, af)]})
    return rules
