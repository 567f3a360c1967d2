"""The load client's reading of one streamed answer: a refusal that arrives as an error event
(the request was queued long enough to get its headers and pings) is refused, not lost."""

from __future__ import annotations

import json

import httpx
import pytest

from tokenmill.bench.loadgen import stream_one


def _stream_ending_with(error: dict) -> httpx.MockTransport:
    body = b": ping\n\n" + b"data: " + json.dumps({"error": error}).encode() + b"\n\ndata: [DONE]\n\n"
    return httpx.MockTransport(lambda request: httpx.Response(200, content=body))


@pytest.mark.parametrize(
    ("error", "status", "http_status"),
    [
        ({"type": "server_overloaded", "code": "queue_timeout", "message": "waited"}, "rejected", 503),
        ({"type": "rate_limit_error", "code": "tokens_per_minute_exceeded", "message": "quota"}, "rejected", 429),
        ({"type": "server_error", "code": "engine_failure", "message": "broke"}, "error", 200),
    ],
)
async def test_an_error_event_is_a_refusal_only_when_it_says_retry_later(error, status, http_status):
    async with httpx.AsyncClient(transport=_stream_ending_with(error), base_url="http://test") as client:
        record = await stream_one(client, {"model": "m", "messages": []}, 0.0)
    assert (record.status, record.http_status, record.error) == (status, http_status, error["message"])


async def test_a_connection_dropped_before_any_answer_is_tried_once_more():
    """llama-server closes kept-alive connections now and then; the request never reached it."""
    answer = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: [DONE]\n\n'
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, content=answer)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test") as client:
        record = await stream_one(client, {"model": "m", "messages": []}, 0.0)
    assert (record.status, record.output_tokens, len(calls)) == ("ok", 1, 2)

    def always_dropped(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    calls.clear()
    async with httpx.AsyncClient(transport=httpx.MockTransport(always_dropped), base_url="http://test") as client:
        record = await stream_one(client, {"model": "m", "messages": []}, 0.0)
    assert record.status == "error" and "disconnected" in (record.error or "") and len(calls) == 2
