"""tokenmill.client against scripted transports: retries, backoff, budget, timeouts, pool."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tokenmill.client import (
    APIStatusError,
    ConnectionFailed,
    LLMClient,
    MalformedResponse,
    RetryBudget,
    RetryPolicy,
    StreamError,
    SyncLLMClient,
    TimedOut,
    Timeouts,
)
from tokenmill.client.policy import parse_retry_after

CHAT = [{"role": "user", "content": "hi"}]


def sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def delta(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


STREAM = sse(
    delta("Hel"),
    delta("lo"),
    delta("", "stop"),
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
    "[DONE]",
)
REPLY = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2},
}


class Script:
    """A transport answering each call with the next scripted response (or exception)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def sleeps(monkeypatch):
    """Record backoff sleeps instead of waiting them out."""
    recorded: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds, *args):
        recorded.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr("tokenmill.client.core.asyncio.sleep", fake_sleep)
    return recorded


def client(script, **options) -> LLMClient:
    return LLMClient("http://upstream.test", transport=httpx.MockTransport(script), **options)


async def test_chat_and_stream_and_usage():
    async with client(Script(httpx.Response(200, json=REPLY), httpx.Response(200, content=STREAM))) as llm:
        reply = await llm.chat(CHAT, max_tokens=4)
        assert (reply.text, reply.finish_reason, reply.usage.completion_tokens) == ("Hello", "stop", 2)
        events = [e async for e in llm.stream_chat_events(CHAT)]
        assert [getattr(e, "text", None) for e in events[:2]] == ["Hel", "lo"]
        assert events[-1].finish_reason == "stop" and events[-1].usage.prompt_tokens == 3


async def test_503_and_429_are_retried_with_backoff_honouring_retry_after(sleeps):
    script = Script(
        httpx.Response(503, json={"error": {"message": "busy", "code": "overloaded"}}, headers={"Retry-After": "2"}),
        httpx.Response(429, json={"error": {"message": "slow down"}}),
        httpx.Response(200, content=STREAM),
    )
    async with client(script) as llm:
        assert "".join([t async for t in llm.stream_chat(CHAT)]) == "Hello"
    assert script.calls == 3
    assert sleeps[0] >= 2.0  # Retry-After is a floor
    assert 0.0 <= sleeps[1] <= 0.5  # full jitter: uniform(0, base * 2**1)


async def test_connection_errors_are_retried_then_reported(sleeps):
    script = Script(*[httpx.ConnectError("refused")] * 4)
    async with client(script, retry=RetryPolicy(max_attempts=4)) as llm:
        with pytest.raises(ConnectionFailed):
            await llm.chat(CHAT)
    assert script.calls == 4 and len(sleeps) == 3


async def test_other_errors_are_not_retried(sleeps):
    script = Script(httpx.Response(400, json={"error": {"message": "bad temperature", "code": "invalid"}}))
    async with client(script) as llm:
        with pytest.raises(APIStatusError) as raised:
            await llm.chat(CHAT)
    assert raised.value.status == 400 and raised.value.server_message == "bad temperature" and script.calls == 1


async def test_a_started_stream_is_never_retried(sleeps):
    class Breaks(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield sse(delta("Hel"))
            raise httpx.ReadError("connection reset")

    script = Script(httpx.Response(200, stream=Breaks()), httpx.Response(200, content=STREAM))
    async with client(script) as llm:
        got = []
        with pytest.raises(ConnectionFailed):
            async for text in llm.stream_chat(CHAT):
                got.append(text)
    assert got == ["Hel"] and script.calls == 1 and sleeps == []


async def test_retry_budget_stops_a_retry_storm(sleeps):
    script = Script(*[httpx.Response(503, json={"error": {"message": "down"}})] * 50)
    budget = RetryBudget(ratio=0.1, reserve=2)
    async with client(script, budget=budget) as llm:
        for _ in range(5):
            with pytest.raises(APIStatusError):
                await llm.chat(CHAT)
    # 5 calls, each may try 4 times; the budget allows 2 retries up front plus 0.1 per call
    assert len(sleeps) <= 3 and script.calls <= 5 + 3


async def test_timeouts_first_token_and_between_tokens():
    class Slow(httpx.AsyncByteStream):
        def __init__(self, first: float, gap: float):
            self.first, self.gap = first, gap

        async def __aiter__(self):
            await asyncio.sleep(self.first)
            yield sse(delta("a"))
            await asyncio.sleep(self.gap)
            yield sse(delta("b"), "[DONE]")

    timeouts = Timeouts(first_token=0.2, between_tokens=0.2)
    async with client(Script(httpx.Response(200, stream=Slow(0.6, 0))), timeouts=timeouts) as llm:
        with pytest.raises(TimedOut) as raised:
            [t async for t in llm.stream_chat(CHAT)]
        assert raised.value.phase == "first_token"
    async with client(Script(httpx.Response(200, stream=Slow(0, 0.6))), timeouts=timeouts) as llm:
        got = []
        with pytest.raises(TimedOut) as raised:
            async for text in llm.stream_chat(CHAT):
                got.append(text)
        assert raised.value.phase == "between_tokens" and got == ["a"]

    # a long healthy stream is not cut: 5 gaps of 0.1 s under a 0.2 s between-token timeout
    class Steady(httpx.AsyncByteStream):
        async def __aiter__(self):
            for _ in range(5):
                await asyncio.sleep(0.1)
                yield sse(delta("x"))
            yield sse("[DONE]")

    async with client(Script(httpx.Response(200, stream=Steady())), timeouts=timeouts) as llm:
        assert "".join([t async for t in llm.stream_chat(CHAT)]) == "xxxxx"


async def test_error_events_and_garbage_are_reported():
    error_stream = sse(delta("a"), {"error": {"message": "engine died", "code": "engine_failure"}}, "[DONE]")
    async with client(
        Script(httpx.Response(200, content=error_stream), httpx.Response(200, content=b"data: {nope\n\n"))
    ) as llm:
        with pytest.raises(StreamError, match="engine died"):
            [t async for t in llm.stream_chat(CHAT)]
        with pytest.raises(MalformedResponse):
            [t async for t in llm.stream_chat(CHAT)]


async def test_pool_size_is_what_was_configured():
    llm = LLMClient("http://upstream.test", pool_size=7)
    pool = llm._http._transport._pool
    assert pool._max_connections == 7 and pool._max_keepalive_connections == 7
    await llm.aclose()
    with pytest.raises(ValueError):
        LLMClient("http://upstream.test", pool_size=0)


def test_retry_after_parsing_and_sync_wrapper():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0 + 1e-9  # a date in the past: now
    script = Script(httpx.Response(200, json=REPLY), httpx.Response(200, content=STREAM))
    with SyncLLMClient("http://upstream.test", transport=httpx.MockTransport(script)) as llm:
        assert llm.chat(CHAT).text == "Hello"
        assert list(llm.stream_chat(CHAT)) == ["Hel", "lo"]


async def test_the_first_token_deadline_covers_a_server_that_never_sends_headers():
    # A real TCP server that accepts, reads the request and never answers: before, the stream
    # waited with read=None for headers that never came, forever, whatever the timeouts said.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(3600)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with LLMClient(url, model="m", timeouts=Timeouts(first_token=0.3, between_tokens=5)) as llm:
            started = asyncio.get_running_loop().time()

            async def consume() -> None:
                async for _ in llm.stream_chat_events([{"role": "user", "content": "hi"}]):
                    pass

            with pytest.raises(TimedOut) as timed_out:  # not the 5 s guard: that would be a hang
                await asyncio.wait_for(consume(), 5)
            waited = asyncio.get_running_loop().time() - started
        assert timed_out.value.phase == "first_token"
        assert 0.25 < waited < 2.0  # the deadline, not a hang (and no retry of a timed-out stream)
    finally:
        server.close()
