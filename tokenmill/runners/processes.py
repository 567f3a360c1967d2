"""`process` mode: the event loop feeds `replicas` worker processes, each with its own engine.

Processes sidestep the GIL entirely (useful when an engine holds it) at the price of one model
copy per process and IPC per token. The parent keeps only the tokenizer, to validate requests
before dispatch. One reader thread per worker turns its pipe into loop callbacks; when a worker
dies, its request ends with an explicit error event and a new worker is started in its place,
with backoff if the new one fails too (a crash loop ends the server). While workers are missing,
the admission capacity shrinks to the workers alive, and with none alive the runner is not ready.
Shutdown escalates: Stop message -> join with timeout -> terminate -> kill.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from tokenmill.config import Settings
from tokenmill.engines import build_tokenizer, engine_spec
from tokenmill.engines.base import Tokenizer
from tokenmill.errors import EngineFailure
from tokenmill.generation import GenerationRequest
from tokenmill.runners.base import RequestHandle, Runner, RunnerStats
from tokenmill.runners.process_worker import (
    Abort,
    Done,
    Emit,
    Job,
    Ready,
    Stop,
    worker_main,
)
from tokenmill.runners.restarts import RestartPolicy, exit_reason

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: asyncio.Future
    job: tuple[int, RequestHandle] | None = None
    dead: bool = False
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class ProcessRunner(Runner):
    def __init__(self, settings: Settings, model_name: str):
        super().__init__()
        self.model_name = model_name
        self._settings = settings
        self._spec = engine_spec(settings)  # threads: each process gets its share of the usable CPUs
        self._replicas = settings.replicas
        self._policy = RestartPolicy(settings.engine_restart_limit, settings.engine_restart_window)
        self._context = multiprocessing.get_context("spawn")
        self._job_ids = itertools.count()
        self._workers: list[_Worker] = []
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._pending: dict[int, tuple[Job, RequestHandle]] = {}  # submitted, not yet on a worker
        self._stopping = False
        self._started = False

    @property
    def ready(self) -> bool:
        return self._live() > 0

    def _live(self) -> int:
        return sum(1 for w in self._workers if w.ready.done() and not w.ready.exception() and not w.dead)

    def _capacity_changed(self) -> None:
        if self.on_capacity_change is not None:
            self.on_capacity_change(self._live(), self._replicas)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tokenizer = await self._loop.run_in_executor(None, build_tokenizer, self._settings)
        self._workers = [self._spawn(i) for i in range(self._replicas)]
        await asyncio.gather(*(w.ready for w in self._workers))
        self._started = True

    def _spawn(self, index: int) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=worker_main,
            args=(self._spec, child_end, self._settings.gc_freeze),
            name=f"tokenmill-worker-{index}",
            daemon=True,
        )
        process.start()
        child_end.close()
        worker = _Worker(index, process, parent_end, self._loop.create_future())
        threading.Thread(target=self._read, args=(worker,), name=f"tokenmill-reader-{index}", daemon=True).start()
        return worker

    def _read(self, worker: _Worker) -> None:
        """Reader thread: the worker's pipe, turned into callbacks on the loop."""
        try:
            while True:
                message = worker.conn.recv()
                self._loop.call_soon_threadsafe(self._on_message, worker, message)
        except (EOFError, OSError):
            worker.process.join(timeout=5)
            try:
                self._loop.call_soon_threadsafe(self._on_death, worker)
            except RuntimeError:  # the loop is closed: we are shutting down
                pass

    # -- event loop
    def _on_message(self, worker: _Worker, message) -> None:
        if isinstance(message, Ready):
            if message.frozen:
                log.info("worker %d (pid %s) froze %d long-lived objects", worker.index, message.pid, message.frozen)
            if not worker.ready.done():
                worker.ready.set_result(None)
            self._idle.put_nowait(worker)
            if self._started:
                log.info("worker %d (pid %s) is back", worker.index, worker.process.pid)
                self._capacity_changed()
        elif isinstance(message, Emit):
            if worker.job and worker.job[0] == message.job_id:
                worker.job[1].put(message.event)
        elif isinstance(message, Done):
            if worker.job and worker.job[0] == message.job_id:
                handle = worker.job[1]
                worker.job = None
                self._settled(aborted=message.finished is None and message.error is None)
                if message.finished is not None:
                    handle.put(message.finished)
                elif message.error is not None:
                    handle.fail(message.error)
            self._idle.put_nowait(worker)

    def _on_death(self, worker: _Worker) -> None:
        worker.dead = True
        if self._stopping:
            return
        code = worker.process.exitcode
        if worker.job is not None:
            _, handle = worker.job
            worker.job = None
            self._settled()
            handle.fail(EngineFailure(f"the worker process serving this request died (exit code {code})"))
        failed_to_start = not worker.ready.done()
        if failed_to_start:
            worker.ready.set_exception(
                EngineFailure(f"worker process {worker.index} failed to start (exit code {code})")
            )
            worker.ready.exception()  # retrieved: the restart below reports it
            if not self._started:
                return  # start() reports it
        self._capacity_changed()
        reason = "restart_failed" if failed_to_start else exit_reason(code)
        delay = self._restart_delay(self._policy, reason, keep_trying=self._live() > 0)
        if delay is None:
            return
        log.error("worker %d (pid %s) %s; restarting it in %.1fs", worker.index, worker.process.pid, reason, delay)
        self._loop.call_later(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping:
            self._workers[index] = self._spawn(index)

    def request_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        if not self.ready:
            raise self.restarting_error()
        seq = self.prepare(request)
        job = Job(next(self._job_ids), request.request_id, seq.token_ids, seq.params, seq.max_new_tokens)
        handle = RequestHandle(
            request.request_id, on_abort=lambda: self._abort(job.job_id), prompt_tokens=seq.num_prompt_tokens
        )
        self._admitted()
        self._pending[job.job_id] = (job, handle)
        asyncio.ensure_future(self._dispatch(job, handle))
        return handle

    async def _dispatch(self, job: Job, handle: RequestHandle) -> None:
        while True:
            worker = await self._idle.get()
            if not worker.dead:
                break
        self._pending.pop(job.job_id, None)
        if handle.aborted:
            self._settled(aborted=True)
            self._idle.put_nowait(worker)
            return
        worker.job = (job.job_id, handle)
        self._send(worker, job)

    def _abort(self, job_id: int) -> None:
        for worker in self._workers:
            if worker.job and worker.job[0] == job_id:
                self._send(worker, Abort(job_id))

    def _send(self, worker: _Worker, message) -> None:
        try:
            with worker.send_lock:
                worker.conn.send(message)
        except (OSError, ValueError):  # the worker is dead; its reader thread reports it
            pass

    def stats(self) -> RunnerStats:
        running = sum(1 for w in self._workers if w.job is not None)
        return RunnerStats(running=running, waiting=len(self._pending), kv_tokens_used=0, kv_tokens_capacity=0)

    async def stop(self) -> None:
        self._stopping = True
        for _, handle in list(self._pending.values()):
            handle.fail(EngineFailure("the server is shutting down"))
        for worker in self._workers:
            if worker.job is not None:
                worker.job[1].fail(EngineFailure("the server is shutting down"))
            self._send(worker, Stop())
        await self._loop.run_in_executor(None, self._reap)

    def _reap(self) -> None:
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
