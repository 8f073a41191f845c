"""Per-node series on an API replica's ``/metrics`` (nodes mode), from what nodes publish in Redis.

Each node's status key (``execbox:node:<name>``, a TTL: its liveness) holds its slots,
runs in progress, ready sandboxes by profile, health and runs ended by outcome. The
scrape reads every live one (``refresh``, on the event loop) and this collector turns
that snapshot into series labelled ``node``; a node whose key is gone (stopped, or
silent past its TTL) has no series at the next scrape. Any replica exports the same
values: aggregate with ``max by (node)``, not ``sum``, across replicas.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["NodeCollector", "node_families"]

log = logging.getLogger("execbox.server")


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def node_families(nodes: list[dict[str, Any]]) -> list[Metric]:
    """The metric families of these node statuses (as ``Dispatcher.nodes()`` gives them)."""
    live = GaugeMetricFamily("execbox_nodes_live", "Nodes whose liveness key is present.", value=len(nodes))
    slots = GaugeMetricFamily("execbox_node_slots", "Runs a node takes at once.", labels=["node"])
    running = GaugeMetricFamily("execbox_node_running", "Runs a node is running now.", labels=["node"])
    healthy = GaugeMetricFamily(
        "execbox_node_healthy", "1 while a node's engine answers (else it takes no work).", labels=["node"]
    )
    seen = GaugeMetricFamily(
        "execbox_node_last_seen_timestamp_seconds", "Unix time of a node's last status.", labels=["node"]
    )
    ready = GaugeMetricFamily(
        "execbox_node_ready_sandboxes",
        "Warm sandboxes ready on a node, by profile (language; `+egress`: on the egress network).",
        labels=["node", "profile"],
    )
    runs = CounterMetricFamily(
        "execbox_node_runs",
        "Runs a node ended since it started, by outcome (ok, error, timeout, oom; failed: the library"
        " refused or could not run it; dropped: its caller had given up).",
        labels=["node", "outcome"],
    )
    for status in nodes:
        name = str(status.get("name", ""))
        if not name:
            continue
        slots.add_metric([name], _num(status.get("slots")))
        running.add_metric([name], _num(status.get("running")))
        healthy.add_metric([name], 1.0 if status.get("healthy", True) else 0.0)
        seen.add_metric([name], _num(status.get("last_seen")))
        for profile, n in sorted(dict(status.get("ready") or {}).items()):
            ready.add_metric([name, str(profile)], _num(n))
        for outcome, n in sorted(dict(status.get("runs") or {}).items()):
            runs.add_metric([name, str(outcome)], _num(n))
    return [live, slots, running, healthy, seen, ready, runs]


class NodeCollector(Collector):
    """The node series of the last ``refresh()``; the scrape route refreshes before rendering."""

    def __init__(self, read: Callable[[], Awaitable[list[dict[str, Any]]]]) -> None:
        self._read = read
        self._nodes: list[dict[str, Any]] = []

    async def refresh(self) -> None:
        try:
            self._nodes = await self._read()
        except Exception as exc:  # Redis down: no node series (the replica's own metrics still answer)
            log.warning("node statuses not read for /metrics: %s", exc)
            self._nodes = []

    def collect(self) -> Iterator[Metric]:
        yield from node_families(self._nodes)


class NodeSelfCollector(Collector):
    """A node's own ``/metrics`` (``execbox node --metrics-port``): its status as the same per-node
    series, and its pool's counters as ``execbox_pool_*`` (the names the API uses in-process)."""

    def __init__(self, status: Callable[[], dict[str, Any]], pool: Callable[[], dict[str, Any] | None]) -> None:
        self._status, self._pool = status, pool

    def collect(self) -> Iterator[Metric]:
        yield from node_families([self._status()])
        for field, value in sorted((self._pool() or {}).items()):
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield GaugeMetricFamily(f"execbox_pool_{field}", f"The node's pool: {field}.", value=float(value))


def parse_listen(value: str) -> tuple[str, int]:
    """``PORT`` (on 127.0.0.1) or ``HOST:PORT`` (``[v6]:PORT``); ValueError if it is neither."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536 or (sep and not host):
        raise ValueError(f"not a port or HOST:PORT: {value!r}")
    return host, int(port)


def serve_node_metrics(listen: str, collector: Collector) -> Callable[[], None]:
    """Serve ``collector`` as Prometheus text at ``listen`` in a thread; the function that stops it."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    host, port = parse_listen(listen)
    server, thread = start_http_server(port, host, registry)
    log.info("node metrics on http://%s:%d/metrics", host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop
