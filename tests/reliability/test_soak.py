"""Soak: capacity-level load with mixed lengths and disconnects; memory, files and threads stay flat.

Ten minutes per mode with `--long`; a short version (about 8 s) in CI."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from tests.reliability.harness import CAPACITY, MODE_FLAGS, MODES, Tally, long_mode, record, stream_chat, vitals

RSS_GROWTH_MB = 60.0
FD_GROWTH = 10
THREAD_GROWTH = 4


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_soak_at_capacity_does_not_grow(serve_process, mode):
    server = serve_process("--mode", mode, *MODE_FLAGS[mode])
    capacity = CAPACITY[mode]
    duration = 600.0 if long_mode() else 8.0
    rng = random.Random(11)
    tally = Tally()
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        await asyncio.gather(*(stream_chat(client, 8) for _ in range(2 * capacity)))  # warm-up
        before = vitals(server.process.pid)
        deadline = time.monotonic() + duration

        async def user(seed: int) -> None:
            local = random.Random(seed)
            while time.monotonic() < deadline:
                max_tokens = local.choice([4, 16, 48])
                drop = local.randint(1, max_tokens) if local.random() < 0.2 else None
                tally.add(await stream_chat(client, max_tokens, drop_after=drop), max_tokens)

        await asyncio.gather(*(user(rng.randrange(1 << 30)) for _ in range(capacity)))
        await asyncio.sleep(1.0)
        after = vitals(server.process.pid)
    record(
        "soak",
        mode,
        f"{capacity} clients for {duration:g} s, 4-48 tokens, 20% dropped",
        "mixed lengths, disconnects",
        tally,
        rss_mb=f"{before.rss_mb:.0f} -> {after.rss_mb:.0f}",
        fds=f"{before.fds} -> {after.fds}",
        threads=f"{before.threads} -> {after.threads}",
    )
    assert tally.lost == 0 and tally.completed > 0
    assert after.rss_mb < before.rss_mb + RSS_GROWTH_MB
    assert after.fds <= before.fds + FD_GROWTH
    assert after.threads <= before.threads + THREAD_GROWTH
