"""Drain under load (SIGTERM with capacity full and a queue) and a storm of clients dropping mid-stream."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import httpx
import pytest

from tests.reliability.harness import CAPACITY, MODE_FLAGS, MODES, Tally, metric, record, stream_chat


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_sigterm_under_load_finishes_the_admitted_and_refuses_the_queued(serve_process, mode):
    server = serve_process("--mode", mode, *MODE_FLAGS[mode], "--drain-timeout", "60")
    capacity = CAPACITY[mode]
    max_tokens = 48
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        running = [asyncio.ensure_future(stream_chat(client, max_tokens)) for _ in range(capacity)]
        await _until(lambda: _gauge(client, "tokenmill_in_flight_requests"), lambda v: v >= capacity)
        queued = [asyncio.ensure_future(stream_chat(client, max_tokens)) for _ in range(3)]
        await _until(lambda: _gauge(client, "tokenmill_queue_depth"), lambda v: v >= 3)
        server.process.send_signal(signal.SIGTERM)
        admitted = await asyncio.gather(*running)
        waiting = await asyncio.gather(*queued)
    tally = Tally()
    for outcome in [*admitted, *waiting]:
        tally.add(outcome, max_tokens)
    exit_code = server.process.wait(timeout=60)
    record(
        "drain under load",
        mode,
        f"{capacity} running + 3 queued, 48 tokens each",
        "SIGTERM",
        tally,
        exit_code=exit_code,
    )
    assert all(o.completed and o.completion_tokens == max_tokens for o in admitted)
    assert all(o.status == 503 and o.error["code"] == "draining" and o.retry_after for o in waiting)
    assert tally.lost == 0 and exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_a_disconnect_storm_leaves_nothing_behind(serve_process, mode):
    clients, survivors = 100, 4
    server = serve_process("--mode", mode, *MODE_FLAGS[mode], "--max-queue", str(clients + survivors))
    rng = random.Random(7)
    async with httpx.AsyncClient(
        base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=clients + 10)
    ) as client:
        # Four streams that stay to the end run amid the storm: a hang-up that disturbed anyone
        # else's stream (a lost event, a cut stream, a wrong length) would show as lost.
        storm = [stream_chat(client, 64, drop_after=rng.randint(1, 12)) for _ in range(clients)]
        for i in range(survivors):
            storm.insert(25 * i + 10, stream_chat(client, 64))
        outcomes = await asyncio.gather(*storm)
        tally = Tally()
        for outcome in outcomes:
            tally.add(outcome, 64)
        # admission frees a place at once; the engine frees its work at its next step
        for gauge in (
            "tokenmill_in_flight_requests",
            "tokenmill_batch_running_sequences",
            "tokenmill_kv_cache_used_tokens",
        ):
            await _until(lambda g=gauge: _gauge(client, g), lambda v: v == 0, timeout=30)
        text = (await client.get("/metrics")).text
        started = time.monotonic()
        follow = await client.post("/v1/completions", json={"prompt": "Still here?", "max_tokens": 4})
        follow_s = time.monotonic() - started
    record(
        "disconnect storm",
        mode,
        f"{clients} streams, each dropped after 1-12 tokens, amid {survivors} that stay",
        "client hang-ups",
        tally,
        follow_up_s=round(follow_s, 2),
    )
    assert tally.dropped == clients and tally.completed == survivors and tally.lost == 0
    # every hang-up was noticed and stopped its generation (a missed one would still be running)
    assert _labelled(text, "tokenmill_aborts_total", 'reason="client_disconnect"') == clients
    assert metric(text, "tokenmill_in_flight_requests") == 0
    assert metric(text, "tokenmill_batch_running_sequences") == 0  # non-zero in every mode while serving
    assert metric(text, "tokenmill_kv_cache_used_tokens") == 0  # batch mode's KV cells (0 in the others)
    assert metric(text, "tokenmill_queue_depth") == 0
    assert follow.status_code == 200 and follow_s < 2.0  # runs at once: nothing is still holding a place


def _labelled(text: str, name: str, labels: str) -> float:
    line = next((line for line in text.splitlines() if line.startswith(f"{name}{{{labels}}} ")), None)
    return float(line.split()[-1]) if line else 0.0


async def _gauge(client: httpx.AsyncClient, name: str) -> float:
    return metric((await client.get("/metrics")).text, name)


async def _until(read, condition, timeout: float = 20.0) -> None:
    """Poll `read()` (on the test's own client, never blocking the loop) until `condition` holds."""
    deadline = time.monotonic() + timeout
    while not condition(await read()):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)
