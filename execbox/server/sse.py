"""Server-sent events of a running call: output chunks as they come, then the result (or an error).

Used by ``POST /v1/execute`` and ``POST /v1/sessions/{id}/execute`` alike.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..exceptions import ExecboxError
from ..executor import OutputCallback
from .errors import ApiError, from_library
from .service import ExecutionService

__all__ = ["KEEPALIVE_SECONDS", "SSE_SCHEMA", "sse_doc", "stream_events", "wants_stream"]

log = logging.getLogger("execbox.server")

KEEPALIVE_SECONDS = 15.0


def sse_doc(what: str) -> str:
    return (
        "With `Accept: text/event-stream` or `?stream=true` the answer is a stream of server-sent events: "
        f'`stdout` and `stderr` events (`{{"data": "<text>"}}`) as {what} writes, then one `result` event '
        "(the result object) or one `error` event (an error object) and the end of the stream."
    )


SSE_SCHEMA = {
    "type": "object",
    "description": "One server-sent event.",
    "properties": {
        "event": {
            "type": "string",
            "enum": ["stdout", "stderr", "result", "error"],
            "description": "Output chunk, the final result, or the error that ended the call.",
        },
        "data": {
            "type": "string",
            "description": 'JSON: {"data": "<text>"} for output, the result object, or {type, message, field}.',
        },
    },
    "required": ["data"],
}


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_events(
    service: ExecutionService,
    work: Callable[[OutputCallback], Awaitable[BaseModel]],
    release: Callable[[], None],
) -> StreamingResponse:
    """Run ``work(on_output)`` as a task of its own and stream what it writes; ``release()`` at its end."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_output(stream: str, chunk: bytes) -> None:
        # Called on a worker thread; output is capped by limits.output_bytes, so the queue is bounded.
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (stream, chunk))
        except RuntimeError:  # the loop is gone (shutdown): the result still completes
            pass

    async def run() -> None:
        try:
            queue.put_nowait(("result", await work(on_output)))
        except ApiError as exc:
            queue.put_nowait(("error", exc))
        except ExecboxError as exc:
            queue.put_nowait(("error", from_library(exc)))
        except Exception as exc:
            log.exception("streamed call failed")
            queue.put_nowait(("error", ApiError(500, "internal_error", type(exc).__name__)))
        finally:
            release()

    # The call is a task of its own: if the client goes away, it still finishes and frees its slots.
    service.spawn(run())

    async def events() -> AsyncIterator[bytes]:
        decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
        while True:
            try:
                kind, item = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if kind in decoders:
                text = decoders[kind].decode(item)
                if text:
                    yield _sse(kind, {"data": text})
                continue
            for name, dec in decoders.items():
                tail = dec.decode(b"", final=True)
                if tail:
                    yield _sse(name, {"data": tail})
            if kind == "result":
                yield _sse("result", item.model_dump(mode="json"))
            else:
                err: ApiError = item
                yield _sse("error", {"type": err.type, "message": err.message, "field": err.field})
            return

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def wants_stream(stream: bool, accept: str | None) -> bool:
    return stream or "text/event-stream" in (accept or "")
