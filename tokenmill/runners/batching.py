"""`batch` mode: continuous batching. One engine thread owns the model and all its state.

Like llama.cpp's server: requests and cancellations reach that thread as typed messages; every
step it lets the scheduler decide who runs, runs one forward pass for all of them, and sends that
step's events back to the event loop in a single callback. Sequences join and leave the batch at
step boundaries, so an aborted request leaves within one step and frees its KV cells at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.engines.base import StepEngine
from tokenmill.engines.sequence import Sequence
from tokenmill.errors import ContextLengthExceeded, EngineFailure
from tokenmill.generation import GenerationRequest, TokenEvent
from tokenmill.runners.base import RequestHandle, Runner, RunnerStats
from tokenmill.runners.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Add:
    seq: Sequence
    handle: RequestHandle


@dataclass(frozen=True, slots=True)
class _Abort:
    seq: Sequence


_Message = _Add | _Abort


class BatchingRunner(Runner):
    def __init__(self, engine_factory: Callable[[], StepEngine], config: SchedulerConfig, model_name: str):
        self.model_name = model_name
        self._engine_factory = engine_factory
        self._scheduler = Scheduler(config)
        self._engine: StepEngine | None = None
        self._inbox: deque[_Message] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles: dict[int, RequestHandle] = {}  # engine thread only
        self._in_flight = 0  # event loop only
        self.aborted_total = 0

    async def start(self) -> None:
        # The engine is built on the thread that will step it: one thread owns all model state, and
        # native thread pools (OpenMP in torch and ggml) are per calling thread -- building on one
        # thread and stepping on another left two pools competing for the cores (torch engine at
        # concurrency 1: 50 ms between tokens instead of 33 ms).
        self._loop = asyncio.get_running_loop()
        built: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._own_engine, args=(built,), name="tokenmill-batch-engine", daemon=True)
        self._thread.start()
        await built

    def _own_engine(self, built: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            self._engine = self._engine_factory()
        except BaseException as error:  # noqa: BLE001 -- handed to start()'s caller, whatever it is
            self._loop.call_soon_threadsafe(_settle, built, error)
            return
        self._loop.call_soon_threadsafe(_settle, built, None)
        self._run()

    async def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        if self._engine is not None:
            self._engine.close()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stats(self) -> RunnerStats:
        scheduler = self._scheduler
        return RunnerStats(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting) + len(self._inbox),
            kv_tokens_used=scheduler.kv_reserved,
            kv_tokens_capacity=scheduler.config.kv_tokens,
            aborted=self.aborted_total,
        )

    @property
    def kv_tokens_reserved(self) -> int:
        return self._scheduler.kv_reserved

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        assert self._engine is not None, "runner not started"
        seq = self.prepare(request, self._engine.tokenizer)
        if not self._scheduler.fits_at_all(seq):
            raise ContextLengthExceeded(
                f"The request needs {seq.kv_tokens_needed} KV cache tokens (prompt + max_tokens) but the "
                f"whole cache holds {self._scheduler.config.kv_tokens}. Lower max_tokens.",
                param="max_tokens",
            )
        handle = RequestHandle(request.request_id, on_abort=lambda: self._send(_Abort(seq)))
        self._in_flight += 1
        self._send(_Add(seq, handle))
        return handle

    def _send(self, message: _Message) -> None:
        with self._wakeup:
            self._inbox.append(message)
            self._wakeup.notify()

    # -- engine thread
    def _run(self) -> None:
        engine = self._engine
        assert engine is not None
        while True:
            with self._wakeup:
                while not self._inbox and not self._scheduler.has_work and not self._stopping:
                    self._wakeup.wait()
                messages = list(self._inbox)
                self._inbox.clear()
                if self._stopping:
                    # requests submitted in the last instant: never registered, but admitted
                    for message in messages:
                        if isinstance(message, _Add):
                            self._handles[message.seq.seq_id] = message.handle
                    break
            for message in messages:
                self._handle_message(engine, message)
            if self._scheduler.has_work:
                self._step(engine)
        self._fail_everything(EngineFailure("the server is shutting down"))

    def _handle_message(self, engine: StepEngine, message: _Message) -> None:
        if isinstance(message, _Add):
            self._handles[message.seq.seq_id] = message.handle
            self._scheduler.add(message.seq)
        elif message.seq.seq_id in self._handles:  # an abort for a request still here
            if self._scheduler.abort(message.seq):
                engine.remove_sequence(message.seq)
            self._handles.pop(message.seq.seq_id)
            self.aborted_total += 1
            self._deliver([], settled=1)

    def _step(self, engine: StepEngine) -> None:
        try:
            for seq in self._scheduler.admit():
                engine.add_sequence(seq)
            chunks = self._scheduler.plan()
            if not chunks:
                return
            tokens = engine.step(chunks)
        except Exception as error:  # any failure in the step: the running requests end with it
            log.exception("engine step failed; failing the %d running requests", len(self._scheduler.running))
            failed = self._scheduler.fail_all_running()
            for seq in failed:
                engine.remove_sequence(seq)
            deliveries = [(self._handles.pop(s.seq_id), error) for s in failed]
            self._deliver(deliveries, settled=len(failed))
            return
        outcome = self._scheduler.postprocess(chunks, tokens)
        for seq in outcome.finished:
            engine.remove_sequence(seq)
        deliveries = []
        for seq, events in outcome.events:
            handle = self._handles[seq.seq_id] if not seq.is_finished else self._handles.pop(seq.seq_id)
            deliveries.extend((handle, event) for event in events)
        self._deliver(deliveries, settled=len(outcome.finished))

    def _fail_everything(self, error: EngineFailure) -> None:
        handles = list(self._handles.values())
        self._handles.clear()
        self._deliver([(h, error) for h in handles], settled=len(handles))

    def _deliver(self, deliveries: list[tuple[RequestHandle, TokenEvent | Exception]], settled: int) -> None:
        if not deliveries and not settled:
            return
        try:
            self._loop.call_soon_threadsafe(self._dispatch, deliveries, settled)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    # -- event loop
    def _dispatch(self, deliveries: list[tuple[RequestHandle, TokenEvent | Exception]], settled: int) -> None:
        self._in_flight -= settled
        for handle, item in deliveries:
            if isinstance(item, Exception):
                handle.fail(item)
            else:
                handle.put(item)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
