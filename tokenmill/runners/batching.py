"""`batch` mode with the engine on a thread of the server process (`--no-engine-process`).

Like llama.cpp's server: one engine thread owns the model and all its state; requests and
cancellations reach it as typed messages; every step it runs the engine core once and sends that
step's report back to the event loop in a single callback. Sequences join and leave the batch at
step boundaries, so an aborted request leaves within one step and frees its KV cells at once.

An exception anywhere in the loop (the engine's step, the bookkeeping after it, freeing a
sequence) ends every request the engine holds with an error, and the thread builds a fresh engine
before taking work again. A native crash here still takes the whole server down: the default,
an engine process (`engine_process.py`), contains those too.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.engines.base import StepEngine, Tokenizer
from tokenmill.engines.sequence import Sequence
from tokenmill.errors import EngineFailure
from tokenmill.runners.batch_front import BatchFront
from tokenmill.runners.engine_core import EngineCore
from tokenmill.runners.restarts import RestartPolicy
from tokenmill.runners.scheduler import SchedulerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Add:
    seq: Sequence


@dataclass(frozen=True, slots=True)
class _Abort:
    seq_id: int


_Message = _Add | _Abort


class BatchingRunner(BatchFront):
    def __init__(
        self,
        engine_factory: Callable[[], StepEngine],
        config: SchedulerConfig,
        model_name: str,
        policy: RestartPolicy | None = None,
    ):
        super().__init__(config, model_name, policy)
        self._engine_factory = engine_factory
        self._core: EngineCore | None = None
        self._inbox: deque[_Message] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._delays: queue.SimpleQueue[float | None] = queue.SimpleQueue()  # restart delays, loop -> thread

    async def start(self) -> None:
        # The engine is built on the thread that will step it: one thread owns all model state, and
        # native thread pools (OpenMP in torch and ggml) are per calling thread -- building on one
        # thread and stepping on another left two pools competing for the cores (torch engine at
        # concurrency 1: 50 ms between tokens instead of 33 ms).
        self._loop = asyncio.get_running_loop()
        built: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._own_engine, args=(built,), name="tokenmill-batch-engine", daemon=True
        )
        self._thread.start()
        await built
        self._ready = True

    def _tokenizer(self) -> Tokenizer:
        assert self._core is not None, "runner not started"
        return self._core.engine.tokenizer

    def _own_engine(self, built: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            self._core = EngineCore(self._engine_factory(), self.config)
        except BaseException as error:  # noqa: BLE001 -- handed to start()'s caller, whatever it is
            self._loop.call_soon_threadsafe(_settle, built, error)
            return
        self._loop.call_soon_threadsafe(_settle, built, None)
        while self._serve():
            if not self._replace_engine():
                return

    async def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._delays.put(None)  # a thread waiting to restart its engine stops waiting
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._fail(None, EngineFailure("the server is shutting down"))
        if self._core is not None:
            self._core.close()

    def _send_add(self, seq: Sequence) -> None:
        self._send(_Add(seq))

    def _send_abort(self, seq_id: int) -> None:
        self._send(_Abort(seq_id))

    def _send(self, message: _Message) -> None:
        with self._wakeup:
            self._inbox.append(message)
            self._wakeup.notify()

    # -- engine thread
    def _serve(self) -> bool:
        """Step until stopped (False) or until the engine fails (True: replace it)."""
        core = self._core
        assert core is not None
        while True:
            with self._wakeup:
                while not self._inbox and not core.has_work and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return False
                messages = list(self._inbox)
                self._inbox.clear()
            try:
                for message in messages:
                    if isinstance(message, _Add):
                        core.add(message.seq)
                    else:
                        core.abort(message.seq_id)
                report = core.step() if core.has_work else core.report()
            except Exception as error:  # the engine's state can no longer be trusted
                self._ready = False  # at once: no new request is prepared for this engine
                log.exception("engine loop failed")
                lost = core.sequence_ids + [m.seq.seq_id for m in messages if isinstance(m, _Add)]
                with self._wakeup:  # requests submitted meanwhile were prepared for this engine too
                    lost += [m.seq.seq_id for m in self._inbox if isinstance(m, _Add)]
                    self._inbox.clear()
                failure = EngineFailure(f"the model engine failed: {type(error).__name__}: {error}")
                self._call_loop(self._on_engine_failed, "exception", lost, failure)
                return True
            self._call_loop(self._dispatch, report)

    def _replace_engine(self) -> bool:
        """Build a fresh engine, with backoff; False when giving up or stopping."""
        assert self._core is not None
        try:
            self._core.close()
        except Exception:
            log.exception("closing the failed engine")
        while True:
            delay = self._delays.get()
            if delay is None:
                return False
            with self._wakeup:
                if self._wakeup.wait_for(lambda: self._stopping, timeout=delay):
                    return False
            try:
                self._core = EngineCore(self._engine_factory(), self.config)
            except Exception as error:
                log.exception("restarting the engine failed")
                self._call_loop(
                    self._on_engine_failed, "restart_failed", [], EngineFailure(f"engine restart failed: {error}")
                )
                continue
            with self._wakeup:  # submitted in the instant the old engine failed: prepared for it
                stale = [m.seq.seq_id for m in self._inbox if isinstance(m, _Add)]
                self._inbox.clear()
            self._call_loop(self._fail, stale, EngineFailure("the model engine failed before this request started"))
            self._call_loop(self._on_engine_back)
            return True

    def _call_loop(self, callback, *args) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    # -- event loop
    def _on_engine_failed(self, reason: str, seq_ids: list[int], error: EngineFailure) -> None:
        self._delays.put(self._engine_lost(reason, error, seq_ids))

    def _on_engine_back(self) -> None:
        log.info("model engine restarted; serving again")
        self._ready = True


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
