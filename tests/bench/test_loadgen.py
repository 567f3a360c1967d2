"""The load client against a raw socket server that answers exactly as told: how it reads one
streamed answer (a refusal that arrives as an error event is refused, not lost), its HTTP/1.1
framing (chunks that split lines, Content-Length bodies, keep-alive), and what it does when a
kept-alive connection was dropped or the server never answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from tokenmill.bench.http1 import Http1Client
from tokenmill.bench.loadgen import stream_one

Answer = Callable[[int, int], Awaitable[bytes | None]]  # (connection number, request on it) -> bytes; None: close


class RawServer:
    """Reads each request (headers and a Content-Length body) and writes what `answer` gives."""

    def __init__(self, answer: Answer):
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self._handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        number = self.connections
        try:
            for on_connection in range(1_000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                self.requests.append(head + await reader.readexactly(length))
                answer = await self.answer(number, on_connection)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        writer.close()


def chunked(*pieces: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + body
        + b"0\r\n\r\n"
    )


def sse(*events: dict | str) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events)


def token(text: str) -> dict:
    return {"choices": [{"delta": {"content": text}}]}


BODY = {"model": "m", "messages": []}


@pytest.mark.parametrize(
    ("error", "status", "http_status"),
    [
        ({"type": "server_overloaded", "code": "queue_timeout", "message": "waited"}, "rejected", 503),
        ({"type": "rate_limit_error", "code": "tokens_per_minute_exceeded", "message": "quota"}, "rejected", 429),
        ({"type": "server_error", "code": "engine_failure", "message": "broke"}, "error", 200),
    ],
)
async def test_an_error_event_is_a_refusal_only_when_it_says_retry_later(error, status, http_status):
    async def answer(connection: int, request: int) -> bytes:
        return chunked(b": ping\n\n", sse({"error": error}, "[DONE]"))

    async with RawServer(answer) as url, Http1Client(url) as client:
        record = await stream_one(client, BODY, 0.0)
    assert (record.status, record.http_status, record.error) == (status, http_status, error["message"])


async def test_lines_split_across_chunks_are_read_whole_and_the_connection_is_kept():
    """uvicorn frames each SSE event as a chunk, but nothing promises it: an event cut in three
    chunks is still one token, and two answers read to their end share one connection."""
    stream = sse(token("a"), token("b"), {"choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": 5}})
    stream += sse("[DONE]")

    async def answer(connection: int, request: int) -> bytes:
        return chunked(stream[:7], stream[7:40], stream[40:])

    raw = RawServer(answer)
    async with raw as url, Http1Client(url, {"Authorization": "Bearer k"}) as client:
        first = await stream_one(client, BODY, 0.0)
        second = await stream_one(client, BODY, 0.0)
    for record in (first, second):
        assert (record.status, record.output_tokens, record.prompt_tokens) == ("ok", 2, 5)
        assert record.ttft is not None and len(record.gaps) == 1
    assert raw.connections == 1 and len(raw.requests) == 2
    assert b"authorization: Bearer k\r\n" in raw.requests[0] and raw.requests[0].endswith(
        b'{"model":"m","messages":[]}'
    )


async def test_a_refusal_keeps_its_retry_after_and_its_connection():
    async def answer(connection: int, request: int) -> bytes:
        body = b'{"error": {"type": "server_overloaded"}}'
        return b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    raw = RawServer(answer)
    async with raw as url, Http1Client(url) as client:
        records = [await stream_one(client, BODY, 0.0) for _ in range(3)]
    assert [(r.status, r.http_status, r.retry_after) for r in records] == [("rejected", 503, 7.0)] * 3
    assert raw.connections == 1


async def test_a_kept_alive_connection_dropped_before_any_answer_is_tried_once_more():
    """llama-server closes kept-alive connections now and then; the request never reached it."""
    ok = chunked(sse(token("hi"), "[DONE]"))

    async def drops_its_second(connection: int, request: int) -> bytes | None:
        return ok if request == 0 else None

    raw = RawServer(drops_its_second)
    async with raw as url, Http1Client(url) as client:
        assert (await stream_one(client, BODY, 0.0)).status == "ok"
        record = await stream_one(client, BODY, 0.0)  # sent on the kept connection, dropped, sent again
    assert (record.status, record.output_tokens, len(raw.requests), raw.connections) == ("ok", 1, 3, 2)

    async def drops_all_but_the_first(connection: int, request: int) -> bytes | None:
        return ok if connection == 1 and request == 0 else None

    raw = RawServer(drops_all_but_the_first)
    async with raw as url, Http1Client(url) as client:
        await stream_one(client, BODY, 0.0)
        record = await stream_one(client, BODY, 0.0)
    assert record.status == "error" and "no answer" in (record.error or "") and len(raw.requests) == 3


async def test_a_server_that_never_answers_is_a_timeout_not_a_hang():
    async def silent(connection: int, request: int) -> bytes:
        await asyncio.sleep(30)
        return b""

    async with RawServer(silent) as url, Http1Client(url, timeout=0.3) as client:
        record = await asyncio.wait_for(stream_one(client, BODY, 0.0), 5)
    assert record.status == "timeout"
