"""`batch` mode's default: the engine core in a supervised child process, as vLLM and SGLang run it.

The server process keeps admission, deadlines, SSE and metrics; the engine process
(`engine_worker.py`) owns the model, the scheduler and the KV cache. This module is the
supervisor, the one place that knows whether the engine is alive:

- It starts the engine and waits for Ready, which comes only after a warm-up decode: a native
  fault in the model's kernels fails the server's start, never a user's first request.
- The event loop reads the pipe itself (`add_reader`): one wake-up per step, as when the engine is
  a thread of this process. A reader thread in between cost a second wake-up per step, and on a
  machine whose cores llama.cpp's threads keep busy each wake-up costs (measured: 3-9% of
  throughput at concurrency 1). A writer thread sends, so a large prompt never blocks the loop on
  a full pipe.
- When the engine dies -- any signal, a Fatal report, an unexpected exit -- every request it held
  ends at once with an error event, `ready` turns False (admission answers 503
  `engine_restarting`), and a new engine starts after a backoff. More than the allowed restarts
  within the window is a crash loop: the runner gives up and the server exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from tokenmill.engines import EngineSpec
from tokenmill.engines.base import Tokenizer
from tokenmill.engines.sequence import Sequence
from tokenmill.errors import EngineFailure
from tokenmill.runners.batch_front import BatchFront
from tokenmill.runners.engine_core import StepReport
from tokenmill.runners.engine_worker import (
    AbortSequence,
    AddSequence,
    Fatal,
    Ready,
    Stop,
    engine_main,
)
from tokenmill.runners.restarts import RestartPolicy, exit_reason
from tokenmill.runners.scheduler import SchedulerConfig

log = logging.getLogger(__name__)

_STOP_GRACE_S = 5.0


@dataclass(eq=False)
class _EngineProcess:
    """One life of the engine: its process, its pipe, and how it ended."""

    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: asyncio.Future[None]
    outbox: queue.SimpleQueue
    fatal: Fatal | None = None

    def death_reason(self) -> str:
        return "exception" if self.fatal is not None else exit_reason(self.process.exitcode)

    def death_description(self) -> str:
        if self.fatal is not None:
            return self.fatal.message
        reason = self.death_reason()
        return f"killed by {reason}" if reason.startswith("SIG") else f"exited ({reason})"


class EngineProcessRunner(BatchFront):
    def __init__(
        self,
        spec: EngineSpec,
        config: SchedulerConfig,
        model_name: str,
        tokenizer_factory,
        policy: RestartPolicy | None = None,
        log_level: str = "INFO",
        freeze_heap: bool = False,
    ):
        super().__init__(config, model_name, policy)
        self._spec = spec
        self._tokenizer_factory = tokenizer_factory
        self._log_level = log_level
        self._freeze_heap = freeze_heap
        self._context = multiprocessing.get_context("spawn")
        self._engine: _EngineProcess | None = None
        self._tokenizer_instance: Tokenizer | None = None
        self._stopping = False
        self._restart_task: asyncio.Task | None = None

    def _tokenizer(self) -> Tokenizer:
        assert self._tokenizer_instance is not None, "runner not started"
        return self._tokenizer_instance

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tokenizer_instance = await self._loop.run_in_executor(None, self._tokenizer_factory)
        await self._launch()
        self._ready = True

    async def _launch(self) -> None:
        """Start an engine process and wait for its Ready; raises EngineFailure if it dies first."""
        started = time.monotonic()
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=engine_main,
            args=(self._spec, self.config, child_end, self._log_level, self._freeze_heap),
            name="tokenmill-engine",
            daemon=True,
        )
        process.start()
        child_end.close()
        engine = _EngineProcess(process, parent_end, self._loop.create_future(), queue.SimpleQueue())
        self._engine = engine
        self._loop.add_reader(parent_end.fileno(), self._read, engine)
        threading.Thread(target=self._write, args=(engine,), name="tokenmill-engine-writer", daemon=True).start()
        await engine.ready
        log.info("engine process %d ready in %.2fs", process.pid, time.monotonic() - started)

    # -- the pipe
    def _read(self, engine: _EngineProcess) -> None:
        """The pipe is readable: handle every whole message waiting, or the engine's end."""
        try:
            while engine.conn.poll():
                self._on_message(engine, engine.conn.recv())
        except (EOFError, OSError):  # the engine process has gone (the pipe closes when it dies)
            self._loop.remove_reader(engine.conn.fileno())
            asyncio.ensure_future(self._reap_dead(engine))

    async def _reap_dead(self, engine: _EngineProcess) -> None:
        await self._loop.run_in_executor(None, engine.process.join, _STOP_GRACE_S)
        engine.conn.close()
        self._on_exit(engine)

    def _write(self, engine: _EngineProcess) -> None:
        while True:
            message = engine.outbox.get()
            if message is None:
                return
            try:
                engine.conn.send(message)
            except (OSError, ValueError):  # the engine is gone; the reader reports it
                return

    # -- event loop
    def _send_add(self, seq: Sequence) -> None:
        assert self._engine is not None
        message = AddSequence(seq.seq_id, seq.request_id, seq.token_ids, seq.params, seq.max_new_tokens, seq.share)
        self._engine.outbox.put(message)

    def _send_abort(self, seq_id: int) -> None:
        if self._engine is not None and seq_id in self._handles:
            self._engine.outbox.put(AbortSequence(seq_id))

    def _on_message(self, engine: _EngineProcess, message) -> None:
        if engine is not self._engine:
            return  # a report from an engine already replaced
        if isinstance(message, StepReport):
            self._dispatch(message)
        elif isinstance(message, Ready):
            if not engine.ready.done():
                engine.ready.set_result(None)
        elif isinstance(message, Fatal):
            engine.fatal = message

    def _on_exit(self, engine: _EngineProcess) -> None:
        engine.outbox.put(None)
        if self._stopping or engine is not self._engine:
            return
        description = engine.death_description()
        if not engine.ready.done():  # died before Ready: start() or the restart loop reports it
            engine.ready.set_exception(EngineFailure(f"the engine process failed to start: {description}"))
            return
        log.error("engine process %d %s", engine.process.pid, description)
        error = EngineFailure(
            f"the model engine failed ({description}); the request was ended, retry it", code="engine_restarting"
        )
        delay = self._engine_lost(engine.death_reason(), error)
        if delay is not None:
            self._restart_task = asyncio.ensure_future(self._restart(delay))

    async def _restart(self, delay: float | None) -> None:
        while delay is not None and not self._stopping:
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._launch()
            except EngineFailure as error:
                log.error("%s", error)
                delay = self._engine_lost("restart_failed", error, [])
                continue
            self._ready = True
            log.info("model engine restarted; serving again")
            return

    async def stop(self) -> None:
        self._stopping = True
        self._ready = False
        self._fail(None, EngineFailure("the server is shutting down"))
        if self._restart_task is not None:
            self._restart_task.cancel()
        engine = self._engine
        if engine is None:
            return
        engine.outbox.put(Stop())
        engine.outbox.put(None)
        await self._loop.run_in_executor(None, _reap, engine.process)
        if not engine.conn.closed:
            self._loop.remove_reader(engine.conn.fileno())
            engine.conn.close()


def _reap(process: multiprocessing.process.BaseProcess) -> None:
    """Stop -> join with a grace period -> kill (the engine ignores SIGTERM: see engine_main)."""
    process.join(timeout=_STOP_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join()
