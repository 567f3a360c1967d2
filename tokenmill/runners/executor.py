"""The thread-pool patterns: `async` and `sync`.

`async`: the event loop hands each request to a thread pool of exactly `replicas` workers. A worker
takes an idle engine (there always is one: workers == engines), runs the request to the end with
blocking calls, and sends tokens back with `call_soon_threadsafe`; waiting requests wait on the
loop as cheap futures, so the loop never blocks.

`sync`: blocking workers, as in a classic threaded server (FastAPI `def` endpoints run in a pool of
40 threads). Every request gets its own thread from a pool of `threads` workers, which blocks until
a model instance is free and then runs it to the end: each waiting request holds an OS thread.

Whether two workers really compute at once depends on the engine releasing the GIL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tokenmill.engines.base import StepEngine, Tokenizer
from tokenmill.engines.prefix_cache import PrefixCacheStats
from tokenmill.engines.replica import generate, speculator_for
from tokenmill.engines.sequence import Sequence
from tokenmill.engines.speculative import DraftStats, SpeculativeConfig, Speculator
from tokenmill.generation import Finished, GenerationRequest
from tokenmill.runners.base import RequestHandle, Runner, RunnerStats

log = logging.getLogger(__name__)


class ExecutorRunner(Runner):
    def __init__(
        self,
        engine_factory: Callable[[], StepEngine],
        replicas: int,
        model_name: str,
        threads: int | None = None,
        speculative: SpeculativeConfig | None = None,
    ):
        super().__init__()
        self._speculative = speculative
        self.model_name = model_name
        self._engine_factory = engine_factory
        self._replica_count = replicas
        workers = threads or replicas  # async: exactly one thread per engine; sync: a bigger blocking pool
        self._pool = ThreadPoolExecutor(max_workers=max(workers, replicas), thread_name_prefix="tokenmill-worker")
        self._replicas: list[_Replica] = []
        self._idle: queue.SimpleQueue[_Replica] = queue.SimpleQueue()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        loads = [loop.run_in_executor(self._pool, self._engine_factory) for _ in range(self._replica_count)]
        engines = await asyncio.gather(*loads)
        self._replicas = [_Replica(engine, speculator_for(engine, self._speculative)) for engine in engines]
        for replica in self._replicas:
            self._idle.put(replica)

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
        for replica in self._replicas:
            replica.engine.close()
        self._replicas.clear()

    def stats(self) -> RunnerStats:
        running = min(self._in_flight, self._replica_count)
        caches = [replica.engine.prefix_cache_stats() for replica in self._replicas]
        drafting = [replica.speculator.stats() for replica in self._replicas if replica.speculator is not None]
        return RunnerStats(
            running=running,
            waiting=self._in_flight - running,
            kv_tokens_used=0,
            kv_tokens_capacity=0,
            prefix_cache=PrefixCacheStats.total(caches),
            speculative=functools.reduce(DraftStats.plus, drafting, DraftStats()),
        )

    def request_tokenizer(self) -> Tokenizer:
        return self._replicas[0].engine.tokenizer

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        seq = self.prepare(request)
        cancelled = threading.Event()
        handle = RequestHandle(request.request_id, on_abort=cancelled.set, prompt_tokens=seq.num_prompt_tokens)
        loop = asyncio.get_running_loop()
        self._admitted()
        loop.run_in_executor(self._pool, self._run, seq, handle, cancelled, loop)
        return handle

    def _run(
        self,
        seq: Sequence,
        handle: RequestHandle,
        cancelled: threading.Event,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        replica = self._idle.get()
        outcome: Finished | Exception | None = None  # None: aborted, the consumer has left
        try:
            for event in generate(replica.engine, seq, cancelled.is_set, replica.speculator):
                if isinstance(event, Finished):
                    outcome = event
                else:
                    _deliver(loop, handle.put, event)
        except Exception as error:  # every admitted request ends with an event, whatever failed
            log.exception("generation failed for %s", seq.request_id)
            outcome = error
        finally:
            self._idle.put(replica)  # free the replica before anyone hears the request ended
            _deliver(loop, self._settle, handle, outcome)

    def _settle(self, handle: RequestHandle, outcome: Finished | Exception | None) -> None:
        """On the loop: the request no longer holds a replica; tell its consumer how it ended."""
        self._settled(aborted=outcome is None)
        if isinstance(outcome, Finished):
            handle.put(outcome)
        elif outcome is not None:
            handle.fail(outcome)


@dataclass(frozen=True, slots=True)
class _Replica:
    engine: StepEngine
    speculator: Speculator | None  # the engine's own drafting state


def _deliver(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop has closed: nobody is listening any more
        pass
