"""Overload: a burst of 10x capacity, then 3x capacity + queue sustained; nothing lost, memory comes back."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.reliability.harness import CAPACITY, MODE_FLAGS, MODES, Tally, long_mode, record, stream_chat, vitals

MAX_TOKENS = 8
TTFT_P99_BOUND_S = 5.0  # queue limit (8) x the slowest mode's service time here (~0.1 s), with a wide margin
RSS_MARGIN_MB = 60.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_burst_then_sustained_overload_loses_nothing(serve_process, mode):
    server = serve_process("--mode", mode, *MODE_FLAGS[mode])
    capacity = CAPACITY[mode]
    sustain_s = 60.0 if long_mode() else 6.0
    tally = Tally()
    ttfts: list[float] = []
    limits = httpx.Limits(max_connections=20 * capacity + 10)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        for outcome in await asyncio.gather(*(stream_chat(client, MAX_TOKENS) for _ in range(2 * capacity))):
            assert outcome.completed  # warm-up: allocations a steady server would have made anyway
        before = vitals(server.process.pid)

        burst = await asyncio.gather(*(stream_chat(client, MAX_TOKENS) for _ in range(10 * capacity)))
        deadline = time.monotonic() + sustain_s

        async def user() -> list:
            outcomes = []
            while time.monotonic() < deadline:
                outcome = await stream_chat(client, MAX_TOKENS)
                outcomes.append(outcome)
                if outcome.refused:
                    await asyncio.sleep(0.05)  # a polite client would honour Retry-After; this one hammers
            return outcomes

        # 3x what the server can hold at once -- running plus queued -- so the sustained phase is
        # refused too (3x the running capacity alone always fits in capacity + the default queue)
        held = capacity + max(8, 2 * capacity)
        sustained = [o for batch in await asyncio.gather(*(user() for _ in range(3 * held))) for o in batch]
        sustained_refused = sum(1 for o in sustained if o.refused)
        for outcome in [*burst, *sustained]:
            tally.add(outcome, MAX_TOKENS)
            if outcome.completed and outcome.ttft is not None:
                ttfts.append(outcome.ttft)
        assert (
            await client.post("/v1/completions", json={"prompt": "still there?", "max_tokens": 2})
        ).status_code == 200
        await asyncio.sleep(1.0)
        after = vitals(server.process.pid)
        metrics = (await client.get("/metrics")).text

    # requests that were let into the queue and then timed out there: what deadline-aware
    # admission exists to prevent (a request that cannot be served in time is refused at once)
    timed_out = _counter(metrics, 'tokenmill_rejections_total{reason="queue_timeout"}')
    refused_early = _counter(metrics, 'tokenmill_rejections_total{reason="queue_wait_too_long"}')

    ttft_p99 = sorted(ttfts)[int(0.99 * (len(ttfts) - 1))]
    record(
        "overload",
        mode,
        f"burst {10 * capacity}, then {3 * held} clients for {sustain_s:g} s",
        "10x capacity, then 3x capacity + queue",
        tally,
        sustained_refused=sustained_refused,
        queue_timeouts=timed_out,
        refused_as_too_long_a_wait=refused_early,
        ttft_p99_s=round(ttft_p99, 2),
        rss_before_mb=round(before.rss_mb),
        rss_after_mb=round(after.rss_mb),
    )
    assert tally.lost == 0, tally.lost_examples
    assert tally.errored == 0  # overload is answered with 503 + Retry-After, never with errors
    assert tally.completed >= capacity and sustained_refused > 0  # it really was overloaded, burst and sustained
    assert ttft_p99 < TTFT_P99_BOUND_S
    assert timed_out < 0.01 * tally.completed  # under 1% of what was served timed out in the queue
    assert after.rss_mb < before.rss_mb + RSS_MARGIN_MB


def _counter(metrics: str, series: str) -> int:
    """A counter's value in Prometheus text (0 when the series has not appeared)."""
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return int(float(line.split()[-1]))
    return 0
