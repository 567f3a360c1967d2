"""What the bench's load client costs in CPU, which it takes from the server it measures when both
share the machine: httpx against tokenmill.bench.http1, on a refused request and on a streamed
token, against a real tokenmill server started here (batch mode, the default model).

    python tools/client_cost.py

Refusals: one stream holds the server's only place (--max-concurrency 1 --max-queue 0), so every
other request is a 503. Prints CPU milliseconds of this process per request and per token.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tokenmill.bench.http1 import Http1Client
from tokenmill.bench.loadgen import stream_one
from tokenmill.bench.spawn import SpawnedServer

BODY = {"messages": [{"role": "user", "content": "Tell me a story about a dragon"}], "stream": True, "ignore_eos": True}


async def per_refusal(url: str, requests: int = 300) -> tuple[float, float]:
    body = BODY | {"max_tokens": 16}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client, Http1Client(url) as lean:
        holding = asyncio.Event()

        async def hold() -> None:
            async with lean.post("/v1/chat/completions", BODY | {"max_tokens": 4000}) as response:
                holding.set()
                async for _ in response.lines():
                    pass

        holder = asyncio.ensure_future(hold())
        await holding.wait()
        started = time.process_time()
        for _ in range(requests):
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                await response.aread()
        middle = time.process_time()
        for _ in range(requests):
            async with lean.post("/v1/chat/completions", body) as answer:
                await answer.read()
        ended = time.process_time()
        assert response.status_code == answer.status_code == 503, "the place was not held"
        holder.cancel()
    return (middle - started) / requests * 1000, (ended - middle) / requests * 1000


async def per_token(url: str, tokens: int = 200) -> tuple[float, float]:
    body = BODY | {"max_tokens": tokens}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client, Http1Client(url) as lean:
        started = time.process_time()
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for _ in response.aiter_lines():
                pass
        middle = time.process_time()
        record = await stream_one(lean, body, 0.0)  # parses each event's JSON and times it, as the bench does
        ended = time.process_time()
        assert record.output_tokens == tokens, record
    return (middle - started) / tokens * 1000, (ended - middle) / tokens * 1000


def main() -> None:
    for label, flags, measure in [
        ("a refused request", ("--max-concurrency", "1", "--max-queue", "0"), per_refusal),
        ("a streamed token", (), per_token),
    ]:
        with SpawnedServer(["--mode", "batch", *flags], log_level="error") as server:
            for _ in range(2):
                httpx_ms, lean_ms = asyncio.run(measure(server.url))
                print(f"CPU ms per {label}: httpx {httpx_ms:.2f}, tokenmill.bench.http1 {lean_ms:.2f}")


if __name__ == "__main__":
    main()
