"""Server-sent events: encoding, and a response that no proxy or browser will buffer."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"
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


class EventStreamResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[bytes]):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
