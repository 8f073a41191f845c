"""Admission control: per-tenant quotas (429) and the global slot gate with its bounded queue (503).

Everything here runs on the event loop's thread, so plain attributes need no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Gate", "QueueFull", "QuotaExceeded", "RateWindow", "TenantQuotas"]


class QuotaExceeded(Exception):
    """A tenant quota is used up; ``retry_after`` in whole seconds."""

    def __init__(self, reason: str, message: str, retry_after: int) -> None:
        self.reason, self.message, self.retry_after = reason, message, retry_after
        super().__init__(message)


class QueueFull(Exception):
    """The global queue has no room."""


class Gate:
    """At most ``limit`` holders; up to ``queue`` more wait in FIFO order, the rest are refused.

    Unbounded waiters (async jobs, already counted against their own store's cap)
    queue in the same line but do not use up the queue's room.
    """

    def __init__(self, limit: int, queue: int) -> None:
        self.limit, self.queue = limit, queue
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._bounded: set[asyncio.Future[None]] = set()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        return False

    async def acquire(self, timeout: float | None = None, bounded: bool = True) -> None:
        """Take a slot, waiting in the queue; QueueFull, or TimeoutError after ``timeout`` s."""
        if self.try_acquire():
            return
        if bounded and len(self._bounded) >= self.queue:
            raise QueueFull
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if bounded:
            self._bounded.add(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise
        finally:
            self._bounded.discard(fut)
        # The releaser handed its slot over: ``active`` already counts us.

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand the slot over without freeing it
                return
        self.active -= 1


class RateWindow:
    """At most ``per_minute`` events in any sliding 60 s window."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._times: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] <= now - 60.0:
            self._times.popleft()

    def take(self) -> int:
        """Record an event and return 0, or return the seconds to wait (nothing recorded)."""
        now = self.clock()
        self._trim(now)
        if len(self._times) >= self.per_minute:
            return max(1, math.ceil(self._times[0] + 60.0 - now))
        self._times.append(now)
        return 0

    def refund(self) -> None:
        """Undo the last ``take`` (the execution was not started after all)."""
        if self._times:
            self._times.pop()


class _TenantState:
    def __init__(self, max_concurrent: int, per_minute: int, clock: Callable[[], float]) -> None:
        self.slots = Gate(max_concurrent, queue=0)
        self.rate = RateWindow(per_minute, clock)
        self.pending_jobs = 0


class TenantQuotas:
    """Concurrency and per-minute rate of each tenant."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _TenantState] = {}

    def state(self, tenant: str, max_concurrent: int, per_minute: int) -> _TenantState:
        st = self._states.get(tenant)
        if st is None:
            st = self._states[tenant] = _TenantState(max_concurrent, per_minute, self._clock)
        return st

    def admit_now(self, st: _TenantState) -> None:
        """Take a concurrency slot and a rate token now, or raise QuotaExceeded (nothing taken)."""
        if not st.slots.try_acquire():
            raise QuotaExceeded("tenant_concurrency", f"at most {st.slots.limit} executions at once for this tenant", 1)
        wait = st.rate.take()
        if wait:
            st.slots.release()
            raise QuotaExceeded(
                "rate_limited", f"at most {st.rate.per_minute} executions per minute for this tenant", wait
            )
