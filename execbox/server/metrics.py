"""Prometheus metrics of the service, in the text exposition format (version 0.0.4).

A handful of counters, gauges and one histogram: small enough to write by hand,
and kept per ``Metrics`` object (per app), not in a process-global registry.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from ..models import ExecutionResult

__all__ = ["CONTENT_TYPE", "Metrics", "outcome_of"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def outcome_of(result: ExecutionResult) -> str:
    """ok, error (non-zero exit), timeout or oom."""
    if result.timed_out:
        return "timeout"
    if result.oom_killed:
        return "oom"
    return "ok" if result.exit_code == 0 else "error"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Counter:
    def __init__(self, name: str, help_: str, labels: tuple[str, ...]) -> None:
        self.name, self.help, self.labels = name, help_, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *values: str, by: float = 1.0) -> None:
        self.values[values] = self.values.get(values, 0.0) + by

    def render(self, kind: str = "counter") -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {kind}"]
        for key, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.labels, key)} {_num(v)}")
        return out


class _Histogram:
    def __init__(self, name: str, help_: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.labels, self.buckets = name, help_, labels, buckets
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, *labels: str) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[labels] = self.sums.get(labels, 0.0) + value

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, counts in sorted(self.counts.items()):
            for bound, c in zip((*self.buckets, math.inf), counts, strict=True):
                le = 'le="' + _num(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labels, key, le)} {c}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_num(self.sums[key])}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {counts[-1]}")
        return out


class Metrics:
    """The service's metrics; ``render()`` gives the Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.executions = _Counter(
            "execbox_executions_total", "Executions finished, by language and outcome.", ("language", "outcome")
        )
        self.duration = _Histogram(
            "execbox_execution_duration_seconds",
            "Wall-clock duration of executions, container creation to removal.",
            ("language",),
            DURATION_BUCKETS,
        )
        self.rejections = _Counter(
            "execbox_rejections_total", "Requests refused before running, by reason.", ("reason",)
        )
        self.webhooks = _Counter("execbox_webhook_deliveries_total", "Webhook deliveries, by outcome.", ("outcome",))
        self.in_flight = 0
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time."""
        self._gauges[name] = (help_, read)

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, language: str, outcome: str, seconds: float | None) -> None:
        with self._lock:
            self.in_flight -= 1
            self.executions.inc(language, outcome)
            if seconds is not None:
                self.duration.observe(seconds, language)

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.rejections.inc(reason)

    def webhook(self, outcome: str) -> None:
        with self._lock:
            self.webhooks.inc(outcome)

    def render(self) -> str:
        with self._lock:
            lines = [
                *self.executions.render(),
                *self.duration.render(),
                "# HELP execbox_executions_in_flight Executions running now.",
                "# TYPE execbox_executions_in_flight gauge",
                f"execbox_executions_in_flight {self.in_flight}",
                *self.rejections.render(),
                *self.webhooks.render(),
            ]
            for name, (help_, read) in sorted(self._gauges.items()):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {_num(read())}"]
        return "\n".join(lines) + "\n"
