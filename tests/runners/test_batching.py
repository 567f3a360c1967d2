"""`batch` mode on the simulated engine: joins and leaves per step, budgets, abort, failures."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.engines.simulated import SimulatedEngine
from tokenmill.errors import ContextLengthExceeded, EngineFailure, Overloaded
from tokenmill.generation import Finished, GenerationRequest, TextDelta
from tokenmill.runners.batching import BatchingRunner
from tokenmill.runners.restarts import RestartPolicy
from tokenmill.runners.scheduler import SchedulerConfig
from tokenmill.sampling import SamplingParams


class RecordingEngine(SimulatedEngine):
    """Remembers how many sequences each step carried."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.step_sizes: list[int] = []

    def step(self, chunks):
        self.step_sizes.append(len(chunks))
        return super().step(chunks)


def request(max_tokens: int = 8, prompt: str = "hello there", **params) -> GenerationRequest:
    return GenerationRequest(
        request_id="r", params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params), prompt=prompt
    )


async def runner_with(engine, max_batch=4, kv_tokens=1000, max_step_tokens=64) -> BatchingRunner:
    config = SchedulerConfig(max_batch=max_batch, kv_tokens=kv_tokens, max_step_tokens=max_step_tokens)
    runner = BatchingRunner(lambda: engine, config, "simulated")
    await runner.start()
    return runner


async def drain(handle) -> list:
    return [event async for event in handle]


async def wait_until(condition, timeout: float = 5.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def test_concurrent_requests_share_steps_and_all_complete():
    engine = RecordingEngine(ttft_ms=1, itl_ms=1)
    runner = await runner_with(engine, max_batch=4)
    try:
        handles = [await runner.submit(request(8)) for _ in range(10)]
        results = await asyncio.gather(*(drain(h) for h in handles))
        for events in results:
            assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 8
        assert max(engine.step_sizes) == 4  # never more than max_batch in one step
        assert len(engine.step_sizes) < 10 * 8  # steps were shared
        assert runner.in_flight == 0 and runner.kv_tokens_reserved == 0
    finally:
        await runner.stop()


async def test_batched_and_alone_give_the_same_seeded_text():
    engine = SimulatedEngine(ttft_ms=0, itl_ms=0)
    runner = await runner_with(engine, max_batch=8)
    try:
        alone = await drain(await runner.submit(request(12, seed=5, temperature=0.8)))
        crowd = [await runner.submit(request(12, prompt=f"other {i}", seed=i)) for i in range(5)]
        mine = await runner.submit(request(12, seed=5, temperature=0.8))
        batched, *_ = await asyncio.gather(drain(mine), *(drain(h) for h in crowd))
        text = lambda events: "".join(e.text for e in events if isinstance(e, TextDelta))
        assert text(batched) == text(alone)
    finally:
        await runner.stop()


async def test_abort_leaves_the_batch_and_frees_kv_within_a_step():
    runner = await runner_with(SimulatedEngine(ttft_ms=0, itl_ms=5), max_batch=1, kv_tokens=100)
    try:
        long = await runner.submit(request(90, prompt="x"))
        assert isinstance(await long.__anext__(), TextDelta)
        assert runner.kv_tokens_reserved == 91
        long.abort()
        follower = await asyncio.wait_for(drain(await runner.submit(request(3, prompt="y"))), timeout=2)
        assert isinstance(follower[-1], Finished)
        assert runner.aborted == 1
        assert runner.in_flight == 0 and runner.kv_tokens_reserved == 0
    finally:
        await runner.stop()


async def test_a_request_larger_than_the_whole_cache_is_refused_at_submit():
    runner = await runner_with(SimulatedEngine(ttft_ms=0, itl_ms=0), kv_tokens=50)
    try:
        with pytest.raises(ContextLengthExceeded, match="KV cache"):
            await runner.submit(request(60))
        assert runner.in_flight == 0
    finally:
        await runner.stop()


async def test_engine_failure_ends_running_requests_with_errors_and_the_runner_recovers():
    class FailOnce(SimulatedEngine):
        failed = False

        def step(self, chunks):
            if not self.failed and any(c.seq.num_generated >= 2 for c in chunks):
                self.failed = True
                raise RuntimeError("device lost")
            return super().step(chunks)

    runner = await runner_with(FailOnce(ttft_ms=0, itl_ms=1), max_batch=4)
    try:
        handles = [await runner.submit(request(10)) for _ in range(3)]
        for handle in handles:
            with pytest.raises(EngineFailure, match="device lost"):
                await drain(handle)
        assert not runner.ready  # the engine is being rebuilt: new work is refused, not queued
        with pytest.raises(Overloaded) as refused:
            await runner.submit(request(4))
        assert refused.value.code == "engine_restarting"
        await wait_until(lambda: runner.ready)
        after = await drain(await runner.submit(request(4)))
        assert isinstance(after[-1], Finished)
        assert runner.in_flight == 0 and runner.kv_tokens_reserved == 0
        assert runner.restarts() == {"exception": 1}
    finally:
        await runner.stop()


class FailsAfterTheStep(SimulatedEngine):
    """The step succeeds; freeing a finished sequence raises (outside the engine's step)."""

    def remove_sequence(self, seq):
        if seq.request_id != "warm-up" and seq.num_generated >= 3:
            raise KeyError("slot table corrupted")
        super().remove_sequence(seq)


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(
            lambda: SimulatedEngine(ttft_ms=0, itl_ms=1, fault="bad_token", fault_at_step=2), id="postprocess"
        ),
        pytest.param(lambda: FailsAfterTheStep(ttft_ms=0, itl_ms=1), id="remove_sequence"),
    ],
)
async def test_a_failure_outside_the_engine_step_ends_every_request_and_the_engine_is_rebuilt(engine):
    # Before: anything raising outside the guarded engine.step() killed the engine thread silently,
    # every request hung and new ones were still admitted.
    built = []

    def factory():  # the first engine is faulty, its replacement is not
        built.append(engine() if not built else SimulatedEngine(ttft_ms=0, itl_ms=1))
        return built[-1]

    config = SchedulerConfig(max_batch=4, kv_tokens=1000, max_step_tokens=64)
    runner = BatchingRunner(factory, config, "simulated")
    await runner.start()
    try:
        handles = [await runner.submit(request(3)) for _ in range(3)]
        for handle in handles:
            with pytest.raises(EngineFailure, match="model engine failed"):
                await asyncio.wait_for(drain(handle), 2)
        assert runner.in_flight == 0
        await wait_until(lambda: runner.ready)
        assert len(built) == 2  # a fresh engine, not the broken one
        after = await asyncio.wait_for(drain(await runner.submit(request(2))), 2)
        assert isinstance(after[-1], Finished)
    finally:
        await runner.stop()


async def test_a_crash_loop_gives_up_and_tells_the_server():
    fatal = []
    config = SchedulerConfig(max_batch=2, kv_tokens=1000, max_step_tokens=64)
    engine = lambda: SimulatedEngine(ttft_ms=0, itl_ms=0, fault="raise", fault_at_step=1)
    runner = BatchingRunner(engine, config, "simulated", RestartPolicy(limit=2, window=60, first_delay=0.01))
    runner.on_fatal = fatal.append
    await runner.start()
    try:
        for _ in range(3):
            await wait_until(lambda: runner.ready or fatal)
            if fatal:
                break
            with pytest.raises(EngineFailure):
                await asyncio.wait_for(drain(await runner.submit(request(2))), 2)
        await wait_until(lambda: bool(fatal))
        assert "failed 3 times" in fatal[0]
        assert runner.restarts() == {"exception": 2}
        assert not runner.ready
    finally:
        await runner.stop()


async def test_stop_ends_pending_requests_with_an_error():
    runner = await runner_with(SimulatedEngine(ttft_ms=0, itl_ms=20), max_batch=1)
    handle = await runner.submit(request(100))
    await handle.__anext__()
    await runner.stop()
    with pytest.raises(EngineFailure, match="shutting down"):
        await drain(handle)


async def test_requests_still_queued_for_the_engine_thread_at_stop_get_an_error():
    class SlowStep(SimulatedEngine):
        def step(self, chunks):
            import time

            time.sleep(0.2)  # keep the engine thread busy while more requests arrive
            return super().step(chunks)

    runner = await runner_with(SlowStep(ttft_ms=0, itl_ms=0), max_batch=4)
    first = await runner.submit(request(50))
    await asyncio.sleep(0.05)  # the engine thread is inside its first step now
    late = [await runner.submit(request(50)) for _ in range(3)]  # these wait in its inbox
    await runner.stop()
    for handle in [first, *late]:
        with pytest.raises(EngineFailure, match="shutting down"):
            await asyncio.wait_for(drain(handle), 2)
    assert runner.in_flight == 0
