"""Server-sent events: encoding, and a response that no proxy or browser will buffer."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"  # an SSE comment: clients skip it; proxies see bytes flowing
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx and friends: pass each event through at once
    "Connection": "keep-alive",
}


def data_event(text: str, event: str | None = None) -> bytes:
    """One event; text with line breaks becomes several `data:` lines, as the SSE spec requires."""
    if "\n" in text or "\r" in text:
        lines = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(text))
    else:  # the common case on the per-token path (JSON chunks never contain line breaks)
        lines = f"data: {text}\n"
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}{lines}\n".encode()


def json_event(payload: dict, event: str | None = None) -> bytes:
    return data_event(json.dumps(payload, ensure_ascii=False, separators=(",", ":")), event)


async def with_pings(chunks: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """`chunks`, with a PING after every `interval` seconds without one. The next chunk is awaited
    in a task that a ping does not disturb (cancelling an async generator's step would end it)."""
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield PING
                continue
            step, pending = pending, None
            try:
                chunk = step.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()  # ends `chunks` where it waits
        elif hasattr(chunks, "aclose"):
            await chunks.aclose()


class EventStreamResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[bytes]):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
