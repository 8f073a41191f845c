"""Streaming a dispatched run's output through Redis, and the per-node metrics, piece by piece:
the merging of chunks, the node's pump and the API's relay over a real Redis, a ``Node`` and a
``Dispatcher`` on one loop over the in-package local engine (no Docker), and the metric
families built from node statuses. The real processes are in ``test_nodes_stream.py``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest

from execbox import Executor, node_stream
from execbox.engine.local import LocalEngine
from execbox.models import ExecutionRequest, Limits
from execbox.node import GROUP, RUNS, Node
from execbox.node_stream import ENTRY_CHARS, OutputPump, pack, stream_receiver
from execbox.queue import StreamQueue
from execbox.server.dispatch import Dispatcher
from execbox.server.errors import ApiError
from execbox.server.node_metrics import (
    NodeCollector,
    NodeSelfCollector,
    node_families,
    parse_listen,
    serve_node_metrics,
)
from execbox.state.keys import node_key, output_key, run_key

Body = Callable[[aioredis.Redis, str], Awaitable[None]]


@pytest.fixture
def run(redis_url: str) -> Iterator[Callable[[Body], None]]:
    """Run an async test body with a client of an emptied database of these tests' own."""
    url = redis_url.rsplit("/", 1)[0] + "/11"

    def runner(body: Body) -> None:
        async def main() -> None:
            r = aioredis.Redis.from_url(url, decode_responses=True)
            await r.flushdb()
            try:
                await body(r, url)
            finally:
                await r.flushdb()
                await r.aclose()

        asyncio.run(main())

    yield runner


def test_pack_keeps_order_merges_neighbours_and_bounds_entries_by_characters() -> None:
    chunks = [("stdout", "a"), ("stdout", "b"), ("stderr", "c"), ("stdout", "d"), ("stdout", "e")]
    assert pack(chunks) == [[("stdout", "ab"), ("stderr", "c"), ("stdout", "de")]]
    assert pack([("stdout", "abcdefg"), ("stderr", "hi")], limit=3) == [
        [("stdout", "abc")],
        [("stdout", "def")],
        [("stdout", "g"), ("stderr", "hi")],
    ]
    assert pack([]) == []
    assert [len(g[0][1]) for g in pack([("stderr", "x" * (ENTRY_CHARS + 1))])] == [ENTRY_CHARS, 1]
    # Any interleaving: as many groups as the characters need, not one per switch of stream.
    interleaved = [("stdout" if i % 2 else "stderr", "z") for i in range(10_000)]
    groups = pack(interleaved, limit=1000)
    assert len(groups) == 10 and [c for g in groups for c in g] == interleaved


def test_the_pump_carries_chunks_from_a_thread_in_order_then_the_answer(run: Callable[[Body], None]) -> None:
    async def body(r: aioredis.Redis, url: str) -> None:
        pump = OutputPump(r, "run1", ttl=30)
        euro = "€".encode()  # split across two chunks: decoded whole, as in-process

        def program() -> None:
            for i in range(200):
                pump.on_output("stdout", f"{i}\n".encode())
                if i == 100:
                    pump.on_output("stderr", euro[:1])
                    pump.on_output("stderr", euro[1:])

        await asyncio.to_thread(program)
        await pump.finish(json.dumps({"result": "done"}))
        assert 0 < await r.pttl(output_key("run1")) <= 30_000  # every key has a TTL
        assert await r.xlen(output_key("run1")) <= 200 + 1  # one entry per batch (merged while an XADD ran)

        seen: list[tuple[str, bytes]] = []
        receive, drop = stream_receiver(r, "run1", lambda s, c: seen.append((s, c)), batch=7)
        answer = await receive(1.0)
        while answer is None:  # output first, in batches: the answer after all of it
            answer = await receive(1.0)
        assert answer == {"result": "done"}
        out = b"".join(c for s, c in seen if s == "stdout").decode()
        assert out == "".join(f"{i}\n" for i in range(200))
        assert [c for s, c in seen if s == "stderr"] == [euro]
        assert await receive(None) is None  # nothing after the answer

        # The last look (not blocking) reads through any number of entries to the answer.
        many = OutputPump(r, "run5", ttl=30)
        for i in range(300):
            await many._add([{"c": json.dumps([["stdout", f"{i},"]])}])
        await many.finish(json.dumps({"result": "late"}))
        tail: list[bytes] = []
        last_look, drop_late = stream_receiver(r, "run5", lambda s, c: tail.append(c), batch=7)
        assert await last_look(None) == {"result": "late"} and len(tail) == 300
        await drop_late()
        await drop()
        assert not await r.exists(output_key("run1"))

    run(body)


def test_past_the_fast_entries_the_pump_adds_one_batch_per_interval(
    run: Callable[[Body], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound on the stream's length: a program writing all the time, switching streams at every
    write, adds one entry per interval once past the fast ones, with everything in order."""
    monkeypatch.setattr(node_stream, "FAST_ENTRIES", 3)

    async def body(r: aioredis.Redis, url: str) -> None:
        pump = OutputPump(r, "run4", ttl=30)
        writes = [("stdout" if i % 2 else "stderr", f"{i},".encode()) for i in range(400)]

        def program() -> None:
            for name, chunk in writes:
                pump.on_output(name, chunk)
                time.sleep(0.001)

        started = time.monotonic()
        await asyncio.to_thread(program)
        await pump.finish("{}")
        elapsed = time.monotonic() - started
        assert pump.entries <= 3 + elapsed / node_stream.SLOW_INTERVAL + 2 < len(writes)
        seen: list[tuple[str, bytes]] = []
        receive, _ = stream_receiver(r, "run4", lambda n, c: seen.append((n, c)))
        while await receive(1.0) is None:
            pass
        assert seen == writes  # every switch of stream kept, in order

    run(body)


def test_an_unfinished_stream_answers_nothing_and_the_relay_returns_to_look_at_liveness(
    run: Callable[[Body], None],
) -> None:
    async def body(r: aioredis.Redis, url: str) -> None:
        pump = OutputPump(r, "run2", ttl=30)
        seen: list[bytes] = []
        receive, _ = stream_receiver(r, "run2", lambda s, c: seen.append(c))
        assert await receive(None) is None
        pump.on_output("stdout", b"partial")
        started = time.monotonic()
        assert await receive(0.3) is None  # output, but no answer: back after the block time
        assert time.monotonic() - started > 0.25 and seen == [b"partial"]  # it waited out the block time
        await pump.cancel()

    run(body)


def test_a_dispatched_run_streams_through_a_node_on_the_local_engine(run: Callable[[Body], None]) -> None:
    """A Node and a Dispatcher on one loop, over a real Redis: chunks in order, before the result;
    the output cap truncates as in-process; a request the library refuses is its 422."""

    async def body(r: aioredis.Redis, url: str) -> None:
        eng = LocalEngine()
        ex = Executor(engine=eng, image="execbox-sandbox:test", pool=False, node_name="local-1")  # type: ignore[arg-type]
        node = Node(ex, r, "local-1", slots=2, ttl=3)
        stop = asyncio.Event()
        serving = asyncio.create_task(node.serve(stop))
        dispatcher = Dispatcher(url)
        await dispatcher.start()
        try:
            events: list[tuple[float, str, bytes]] = []

            def on_output(stream: str, chunk: bytes) -> None:
                events.append((time.monotonic(), stream, chunk))

            code = (
                "import sys, time\nfor i in range(4):\n    print(i, flush=True); time.sleep(0.3)\n"
                "print('e', file=sys.stderr)"
            )
            request = ExecutionRequest(language="python", code=code, limits=Limits(timeout=10))
            result = await dispatcher.run("t", request, None, on_output)
            done = time.monotonic()
            assert result.node == "local-1" and result.exit_code == 0
            assert b"".join(c for _, s, c in events if s == "stdout").decode() == result.stdout == "0\n1\n2\n3\n"
            assert b"".join(c for _, s, c in events if s == "stderr").decode() == result.stderr == "e\n"
            assert done - events[0][0] > 0.6  # the first chunk came while the program still slept

            events.clear()
            capped = ExecutionRequest(
                language="python", code="print('x' * 5000)", limits=Limits(timeout=10, output_bytes=100)
            )
            result = await dispatcher.run("t", capped, None, on_output)
            streamed = b"".join(c for _, s, c in events if s == "stdout").decode()
            assert result.output_truncated and streamed == result.stdout == "x" * 100

            bad = ExecutionRequest(language="python", code="1", volume=True, limits=Limits(timeout=10))
            with pytest.raises(Exception, match="user_id"):
                await dispatcher.run("t", bad, None, on_output)
            assert not [k async for k in r.scan_iter("execbox:out:*")]  # the relay dropped each stream
            plain = ExecutionRequest(language="python", code="print(2)", limits=Limits(timeout=10))
            assert (await dispatcher.run("t", plain, None)).stdout == "2\n"  # not streamed: the reply list
            assert await dispatcher.queue.pending_count() == 0  # every entry acknowledged with its answer...
            assert await r.xlen(dispatcher.queue.key) == 0  # ...and deleted
            assert node.status()["runs"] == {"ok": 3, "failed": 1}
        finally:
            stop.set()
            await serving
            await dispatcher.close()
            ex.close()
            eng.close()

    run(body)


def test_a_streaming_run_whose_holder_is_gone_is_node_lost(run: Callable[[Body], None]) -> None:
    """A 'node' that takes the run, streams a chunk and vanishes: the relay passes the chunk on, then
    answers node_lost naming it once its liveness key is gone (known as the holder from the moment
    Redis delivered the entry to it)."""

    async def body(r: aioredis.Redis, url: str) -> None:
        dispatcher = Dispatcher(url)
        await dispatcher.start()
        seen: list[bytes] = []

        async def ghost() -> None:
            # It never writes the run key: the caller knows its holder from the group's pending list.
            await r.set(node_key("ghost"), "{}", px=1500)
            entry = None
            while entry is None:
                entry = await StreamQueue(r, RUNS, GROUP, "ghost").read(0.2)
            run_id = entry.fields["id"]
            assert entry.fields["stream"] == "1" and not await r.exists(run_key(run_id))
            pump = OutputPump(r, run_id, ttl=30)
            pump.on_output("stdout", b"hello\n")
            await asyncio.sleep(0.2)
            await pump.cancel()  # and never answers; its key expires

        task = asyncio.create_task(ghost())
        request = ExecutionRequest(language="python", code="1", limits=Limits(timeout=30))
        with pytest.raises(ApiError) as caught:
            await dispatcher.run("t", request, None, lambda s, c: seen.append(c))
        await task
        # Noticed by its liveness key, not by the deadline ("did not answer in time").
        assert caught.value.type == "node_lost"
        assert caught.value.message == "node ghost was lost while running this execution"
        assert seen == [b"hello\n"]
        await dispatcher.close()

    run(body)


def test_node_families_label_each_live_node_and_a_missing_one_has_none() -> None:
    statuses: list[dict[str, Any]] = [
        {
            "name": "a",
            "slots": 4,
            "running": 1,
            "healthy": True,
            "last_seen": 100.5,
            "ready": {"python": 2, "javascript+egress": 1},
            "runs": {"ok": 7, "failed": 1},
        },
        {"name": "b", "slots": 2, "running": 0, "healthy": False, "last_seen": 99.0, "ready": {}},
    ]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in node_families(statuses) for s in f.samples}
    assert samples[("execbox_nodes_live", ())] == 2
    assert samples[("execbox_node_slots", (("node", "a"),))] == 4
    assert samples[("execbox_node_running", (("node", "a"),))] == 1
    assert samples[("execbox_node_healthy", (("node", "b"),))] == 0
    assert samples[("execbox_node_ready_sandboxes", (("node", "a"), ("profile", "javascript+egress")))] == 1
    assert samples[("execbox_node_runs_total", (("node", "a"), ("outcome", "ok")))] == 7
    assert samples[("execbox_node_last_seen_timestamp_seconds", (("node", "b"),))] == 99.0
    assert not any(dict(labels).get("node") == "c" for _, labels in samples)

    current = statuses

    async def read() -> list[dict[str, Any]]:
        return current

    collector = NodeCollector(read)
    registry = CollectorRegistry()
    registry.register(collector)
    asyncio.run(collector.refresh())
    text = generate_latest(registry).decode()
    assert 'execbox_node_slots{node="a"} 4.0' in text and 'execbox_node_slots{node="b"} 2.0' in text
    current = statuses[:1]  # b stopped: its key is gone
    asyncio.run(collector.refresh())
    text = generate_latest(registry).decode()
    assert 'node="b"' not in text and 'execbox_node_slots{node="a"} 4.0' in text

    async def broken() -> list[dict[str, Any]]:
        raise ConnectionError("redis down")

    failing = NodeCollector(broken)
    asyncio.run(failing.refresh())
    assert [s.value for f in failing.collect() for s in f.samples] == [0.0]  # live = 0, no node series


def test_threads_calling_on_output_after_the_loop_closed_do_not_raise(run: Callable[[Body], None]) -> None:
    holder: list[OutputPump] = []

    async def body(r: aioredis.Redis, url: str) -> None:
        holder.append(OutputPump(r, "run3", ttl=5))
        await holder[0].cancel()

    run(body)
    t = threading.Thread(target=holder[0].on_output, args=("stdout", b"late"))
    t.start()
    t.join()


def test_parse_listen_takes_a_port_or_host_and_port() -> None:
    assert parse_listen("9100") == ("127.0.0.1", 9100)
    assert parse_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    for bad in ("", "x", "0", "70000", ":9100", "host:", "host:port"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_a_nodes_own_metrics_endpoint_serves_its_status_and_pool() -> None:
    status = {"name": "n1", "slots": 2, "running": 1, "healthy": True, "ready": {"python": 2}, "runs": {"ok": 3}}
    collector = NodeSelfCollector(lambda: status, lambda: {"hits": 5, "miss_wait_ms": 1.5, "ready": 2})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = serve_node_metrics(str(port), collector)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
    finally:
        stop()
    assert 'execbox_node_running{node="n1"} 1.0' in text
    assert 'execbox_node_runs_total{node="n1",outcome="ok"} 3.0' in text
    assert "execbox_pool_hits 5.0" in text and "execbox_pool_miss_wait_ms 1.5" in text
    with pytest.raises(httpx.TransportError):  # stopped: nothing listens there any more
        httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=2)


def test_a_bad_metrics_port_is_refused_before_the_node_starts() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECBOX_")}
    done = subprocess.run(
        [sys.executable, "-m", "execbox.cli", "node", "--queue-url", "redis://127.0.0.1:1/0", "--metrics-port", "x:y"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode != 0 and "--metrics-port" in done.stderr and "'x:y'" in done.stderr, done.stderr


def test_a_dispatched_request_carries_its_secrets_values_to_the_node(run: Callable[[Body], None]) -> None:
    """What a node reads from the queue is the request as it must run: secret values included
    (a pydantic dump masks them), the rest unchanged."""

    async def body(r: aioredis.Redis, url: str) -> None:
        dispatcher = Dispatcher(url)
        await dispatcher.start()
        node = StreamQueue(r, RUNS, GROUP, "stand-in")
        try:
            request = ExecutionRequest(
                language="python",
                code="print(1)",
                network={"mode": "proxy", "allow": ["api.example.test"]},
                secrets={"TOKEN": {"value": "s3cret-value", "hosts": ["api.example.test"]}},
                limits=Limits(timeout=5),
            )
            call = asyncio.create_task(dispatcher.run("t", request, None))
            entry = None
            while entry is None:
                entry = await node.read(1.0)
            sent = ExecutionRequest.model_validate_json(entry.fields["request"])
            assert sent.secrets["TOKEN"].value.get_secret_value() == "s3cret-value"
            assert sent.model_dump() == request.model_dump()
            call.cancel()
        finally:
            await dispatcher.close()

    run(body)
