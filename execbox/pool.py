"""Sandboxes made ahead of demand: created, started and warmed before the request.

A ``Pool`` keeps ``min_ready`` started sandboxes per ``Profile`` (language, image,
limits, network, isolation), each waiting in its agent with the language runtime already
started. A sandbox is handed out exactly once and destroyed after its run, off the
request's path; the pool refills in the background with bounded concurrency.
The pool's lock is never held across engine calls.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .agentlink import AgentLink, LinkEnded
from .engine.base import Engine, Isolation
from .exceptions import ExecboxError, SandboxError
from .hardening import AGENT_COMMAND, WORKDIR, sandbox_spec
from .labels import labels_for
from .models import Limits
from .runtimes import Runtime, get_runtime
from .uids import UidLease, UidRegistry

__all__ = ["Pool", "PoolStats", "Profile", "Sandbox", "SandboxFactory"]

log = logging.getLogger("execbox.pool")


@dataclass(frozen=True)
class Profile:
    """What a sandbox is made for: everything fixed when its container is created."""

    language: str
    image: str
    memory: int
    cpus: float
    pids: int
    disk: int
    inodes: int
    network: str = "none"
    volume: str | None = None  # a user's named volume, mounted at /data
    uid: int | None = None  # fixed UID (the volume's owner); None: a fresh one per sandbox
    isolation: Isolation = "container"

    @classmethod
    def of(
        cls,
        runtime: Runtime,
        image: str,
        limits: Limits,
        network: str = "none",
        volume: str | None = None,
        uid: int | None = None,
        isolation: Isolation = "container",
    ) -> Profile:
        return cls(
            runtime.name,
            image,
            limits.memory,
            limits.cpus,
            limits.pids,
            limits.disk,
            limits.inodes,
            network,
            volume,
            uid,
            isolation,
        )

    def limits(self) -> Limits:
        return Limits(memory=self.memory, cpus=self.cpus, pids=self.pids, disk=self.disk, inodes=self.inodes)


@dataclass
class Sandbox:
    """One started container, used for one execution."""

    id: str
    link: AgentLink
    uid: int
    profile: Profile
    warm: bool
    created: float
    ready: bool = False
    leased: bool = False  # handed out for a run (it is never handed out twice)
    uid_lease: UidLease | None = None  # its own UID's lease (None: a volume's UID, leased by the volume)

    def let_go(self) -> None:
        """Tell its agent, lingering after its answer, to end now (see ``LINGER``)."""
        try:
            self.link.channel.send(b"\n")
        except OSError:
            pass


class SandboxFactory:
    """Creates, starts and destroys sandboxes; knows every sandbox still alive."""

    def __init__(self, engine: Engine, uids: UidRegistry, ttl: float) -> None:
        self.engine = engine
        self.uids = uids
        self.ttl = ttl  # the sandbox's label expiry, and its UID lease: the reaper removes it first
        self._live: dict[str, Sandbox] = {}
        self._lock = threading.Lock()
        self._unremoved: dict[str, UidLease | None] = {}  # removal failed: its UID stays leased
        self.made = 0

    def make(self, profile: Profile, kind: str = "run", ready_timeout: float | None = None) -> Sandbox:
        """A started sandbox for ``profile``; with ``ready_timeout``, wait until its runtime waits."""
        runtime = get_runtime(profile.language)
        command: tuple[str, ...] = AGENT_COMMAND
        if runtime.warm_argv is not None:
            warm = {"argv": list(runtime.warm_argv), "env": runtime.environment({}), "workdir": WORKDIR}
            if profile.network != "none":
                warm["prime"] = list(runtime.network_prime)
            command = (*AGENT_COMMAND, "--warm", json.dumps(warm, separators=(",", ":")))
        lease: UidLease | None = None
        if profile.uid is not None:
            uid = profile.uid
        else:
            lease = self.uids.lease(self.ttl, "run")
            uid = lease.uid
        spec = sandbox_spec(
            profile.limits(),
            profile.image,
            uid,
            labels_for(kind, self.ttl),
            None if profile.network == "none" else profile.network,
            command=command,
            volumes={profile.volume: "/data"} if profile.volume else None,
            isolation=profile.isolation,
        )
        sid: str | None = None
        try:
            sid = self.engine.create(spec)
            channel = self.engine.attach(sid)
            sb = Sandbox(
                sid, AgentLink(channel), uid, profile, runtime.warm_argv is not None, time.monotonic(), uid_lease=lease
            )
            with self._lock:
                self._live[sid] = sb
                self.made += 1
            self.engine.start(sid)
        except BaseException:
            if sid is not None:
                self._forget(sid)
                self._remove_quietly(sid, lease)
            elif lease is not None:
                self.uids.release(lease)
            raise
        if ready_timeout is not None:
            try:
                self._await_ready(sb, ready_timeout)
            except BaseException:
                self.destroy(sb)
                raise
        return sb

    def _await_ready(self, sb: Sandbox, timeout: float) -> None:
        try:
            sb.link.await_ready(time.monotonic() + timeout)
        except LinkEnded:
            raise SandboxError(f"sandbox {sb.id[:12]} ended before it was ready") from None
        except SandboxError as exc:
            raise SandboxError(f"sandbox {sb.id[:12]}: {exc}") from None
        sb.ready = True

    def destroy(self, sb: Sandbox, settle: float = 0.0, let_go: bool = False) -> None:
        """Close and force-remove; the reaper collects it if the engine refuses now.

        With ``settle``, first wait up to that long for the sandbox to end by itself
        (its agent exits after the result, once let go or ``LINGER`` passed): removing
        a stopped container costs the engine far less than killing a running one.
        """
        if let_go:
            sb.let_go()
        if settle > 0:
            deadline = time.monotonic() + settle
            try:
                while sb.link.channel.recv(max(deadline - time.monotonic(), 0.0)) is not None:
                    pass
            except (TimeoutError, OSError):
                pass
        sb.link.close()
        self._remove_quietly(sb.id, sb.uid_lease)
        self._forget(sb.id)

    def _forget(self, sid: str) -> None:
        with self._lock:
            self._live.pop(sid, None)

    def _remove_quietly(self, sid: str, lease: UidLease | None) -> None:
        """Remove the container, then end its UID's lease (never while the container may live)."""
        try:
            self.engine.remove(sid)
        except Exception as exc:
            # Engine down or refusing: try again later (retry_removals), and the
            # labels let the reaper collect it should this process die first.
            log.warning("could not remove sandbox %s (will retry): %s", sid[:12], str(exc))
            with self._lock:
                self._unremoved[sid] = lease
            return
        if lease is not None:
            self.uids.release(lease)

    def retry_removals(self) -> int:
        """Retry removals that failed (e.g. while the engine restarted); return how many are left."""
        with self._lock:
            pending = list(self._unremoved.items())
        for sid, lease in pending:
            try:
                self.engine.remove(sid)
            except Exception:
                continue
            with self._lock:
                self._unremoved.pop(sid, None)
            if lease is not None:
                self.uids.release(lease)
        with self._lock:
            return len(self._unremoved)

    def live(self) -> list[Sandbox]:
        with self._lock:
            return list(self._live.values())


@dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    miss_wait_ms: float = 0.0
    created: int = 0
    create_failures: int = 0
    retired: int = 0
    expired: int = 0
    dead: int = 0
    ready: int = 0
    creating: int = 0
    refill_passes: int = 0  # passes of the refiller (each may start creations, within the caps)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Pool:
    """Ready sandboxes per profile, refilled in the background."""

    def __init__(
        self,
        factory: SandboxFactory,
        *,
        max_total: int = 8,
        max_idle_age: float = 300.0,
        refill_concurrency: int = 2,
        ready_timeout: float = 30.0,
        refill_delay: float = 0.05,
    ) -> None:
        self.factory = factory
        self.max_total = max_total
        self.max_idle_age = max_idle_age
        self.ready_timeout = ready_timeout
        # Creating a container costs 100+ ms of CPU in dockerd/containerd/runc: start
        # refilling a moment after a hand-out, not while the run it serves is starting.
        self.refill_delay = refill_delay
        self._last_handout = 0.0
        self._targets: dict[Profile, int] = {}
        self._ready: dict[Profile, deque[Sandbox]] = {}
        self._creating: dict[Profile, int] = {}
        self._stats = PoolStats()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._backoff = 0.0
        self._create_pool = ThreadPoolExecutor(refill_concurrency, thread_name_prefix="execbox-pool-create")
        self._destroy_pool = ThreadPoolExecutor(2, thread_name_prefix="execbox-pool-destroy")
        self._pending_destroys = 0
        self._idle = threading.Condition(self._lock)
        self._refiller = threading.Thread(target=self._refill_loop, name="execbox-pool-refill", daemon=True)
        self._refiller.start()

    # -- public -------------------------------------------------------------------------

    def keep_ready(self, profile: Profile, n: int) -> None:
        """Keep ``n`` sandboxes of ``profile`` ready (0 stops refilling it)."""
        with self._lock:
            self._targets[profile] = n
        self._wake.set()

    def acquire(self, profile: Profile) -> tuple[Sandbox, bool]:
        """A never-used sandbox for ``profile`` and whether it came ready from the pool.

        When none is ready, one is made now on the caller's thread (bounded by the engine).
        """
        while True:
            with self._lock:
                if self._closed:
                    raise ExecboxError("the pool is closed")
                queue = self._ready.get(profile)
                sb = queue.popleft() if queue else None
            if sb is None:
                break
            self._wake.set()
            if sb.link.channel.alive():
                with self._lock:
                    self._stats.hits += 1
                    self._last_handout = time.monotonic()
                return sb, True
            with self._lock:
                self._stats.dead += 1
            self.retire(sb)
        t0 = time.monotonic()
        sb = self.factory.make(profile)
        with self._lock:
            self._stats.misses += 1
            self._stats.miss_wait_ms += (time.monotonic() - t0) * 1000
        return sb, False

    def retire(self, sb: Sandbox) -> None:
        """Destroy a used (or unusable) sandbox in the background."""
        with self._lock:
            self._pending_destroys += 1
            self._stats.retired += 1
        try:
            self._destroy_pool.submit(self._destroy, sb)
        except RuntimeError:  # shut down: do it here
            self._destroy(sb)

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until every retired sandbox is removed."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending_destroys:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def ready_count(self, profile: Profile) -> int:
        with self._lock:
            return len(self._ready.get(profile, ()))

    def ready_by_profile(self) -> dict[Profile, int]:
        with self._lock:
            return {profile: len(q) for profile, q in self._ready.items() if q}

    def ready_ids(self) -> set[str]:
        with self._lock:
            return {sb.id for q in self._ready.values() for sb in q}

    def stats(self) -> PoolStats:
        with self._lock:
            s = PoolStats(**self._stats.__dict__)
            s.ready = sum(len(q) for q in self._ready.values())
            s.creating = sum(self._creating.values())
        return s

    def close(self) -> None:
        """Stop refilling, remove every pooled sandbox, wait for pending removals."""
        with self._lock:
            self._closed = True
            ready = [sb for q in self._ready.values() for sb in q]
            self._ready.clear()
        self._wake.set()
        self._refiller.join(timeout=10)
        self._create_pool.shutdown(wait=True)  # creations in flight land in _ready (closed: retired)
        with self._lock:
            ready += [sb for q in self._ready.values() for sb in q]
            self._ready.clear()
        for sb in ready:
            self.retire(sb)
        self.drain()
        self._destroy_pool.shutdown(wait=True)

    # -- background ---------------------------------------------------------------------

    def _destroy(self, sb: Sandbox) -> None:
        try:
            # A used sandbox ends by itself right after its result: let it (off the request's path).
            self.factory.destroy(sb, settle=1.0 if sb.leased else 0.0)
        finally:
            with self._idle:
                self._pending_destroys -= 1
                self._idle.notify_all()

    def _refill_loop(self) -> None:
        while True:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._closed:
                return
            if self._backoff:
                time.sleep(self._backoff)
            quiet = self._last_handout + self.refill_delay - time.monotonic()
            if quiet > 0:
                time.sleep(quiet)
            self.factory.retry_removals()
            expired: list[Sandbox] = []
            launches: list[Profile] = []
            now = time.monotonic()
            with self._lock:
                for queue in self._ready.values():
                    while queue and now - queue[0].created > self.max_idle_age:
                        expired.append(queue.popleft())
                total = sum(len(q) for q in self._ready.values()) + sum(self._creating.values())
                missing = {
                    profile: target - len(self._ready.get(profile, ())) - self._creating.get(profile, 0)
                    for profile, target in self._targets.items()
                }
                # One per profile per round: under max_total, every profile gets its share.
                while total < self.max_total and any(n > 0 for n in missing.values()):
                    for profile, n in missing.items():
                        if n > 0 and total < self.max_total:
                            launches.append(profile)
                            self._creating[profile] = self._creating.get(profile, 0) + 1
                            missing[profile] = n - 1
                            total += 1
                self._stats.expired += len(expired)
                self._stats.refill_passes += 1
            for sb in expired:
                self.retire(sb)
            for profile in launches:
                self._create_pool.submit(self._create_one, profile)

    def _create_one(self, profile: Profile) -> None:
        sb: Sandbox | None = None
        try:
            sb = self.factory.make(profile, kind="pool", ready_timeout=self.ready_timeout)
        except Exception as exc:
            self._backoff = min(max(self._backoff * 2, 0.1), 5.0)
            log.warning(
                "pool: could not create a %s sandbox (retrying in %.1f s): %s",
                profile.language,
                self._backoff,
                str(exc),
            )
        else:
            self._backoff = 0.0
        with self._lock:
            self._creating[profile] -= 1
            if sb is not None:
                self._stats.created += 1
                if not self._closed:
                    self._ready.setdefault(profile, deque()).append(sb)
                    sb = None
            else:
                self._stats.create_failures += 1
        if sb is not None:  # closed while creating
            self.retire(sb)
        self._wake.set()
