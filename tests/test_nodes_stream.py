"""Nodes mode, streamed: server-sent events of a run on an `execbox node` relayed by the API as they
come, the same events as in-process; the client and the CLI against it; truncation; a node killed
mid-stream; and the per-node series on the API's /metrics.

Real processes (one API replica and nodes, `tests/test_nodes.py`'s fixture) over a real Redis, on
this machine's Docker Engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from execbox.client import Client

from .serverkit import free_port
from .support import eventually
from .test_nodes import cluster  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

# Lines with pauses: a streamed first line comes well before the end.
SLOW = (
    "import sys, time\nfor i in range(5):\n    print(f'line {i}', flush=True); time.sleep(0.6)\n"
    "print('bye', file=sys.stderr)"
)


def sse(client: httpx.Client, url: str, body: dict[str, Any]) -> Iterator[tuple[float, str, Any]]:
    """(arrival time, event, data) of a streamed POST /v1/execute."""
    with client.stream("POST", f"{url}/v1/execute", json=body, headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                yield time.monotonic(), event, json.loads(line[6:])


def node_series(url: str) -> dict[str, set[str]]:
    """Metric name -> the node labels it has, from the API's /metrics."""
    out: dict[str, set[str]] = {}
    for row in httpx.get(f"{url}/metrics", trust_env=False).text.splitlines():
        if row.startswith("execbox_node") and 'node="' in row:
            name = row.split("{", 1)[0]
            out.setdefault(name, set()).add(row.split('node="', 1)[1].split('"', 1)[0])
    return out


def test_output_streams_through_a_node_and_metrics_show_each_live_node(
    cluster: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api, c = cluster
    a = c.node("node-a")
    port = free_port()
    popen = subprocess.Popen
    with monkeypatch.context() as m:  # node-b with its own /metrics: the fixture's command, one flag more
        m.setattr(subprocess, "Popen", lambda args, **kw: popen([*args, "--metrics-port", str(port)], **kw))
        b = c.node("node-b")
    eventually(lambda: c.live() == {"node-a", "node-b"}, 90, what="both nodes to be live")
    own = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
    assert 'execbox_node_slots{node="node-b"} 2.0' in own and "execbox_pool_ready " in own
    with httpx.Client(trust_env=False, timeout=60) as client:
        # Chunks in order, each as it is written, then the result.
        events = list(sse(client, api.url, {"language": "python", "code": SLOW, "timeout": 20}))
        kinds = [e for _, e, _ in events]
        assert kinds[-1] == "result" and set(kinds[:-1]) == {"stdout", "stderr"}, kinds
        result = events[-1][2]
        assert result["node"] in {"node-a", "node-b"} and result["exit_code"] == 0
        out = "".join(d["data"] for _, e, d in events if e == "stdout")
        assert out == result["stdout"] == "".join(f"line {i}\n" for i in range(5))
        assert "".join(d["data"] for _, e, d in events if e == "stderr") == result["stderr"] == "bye\n"
        first = next(t for t, e, _ in events if e == "stdout")
        assert events[-1][0] - first > 1.5  # the first line came while the program still had 4 pauses to go

        # Truncation as in-process: what streams is what the result keeps.
        capped = {"language": "python", "code": "print('y' * 50000)", "limits": {"output_bytes": 1000}}
        events = list(sse(client, api.url, capped))
        result = events[-1][2]
        streamed = "".join(d["data"] for _, e, d in events if e == "stdout")
        assert result["output_truncated"] and streamed == result["stdout"] == "y" * 1000

        # The client and the CLI stream unchanged against a nodes-mode server.
        with Client(api.url, trust_env=False) as ec:
            got = list(ec.stream(SLOW, language="python", timeout=20))
            assert [e.kind for e in got][-1] == "result" and got[-1].result is not None
            assert "".join(e.data for e in got if e.kind == "stdout") == got[-1].result.stdout
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXECBOX_")}
        started = time.monotonic()
        cli = subprocess.Popen(
            [sys.executable, "-m", "execbox.cli", "run", "--server", api.url, "-l", "python", "-c", SLOW],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert cli.stdout is not None
        line = cli.stdout.readline()
        at_first = time.monotonic()
        rest, err = cli.communicate(timeout=60)
        ended = time.monotonic()
        assert cli.returncode == 0, err
        assert line + rest == "".join(f"line {i}\n" for i in range(5)).encode() and b"bye" in err
        assert ended - at_first > 1.5, (at_first - started, ended - started)

        # Per-node series: both nodes, with what they published (the runs above included).
        def both() -> dict[str, set[str]] | None:
            series = node_series(api.url)
            want = {
                "execbox_node_slots",
                "execbox_node_running",
                "execbox_node_healthy",
                "execbox_node_ready_sandboxes",
            }
            ok = all(series.get(name) == {"node-a", "node-b"} for name in want)
            return series if ok and series.get("execbox_node_runs_total") else None

        series = eventually(both, 30, interval=0.2, what="series of both nodes")
        assert series["execbox_node_runs_total"] <= {"node-a", "node-b"}
        text = httpx.get(f"{api.url}/metrics", trust_env=False).text
        assert "execbox_nodes_live 2.0" in text
        total = sum(
            float(row.rsplit(" ", 1)[1])
            for row in text.splitlines()
            if row.startswith("execbox_node_runs_total{") and 'outcome="ok"' in row
        )
        assert total >= 4  # the SLOW run, the capped one, the client's and the CLI's

    b.stop()  # a stopped node's series are gone at the next scrape
    series = node_series(api.url)
    assert "node-b" not in set().union(*series.values()) and series["execbox_node_slots"] == {"node-a"}
    with pytest.raises(httpx.TransportError):  # its own endpoint went with it
        httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=5)
    a.stop()


def test_a_node_killed_mid_stream_ends_the_stream_with_node_lost(cluster: Any) -> None:  # noqa: F811
    api, c = cluster
    a = c.node("node-a")
    eventually(lambda: c.live() == {"node-a"}, 90, what="node-a to be live")
    code = "import time\nfor i in range(100):\n    print(i, flush=True); time.sleep(0.5)"
    body = {"language": "python", "code": code, "timeout": 60}
    seen: list[tuple[float, str, Any]] = []
    with httpx.Client(trust_env=False, timeout=120) as client:
        started = time.monotonic()
        got: list[tuple[float, str, Any]] = []
        reader = threading.Thread(target=lambda: got.extend(sse(client, api.url, body)))
        reader.start()

        def first_line() -> list[tuple[float, str, Any]] | None:
            chunks = [e for e in got if e[1] == "stdout"]
            return chunks if "\n" in "".join(e[2]["data"] for e in chunks) else None

        seen = eventually(first_line, 60, what="the first line")
        os.kill(a.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        reader.join(120)
        assert not reader.is_alive()
    # Chunk boundaries are the pipe's ("0" and "\n" came apart once): the text is in order.
    assert "".join(e[2]["data"] for e in seen).startswith("0\n")
    assert "".join(e[2]["data"] for e in got if e[1] == "stdout").startswith("0\n")
    _, last, err = got[-1]
    assert last == "error" and err["type"] == "node_lost" and "node-a" in err["message"], got[-3:]
    assert all(e == "stdout" for _, e, _ in got[:-1])
    assert got[-1][0] - started < 60 + 15  # within the run's timeout + the grace (a bound, not a timing)
    assert got[-1][0] >= killed
