"""Progress of image builds, for a person watching: steps, elapsed time, a live bar.

Builders report two things through a ``Progress``: detail lines (``progress(line)``:
debootstrap's and the engine's output) and the start of a step (``step(progress,
name)``: debootstrap, import, agent layer, build tools, each package image). Any
callable taking a line is a ``Progress`` (``log.info``, ``list.append``); a
``BuildProgress`` also draws the steps:

- on a terminal, one live line per step: its number, name, elapsed seconds, a bar
  where the total is known (the engine's ``Step i/n`` lines) and the latest detail;
- elsewhere (a log, CI), one line when a step starts and one when it ends;
- every detail line goes to ``log`` (a file), whose path a failure names.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["BuildProgress", "Progress", "step"]

Progress = Callable[[str], None]

_ENGINE_STEP = re.compile(r"^Step (\d+)/(\d+)\b")
_BAR = 24


def step(progress: Progress, name: str, total: int | None = None) -> None:
    """Announce that a build step starts (a plain callable gets it as a line)."""
    announce = getattr(progress, "step", None)
    if announce is not None:
        announce(name, total)
    else:
        progress(f"== {name} ==")


class BuildProgress:
    """Draws the steps of a build on ``out`` and keeps every line in ``log``."""

    def __init__(self, out: TextIO | None = None, log: TextIO | None = None, tty: bool | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.log = log
        self.tty = self.out.isatty() if tty is None else tty
        self.steps = 0
        self.name: str | None = None
        self.started = 0.0
        self.done = 0
        self.total: int | None = None
        self.detail = ""
        self._drawn = 0.0

    def step(self, name: str, total: int | None = None) -> None:
        self._end_step()
        self.steps += 1
        self.name, self.total, self.done, self.detail = name, total, 0, ""
        self.started = time.monotonic()
        self._write_log(f"== step {self.steps}: {name} ==")
        if self.tty:
            self._draw(force=True)
        else:
            self._print(f"[{self.steps}] {name} ...")

    def __call__(self, line: str) -> None:
        self._write_log(line)
        if self.name is None:  # a line outside any step ("... is up to date")
            self._clear()
            self._print(line)
            return
        m = _ENGINE_STEP.match(line)
        if m:
            self.done, self.total = int(m.group(1)) - 1, int(m.group(2))
        self.detail = line.strip()
        if self.tty:
            self._draw()

    def advance(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        if self.tty:
            self._draw()

    def finish(self) -> None:
        """End the last step (call once the build is over, also after a failure)."""
        self._end_step()

    # -- drawing ----------------------------------------------------------------------------

    def _end_step(self) -> None:
        if self.name is None:
            return
        elapsed = time.monotonic() - self.started
        self._clear()
        self._print(f"[{self.steps}] {self.name}: done in {elapsed:.0f} s")
        self._write_log(f"== step {self.steps}: {self.name}: done in {elapsed:.1f} s ==")
        self.name = None

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        head = f"[{self.steps}] {self.name} {now - self.started:4.0f} s"
        if self.total:
            filled = min(_BAR, _BAR * self.done // self.total)
            head += f" [{'#' * filled}{'.' * (_BAR - filled)}] {self.done}/{self.total}"
        width = shutil.get_terminal_size((100, 20)).columns - 1
        line = f"{head}  {self.detail}"[:width]
        self.out.write("\r" + line.ljust(width))
        self.out.flush()

    def _clear(self) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.out.write("\r" + " " * width + "\r")

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _write_log(self, text: str) -> None:
        if self.log is not None:
            self.log.write(text + "\n")
            self.log.flush()
