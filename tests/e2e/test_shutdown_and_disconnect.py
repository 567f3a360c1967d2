"""Graceful drain on SIGTERM and disconnect handling, against a real `tokenmill serve` process."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

SIM = ("--engine", "simulated", "--sim-ttft-ms", "5")


async def stream_chat(client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event | None = None) -> dict:
    """Read one streamed chat completion to the end; report what arrived."""
    body = {
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = {"text": "", "finish": None, "error": None, "done": False, "status": None, "tokens": None}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        result["status"] = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                result["done"] = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result["error"] = chunk["error"]
            elif chunk.get("usage"):
                result["tokens"] = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                result["text"] += chunk["choices"][0]["delta"].get("content") or ""
                result["finish"] = chunk["choices"][0]["finish_reason"] or result["finish"]
                if started is not None and result["text"]:
                    started.set()
    return result


@pytest.mark.parametrize("mode", ["async", "batch"])
async def test_sigterm_lets_every_running_stream_finish_then_exits_0(serve_process, mode):
    server = serve_process(
        *SIM, "--mode", mode, "--replicas", "8", "--max-batch", "8", "--sim-itl-ms", "50", "--drain-timeout", "20"
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        first_tokens = [asyncio.Event() for _ in range(8)]
        streams = [asyncio.ensure_future(stream_chat(client, 40, e)) for e in first_tokens]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_tokens)), 10)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        refused = await client.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "draining"
        assert (await client.get("/ready")).status_code == 503
        results = await asyncio.gather(*streams)
    for result in results:
        assert result["status"] == 200 and result["error"] is None
        assert result["finish"] == "length" and result["done"]
        assert result["tokens"] == 40 and result["text"]  # the whole answer, not a truncated one
    assert server.process.wait(timeout=20) == 0
    assert time.monotonic() - signalled < 20


async def test_drain_timeout_ends_streams_with_an_error_event(serve_process):
    server = serve_process(*SIM, "--mode", "batch", "--max-batch", "4", "--sim-itl-ms", "50", "--drain-timeout", "0.5")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        first_tokens = [asyncio.Event() for _ in range(4)]
        streams = [asyncio.ensure_future(stream_chat(client, 400, e)) for e in first_tokens]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_tokens)), 10)
        server.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*streams)
    for result in results:
        assert result["error"] is not None and result["error"]["code"] == "shutdown"
        assert result["done"]  # the error event, then [DONE]: never a silently cut stream
        assert result["finish"] is None
    assert server.process.wait(timeout=15) == 0


async def test_a_client_dropping_mid_stream_frees_its_place(serve_process):
    server = serve_process(*SIM, "--mode", "batch", "--max-batch", "1", "--max-queue", "0", "--sim-itl-ms", "20")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1000, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.aiter_lines()
            for _ in range(6):
                await lines.__anext__()
        # the connection is closed here, mid-stream; the next request must get the place at once
        await asyncio.sleep(0.2)
        started = time.monotonic()
        follow = await client.post("/v1/completions", json={"prompt": "next", "max_tokens": 3})
        assert follow.status_code == 200
        assert time.monotonic() - started < 2
        metrics = (await client.get("/metrics")).text
        assert 'tokenmill_aborts_total{reason="client_disconnect"} 1.0' in metrics
        assert "tokenmill_in_flight_requests 0.0" in metrics


async def test_a_second_signal_ends_everything_promptly_with_error_events(serve_process):
    server = serve_process(*SIM, "--mode", "batch", "--max-batch", "2", "--sim-itl-ms", "50", "--drain-timeout", "60")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        first_tokens = [asyncio.Event() for _ in range(2)]
        streams = [asyncio.ensure_future(stream_chat(client, 1000, e)) for e in first_tokens]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_tokens)), 10)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        second = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*streams)
    for result in results:
        assert result["error"] is not None and result["done"]
    assert server.process.wait(timeout=10) == 0
    assert time.monotonic() - second < 5  # not the 60 s drain timeout


async def test_flood_on_a_real_server_refuses_fast_and_keeps_serving(serve_process):
    server = serve_process(*SIM, "--mode", "batch", "--max-batch", "2", "--max-queue", "2", "--sim-itl-ms", "30")
    body = {"prompt": "x", "max_tokens": 20, "ignore_eos": True}
    limits = httpx.Limits(max_connections=60)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:

        async def timed_post():
            started = time.monotonic()
            response = await client.post("/v1/completions", json=body)
            return response, time.monotonic() - started

        results = await asyncio.gather(*(timed_post() for _ in range(50)))
        ok = [r for r, _ in results if r.status_code == 200]
        refused = [(r, t) for r, t in results if r.status_code == 503]
        assert len(ok) == 4 and len(refused) == 46
        assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in ok)
        assert all(int(r.headers["retry-after"]) >= 1 for r, _ in refused)
        refusal_times = sorted(t for _, t in refused)
        assert refusal_times[len(refusal_times) // 2] < 0.5  # refused at once, not after the admitted work
        assert (await client.post("/v1/completions", json=body)).status_code == 200


def _gauge(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.mark.parametrize(
    ("mode", "stream"),
    [("sync", True), ("async", True), ("process", True), ("batch", True), ("batch", False)],
    ids=["sync", "async", "process", "batch", "batch-not-streamed"],
)
async def test_a_client_that_leaves_while_queued_leaves_the_queue_at_once(serve_process, mode, stream):
    # Before: six clients that hung up after 0.3 s in the queue kept their places until admitted,
    # seconds later, and under overload the queue filled with ghosts while live clients got 503.
    server = serve_process(*SIM, "--mode", mode, "--sim-itl-ms", "20", "--max-concurrency", "1", "--max-queue", "8")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        running = asyncio.ensure_future(stream_chat(client, 150))  # holds the one place for about 3 s
        while _gauge((await client.get("/metrics")).text, "tokenmill_in_flight_requests") < 1:
            await asyncio.sleep(0.01)
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 5, "stream": stream}
        ghosts = [asyncio.ensure_future(client.post("/v1/chat/completions", json=body)) for _ in range(6)]
        while _gauge((await client.get("/metrics")).text, "tokenmill_queue_depth") < 6:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        for ghost in ghosts:
            ghost.cancel()  # the client hangs up: its connection closes
        left = time.monotonic()
        while (depth := _gauge((await client.get("/metrics")).text, "tokenmill_queue_depth")) > 0:
            assert time.monotonic() - left < 1.0, f"{depth} ghosts still queued"
            await asyncio.sleep(0.02)
        assert not running.done()  # they left long before a place came free
        live = await stream_chat(client, 3)  # queued behind the running one, then served
        assert (await running)["finish"] == "length" and live["finish"] == "length"
