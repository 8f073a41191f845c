"""Helpers shared by the tests: await a condition instead of sleeping and then checking."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 60.0, interval: float = 0.02, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy, and return that; fail after ``timeout`` s.

    A bound on how long to wait, never a timing assertion: on a slow machine it only waits longer.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not reached within {timeout:g} s")
        time.sleep(interval)
