"""A noisy neighbour: a CPU-bound process started beside the server while it is under load.

llama.cpp's threads meet at spinning barriers every layer; when a neighbour takes a core, the
thread on it is descheduled and the others spin until it comes back, so throughput collapses
(docs/operations.md, "CPUs and threads", has the figures and what to set). This scenario checks
what must hold whatever the throughput: nothing is lost, every stream completes, and the server's
event loop keeps answering. The throughput with and without the neighbour is recorded, not
asserted (a timed test would measure the machine, not the code).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.reliability.harness import long_mode, record, stream_chat, tally_of
from tokenmill.bench.command import NoisyNeighbours


async def _load(client: httpx.AsyncClient, streams: int, max_tokens: int) -> tuple[list, float]:
    started = time.monotonic()
    outcomes = await asyncio.gather(*(stream_chat(client, max_tokens) for _ in range(streams)))
    return outcomes, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["default", "1"])
async def test_a_cpu_bound_neighbour_slows_the_server_but_loses_nothing(serve_process, threads):
    flags = ["--mode", "batch", "--max-batch", "8"] + ([] if threads == "default" else ["--threads", threads])
    server = serve_process(*flags)
    streams, max_tokens = 4, 48 if long_mode() else 24
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        quiet, quiet_s = await _load(client, streams, max_tokens)
        neighbour = NoisyNeighbours(1)  # what `tokenmill bench --noisy-neighbours 1` starts
        try:
            await asyncio.sleep(0.3)  # the neighbour is spinning
            health_started = time.monotonic()
            health = asyncio.ensure_future(client.get("/health"))
            noisy, noisy_s = await _load(client, streams, max_tokens)
            health_s = (await health).status_code == 200 and time.monotonic() - health_started
        finally:
            neighbour.stop()
    tally = tally_of(quiet + noisy, max_tokens)
    tokens = streams * max_tokens
    record(
        "noisy neighbour",
        "batch",
        f"{streams} streams of {max_tokens} tokens, --threads {threads}",
        "one CPU-bound process beside the server",
        tally,
        tok_per_s_quiet=round(tokens / quiet_s, 1),
        tok_per_s_neighbour=round(tokens / noisy_s, 1),
    )
    assert tally.lost == 0 and tally.completed == 2 * streams
    assert health_s is not False  # the event loop answered while the engine fought for the cores
