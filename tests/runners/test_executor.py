"""`async` mode: a pool of exactly `replicas` workers, token events back on the loop, abort."""

from __future__ import annotations

import asyncio
import time

import pytest

from tokenmill.engines.simulated import SimulatedEngine
from tokenmill.errors import EngineFailure
from tokenmill.generation import Finished, GenerationRequest, TextDelta
from tokenmill.runners.executor import ExecutorRunner
from tokenmill.sampling import SamplingParams


def request(max_tokens: int = 5, **params) -> GenerationRequest:
    return GenerationRequest(
        request_id="r", params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params), prompt="hi"
    )


async def started_runner(replicas: int, **engine_kwargs) -> ExecutorRunner:
    runner = ExecutorRunner(lambda: SimulatedEngine(**engine_kwargs), replicas, "simulated")
    await runner.start()
    return runner


async def drain(handle) -> list:
    return [event async for event in handle]


async def test_events_arrive_in_order_and_end_with_finished():
    runner = await started_runner(1, ttft_ms=0, itl_ms=0)
    try:
        events = await drain(await runner.submit(request(7)))
        assert all(isinstance(e, TextDelta) for e in events[:-1])
        assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 7
        assert runner.in_flight == 0
    finally:
        await runner.stop()


async def test_at_most_replicas_requests_run_at_once():
    # 5 tokens = a free prefill + 4 decode steps of 25 ms = 100 ms per request. Four requests on
    # two replicas run in two waves (about 200 ms), never all at once (about 100 ms).
    runner = await started_runner(2, ttft_ms=0, itl_ms=25)
    try:
        started = time.perf_counter()
        handles = [await runner.submit(request(5)) for _ in range(4)]
        assert runner.in_flight == 4
        await asyncio.gather(*(drain(h) for h in handles))
        elapsed = time.perf_counter() - started
        assert elapsed >= 0.19
    finally:
        await runner.stop()


async def test_loop_stays_responsive_while_replicas_work():
    # A ticker on the loop measures its longest gap over the whole request, submit included: an
    # engine run on the loop thread (in submit or in a callback) would show as a 200 ms gap.
    runner = await started_runner(1, ttft_ms=0, itl_ms=20, gil="release")
    gaps: list[float] = []
    ticking = True

    async def tick() -> None:
        last = time.perf_counter()
        while ticking:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    try:
        await asyncio.sleep(0.02)
        started = time.perf_counter()
        events = await drain(await runner.submit(request(10)))
        took = time.perf_counter() - started
        ticking = False
        await ticker
        assert isinstance(events[-1], Finished) and took >= 0.15  # nine 20 ms decode steps really ran
        assert max(gaps) < 0.1, f"the loop was blocked for {max(gaps) * 1000:.0f} ms"
    finally:
        ticking = False
        await runner.stop()


async def test_abort_stops_generation_and_frees_the_replica():
    runner = await started_runner(1, ttft_ms=0, itl_ms=10)
    try:
        handle = await runner.submit(request(1000))
        first = await handle.__anext__()
        assert isinstance(first, TextDelta)
        handle.abort()
        started = time.perf_counter()
        follower = await drain(await runner.submit(request(2)))
        assert isinstance(follower[-1], Finished)
        assert time.perf_counter() - started < 1.0  # not 1000 * 10 ms
        assert runner.in_flight == 0
    finally:
        await runner.stop()


async def test_engine_failure_reaches_the_consumer_as_an_error():
    class Broken(SimulatedEngine):
        def step(self, chunks):
            raise RuntimeError("kernel exploded")

    runner = ExecutorRunner(lambda: Broken(ttft_ms=0, itl_ms=0), 1, "simulated")
    await runner.start()
    try:
        with pytest.raises(EngineFailure, match="kernel exploded"):
            await drain(await runner.submit(request()))
        assert runner.in_flight == 0
    finally:
        await runner.stop()
