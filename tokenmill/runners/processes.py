"""`process` mode: the event loop feeds `replicas` worker processes, each with its own engine.

Processes sidestep the GIL entirely (useful when an engine holds it) at the price of one model
copy per process and IPC per token. The parent keeps only the tokenizer, to validate requests
before dispatch. One reader thread per worker turns its pipe into loop callbacks; when a worker
dies, its request ends with an explicit error event and a new worker is started in its place.
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
from tokenmill.engines import build_tokenizer
from tokenmill.errors import EngineFailure
from tokenmill.generation import GenerationRequest
from tokenmill.runners.base import RequestHandle, Runner, RunnerStats
from tokenmill.runners.process_worker import Abort, Done, Emit, Job, Ready, Stop, worker_main

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
        self.model_name = model_name
        # Each process gets its share of the cores unless told otherwise.
        self._settings = settings.model_copy(update={"threads": settings.threads_per_replica()})
        self._replicas = settings.replicas
        self._context = multiprocessing.get_context("spawn")
        self._job_ids = itertools.count()
        self._workers: list[_Worker] = []
        self._idle: asyncio.Queue[_Worker] | None = None
        self._pending: dict[int, tuple[Job, RequestHandle]] = {}  # submitted, not yet on a worker
        self._in_flight = 0
        self._aborted = 0
        self._stopping = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Queue()
        self._tokenizer = await self._loop.run_in_executor(None, build_tokenizer, self._settings)
        self._workers = [self._spawn(i) for i in range(self._replicas)]
        await asyncio.gather(*(w.ready for w in self._workers))

    def _spawn(self, index: int) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=worker_main, args=(self._settings, child_end), name=f"tokenmill-worker-{index}", daemon=True
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
            if not worker.ready.done():
                worker.ready.set_result(None)
            self._idle.put_nowait(worker)
        elif isinstance(message, Emit):
            if worker.job and worker.job[0] == message.job_id:
                worker.job[1].put(message.event)
        elif isinstance(message, Done):
            if worker.job and worker.job[0] == message.job_id:
                handle = worker.job[1]
                worker.job = None
                self._in_flight -= 1
                if message.finished is not None:
                    handle.put(message.finished)
                elif message.error is not None:
                    handle.fail(message.error)
                else:
                    self._aborted += 1
            self._idle.put_nowait(worker)

    def _on_death(self, worker: _Worker) -> None:
        worker.dead = True
        if self._stopping:
            return
        code = worker.process.exitcode
        if worker.job is not None:
            _, handle = worker.job
            worker.job = None
            self._in_flight -= 1
            handle.fail(EngineFailure(f"the worker process serving this request died (exit code {code})"))
        if not worker.ready.done():
            worker.ready.set_exception(EngineFailure(f"worker process {worker.index} failed to start (exit code {code})"))
            return  # a worker that cannot even start would crash-loop; start() reports it
        log.error("worker %d (pid %s) died with exit code %s; restarting it", worker.index, worker.process.pid, code)
        self._workers[worker.index] = self._spawn(worker.index)

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        seq = self.prepare(request, self._tokenizer)
        job = Job(next(self._job_ids), request.request_id, seq.token_ids, seq.params, seq.max_new_tokens)
        handle = RequestHandle(request.request_id, on_abort=lambda: self._abort(job.job_id))
        self._in_flight += 1
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
            self._in_flight -= 1
            self._aborted += 1
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

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stats(self) -> RunnerStats:
        running = sum(1 for w in self._workers if w.job is not None)
        return RunnerStats(running=running, waiting=len(self._pending), kv_tokens_used=0, kv_tokens_capacity=0, aborted=self._aborted)

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
