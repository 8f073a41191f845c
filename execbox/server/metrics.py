"""Prometheus metrics of the service, with ``prometheus-client``.

Each ``Metrics`` (one per app) has a registry of its own, never the process-global
one: two apps in one process (tests, an embedding service) do not share counts.
Durations are in seconds with buckets from 1 ms, so that a pooled run (a few
milliseconds) lands in a bucket that says so. Gauges that other parts own (queue,
pool, sessions, jobs) are read at scrape time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..models import ExecutionResult

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "Metrics", "outcome_of"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


def outcome_of(result: ExecutionResult) -> str:
    """ok, error (non-zero exit), timeout or oom."""
    if result.timed_out:
        return "timeout"
    if result.oom_killed:
        return "oom"
    return "ok" if result.exit_code == 0 else "error"


class _ReadAtScrape(Collector):
    """Gauges whose value is read from their owner when scraped."""

    def __init__(self) -> None:
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (help_, read) in sorted(self.gauges.items()):
            yield GaugeMetricFamily(name, help_, value=float(read()))


class Metrics:
    """The service's metrics; ``render()`` gives the Prometheus text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.executions = Counter(
            "execbox_executions",
            "Executions finished, by language and outcome.",
            ("language", "outcome"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "execbox_execution_duration_seconds",
            "Wall-clock duration of executions, as the caller saw it.",
            ("language",),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.rejections = Counter(
            "execbox_rejections", "Requests refused before running, by reason.", ("reason",), registry=self.registry
        )
        self.webhooks = Counter(
            "execbox_webhook_deliveries", "Webhook deliveries, by outcome.", ("outcome",), registry=self.registry
        )
        self.in_flight = Gauge("execbox_executions_in_flight", "Executions running now.", registry=self.registry)
        self._read = _ReadAtScrape()
        self.registry.register(self._read)
        self._refreshers: list[Callable[[], Awaitable[None]]] = []

    def collector(self, collector: Collector, refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        """Register a collector of another part; ``refresh`` (async) runs before each scrape."""
        self.registry.register(collector)
        if refresh is not None:
            self._refreshers.append(refresh)

    async def refresh(self) -> None:
        """What async collectors read (e.g. node statuses in Redis): called by the scrape route."""
        for refresh in self._refreshers:
            await refresh()

    def gauge(self, name: str, help_: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time."""
        self._read.gauges[name] = (help_, read)

    def started(self) -> None:
        self.in_flight.inc()

    def finished(self, language: str, outcome: str, seconds: float | None) -> None:
        self.in_flight.dec()
        self.executions.labels(language, outcome).inc()
        if seconds is not None:
            self.duration.labels(language).observe(seconds)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def webhook(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
