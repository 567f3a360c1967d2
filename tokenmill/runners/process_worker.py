"""The worker side of `process` mode: one engine in its own process, one request at a time.

Messages are typed and keyed by job id (never positional tuples): the parent sends Job, Abort and
Stop; the worker answers Ready once its engine is loaded, Emit per token, and Done per job.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection

from tokenmill.engines import EngineSpec
from tokenmill.engines.speculative import Speculator
from tokenmill.errors import EngineFailure, TokenmillError
from tokenmill.generation import Finished, TokenEvent
from tokenmill.heap import freeze_long_lived
from tokenmill.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class Job:
    job_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int


@dataclass(frozen=True, slots=True)
class Abort:
    job_id: int


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int
    frozen: int = 0  # long-lived objects moved out of the garbage collector's sight (tokenmill.heap)


@dataclass(frozen=True, slots=True)
class Emit:
    job_id: int
    event: TokenEvent


@dataclass(frozen=True, slots=True)
class Done:
    job_id: int
    finished: Finished | None  # None: aborted, or failed (then `error` says why)
    error: TokenmillError | None = None


def worker_main(spec: EngineSpec, conn: Connection, freeze_heap: bool = False) -> None:
    # The parent owns shutdown: a Ctrl-C reaching the whole process group must not kill the
    # workers before the parent has drained their requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tokenmill.engines import build_engine
    from tokenmill.engines.replica import speculator_for

    engine = build_engine(spec)
    speculator = speculator_for(engine, spec.speculative)
    # a worker serves until it exits, like the server and the engine process: its collections should
    # not pause a token for the model's tables (no logging here: the parent logs the count)
    conn.send(Ready(os.getpid(), freeze_long_lived() if freeze_heap else 0))
    try:
        while True:
            message = conn.recv()
            if isinstance(message, Stop):
                return
            if isinstance(message, Job) and not _run(engine, message, conn, speculator):
                return
    except (EOFError, OSError):  # the parent is gone
        return
    finally:
        engine.close()


def _run(engine, job: Job, conn: Connection, speculator: Speculator | None = None) -> bool:
    """Run one job; returns False when a Stop arrived meanwhile."""
    from tokenmill.engines.replica import generate
    from tokenmill.engines.sequence import Sequence

    keep_running = True
    aborted = False

    def cancelled() -> bool:
        nonlocal aborted, keep_running
        while conn.poll():
            message = conn.recv()
            if isinstance(message, Abort) and message.job_id == job.job_id:
                aborted = True
            elif isinstance(message, Stop):
                aborted, keep_running = True, False
        return aborted

    seq = Sequence(job.request_id, job.prompt_ids, job.params, job.max_new_tokens, engine.tokenizer)
    finished = None
    try:
        for event in generate(engine, seq, cancelled, speculator):
            if isinstance(event, Finished):
                finished = event
            else:
                conn.send(Emit(job.job_id, event))
        conn.send(Done(job.job_id, finished))
    except Exception as error:  # noqa: BLE001 -- the parent turns any failure into an error event for the client
        failure = (
            error
            if isinstance(error, TokenmillError)
            else EngineFailure(f"generation failed: {type(error).__name__}: {error}")
        )
        conn.send(Done(job.job_id, None, failure))
    return keep_running
