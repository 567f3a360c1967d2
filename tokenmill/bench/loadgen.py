"""Closed-loop load over HTTP: N clients, each sending its next request when the last one ends
(after a refusal, when tokenmill's client would: see `_backoff`)."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Self

import httpx

from tokenmill.bench.http1 import ConnectionDropped, Http1Client
from tokenmill.bench.stats import RequestRecord
from tokenmill.bench.workload import Workload
from tokenmill.client.policy import RetryPolicy, parse_retry_after
from tokenmill.client.streaming import sse_event

# error events that refuse a stream still queued after its headers came: refused, not lost
REFUSED_WHILE_QUEUED = {"server_overloaded": 503, "rate_limit_error": 429}


async def stream_one(
    client: Http1Client, body: dict, run_started: float, text: list[str] | None = None
) -> RequestRecord:
    """Stream one chat completion and time it; `text`, if given, collects the answer's content.
    A request whose connection the server closed before answering (a kept-alive connection it had
    just dropped: llama-server does) is sent again once, timed from the first try."""
    started = time.perf_counter()
    record = RequestRecord(started=started - run_started)
    try:
        try:
            await _stream(client, body, started, record, text)
        except ConnectionDropped:
            await _stream(client, body, started, record, text)
    except TimeoutError as error:
        record.status, record.error = "timeout", repr(error)
    except OSError as error:  # ConnectionError, ProtocolError
        record.error = repr(error)
    return record


async def _stream(
    client: Http1Client, body: dict, started: float, record: RequestRecord, text: list[str] | None
) -> None:
    last = None
    counted = 0
    async with client.post("/v1/chat/completions", body) as response:
        record.http_status = response.status_code
        if response.status_code in (429, 503):
            await response.read()  # to its end, so the connection is kept for the next request
            record.status = "rejected"
            record.retry_after = parse_retry_after(response.headers.get("retry-after"))
            return
        if response.status_code != 200:
            record.error = f"HTTP {response.status_code}: {(await response.read())[:200]!r}"
            return
        async for line in response.lines():
            chunk = sse_event(line)
            if not isinstance(chunk, dict):
                continue  # [DONE], blank separators, comments
            if "error" in chunk:
                error = chunk["error"]
                record.error = str(error.get("message"))
                if error.get("type") in REFUSED_WHILE_QUEUED:  # after its headers came (keep-alive)
                    record.status, record.http_status = "rejected", REFUSED_WHILE_QUEUED[error["type"]]
                return
            usage = chunk.get("usage")
            if usage:
                record.output_tokens = usage["completion_tokens"]
                record.prompt_tokens = usage["prompt_tokens"]
                record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            choices = chunk.get("choices") or []
            delta = choices[0].get("delta", {}) if choices else {}
            if text is not None and delta.get("content"):
                text.append(delta["content"])
            if delta.get("content") or delta.get("tool_calls"):
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


class Progress:
    """One live status line on a terminal (nothing when output is not a terminal)."""

    def __init__(self, label: str, total: int | None, records: list[RequestRecord]):
        self._label, self._total, self._records = label, total, records
        self._task: asyncio.Task | None = None
        self._started = time.perf_counter()

    async def _draw(self) -> None:
        while True:
            done = len(self._records)
            ok = sum(1 for r in self._records if r.status == "ok")
            refused = sum(1 for r in self._records if r.status == "rejected")
            of = f"/{self._total}" if self._total else ""
            sys.stderr.write(
                f"\r  {self._label}: {done}{of} done, {ok} ok, {refused} refused, "
                f"{done - ok - refused} failed, {time.perf_counter() - self._started:5.1f}s "
            )
            sys.stderr.flush()
            await asyncio.sleep(0.5)

    def __enter__(self) -> Self:
        if sys.stderr.isatty():
            self._task = asyncio.ensure_future(self._draw())
        return self

    def __exit__(self, *exc) -> None:
        if self._task:
            self._task.cancel()
            sys.stderr.write("\r" + " " * 100 + "\r")


_RETRY = RetryPolicy()


def _backoff(refused: int, retry_after: float | None, run_started: float, duration: float | None) -> float:
    """How long a closed-loop client waits after its `refused`-th refusal in a row: tokenmill's
    client policy (exponential backoff with full jitter, at least the server's Retry-After, at
    most RetryPolicy.max_retry_after), never past the end of the run. Sending again at once, as
    this loop once did, turns an overload into a storm of refusals that measures nothing."""
    wait = _RETRY.delay(refused, min(retry_after or 0.0, _RETRY.max_retry_after))
    if duration is not None:
        wait = min(wait, max(0.0, duration - (time.perf_counter() - run_started)))
    return wait


def _within(run_started: float, duration: float | None) -> bool:
    return duration is None or time.perf_counter() - run_started < duration


async def closed_loop(
    base_url: str,
    model: str,
    workload: Workload,
    concurrency: int,
    requests: int | None,
    warmup: int = 0,
    timeout: float = 600.0,
    duration: float | None = None,
    ramp_up: float = 0.0,
    headers: dict[str, str] | None = None,
) -> tuple[list[RequestRecord], float]:
    """`concurrency` clients, each sending its next request when the last one ends, until
    `requests` were sent or `duration` seconds passed. Returns records (warm-up excluded) and wall time.

    `ramp_up` starts the clients evenly over that many seconds instead of all at once: with fixed
    output lengths, clients that start together stay in lock-step, so every wave of replacements
    reaches the server as one burst, for the whole run."""
    async with Http1Client(base_url, headers, timeout, max_connections=concurrency) as client:
        if warmup:
            await asyncio.gather(
                *(stream_one(client, workload.request_body(-1 - i, model), 0.0) for i in range(warmup))
            )
        next_index = 0
        records: list[RequestRecord] = []
        run_started = time.perf_counter()

        async def client_loop(number: int) -> None:
            nonlocal next_index
            await asyncio.sleep(ramp_up * number / concurrency)
            refused = 0  # in a row: a refused client waits before its next request, as clients do
            while (requests is None or next_index < requests) and _within(run_started, duration):
                index, next_index = next_index, next_index + 1
                record = await stream_one(client, workload.request_body(index, model), run_started)
                records.append(record)
                refused = refused + 1 if record.status == "rejected" else 0
                if refused:
                    await asyncio.sleep(_backoff(refused, record.retry_after, run_started, duration))

        with Progress(f"concurrency {concurrency}", requests, records):
            await asyncio.gather(*(client_loop(number) for number in range(concurrency)))
        return records, time.perf_counter() - run_started


async def open_loop(
    base_url: str,
    model: str,
    workload: Workload,
    rate: float,
    requests: int | None,
    timeout: float = 600.0,
    duration: float | None = None,
    seed: int = 7,
    headers: dict[str, str] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Poisson arrivals at `rate` requests/s, whatever the server does: the way real traffic comes.
    Sends until `requests` or `duration`; then waits for what is in flight."""
    if requests is None and duration is None:
        raise ValueError("an open loop needs --requests or --duration to stop")
    rng = random.Random(seed)
    async with Http1Client(base_url, headers, timeout) as client:
        records: list[RequestRecord] = []
        in_flight: list[asyncio.Task] = []
        run_started = time.perf_counter()
        next_arrival = 0.0

        async def one(index: int) -> None:
            records.append(await stream_one(client, workload.request_body(index, model), run_started))

        with Progress(f"rate {rate:g}/s", requests, records):
            index = 0
            while (requests is None or index < requests) and _within(run_started, duration):
                delay = next_arrival - (time.perf_counter() - run_started)
                if delay > 0:
                    await asyncio.sleep(delay)
                in_flight.append(asyncio.ensure_future(one(index)))
                index += 1
                next_arrival += rng.expovariate(rate)
            await asyncio.gather(*in_flight)
        return records, time.perf_counter() - run_started


async def served_model(base_url: str, headers: dict[str, str] | None = None) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=30, headers=headers) as client:
        return (await client.get("/v1/models")).json()["data"][0]["id"]
