"""Closed-loop load over HTTP: N clients, each sending its next request when the last one ends."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tokenmill.bench.stats import RequestRecord
from tokenmill.bench.workload import Workload


async def stream_one(client: httpx.AsyncClient, body: dict, run_started: float) -> RequestRecord:
    started = time.perf_counter()
    record = RequestRecord(started=started - run_started)
    last = None
    counted = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code in (429, 503):
                record.status = "rejected"
                return record
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message"))
                    return record
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        record.ttft = now - started
                    else:
                        record.gaps.append(now - last)
                    last = now
                    counted += 1
        record.latency = time.perf_counter() - started
        record.output_tokens = record.output_tokens or counted
        record.status = "ok"
    except httpx.TimeoutException as error:
        record.status, record.error = "timeout", repr(error)
    except httpx.HTTPError as error:
        record.error = repr(error)
    return record


async def closed_loop(
    base_url: str, model: str, workload: Workload, concurrency: int, requests: int, warmup: int = 0, timeout: float = 600.0
) -> tuple[list[RequestRecord], float]:
    """Returns the measured records (warm-up excluded) and the measured wall time."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        if warmup:
            await asyncio.gather(*(stream_one(client, workload.request_body(-1 - i, model), 0.0) for i in range(warmup)))
        next_index = 0
        records: list[RequestRecord] = []
        run_started = time.perf_counter()

        async def client_loop() -> None:
            nonlocal next_index
            while next_index < requests:
                index, next_index = next_index, next_index + 1
                records.append(await stream_one(client, workload.request_body(index, model), run_started))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return records, time.perf_counter() - run_started


async def served_model(base_url: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return (await client.get("/v1/models")).json()["data"][0]["id"]
