"""The engine process of `batch` mode: the model, the scheduler and the KV cache, alone in a process.

The parent (`engine_process.py`) sends typed messages keyed by sequence id -- AddSequence,
AbortSequence, and process mode's Stop -- and this process answers (process mode's) Ready once its engine has passed a warm-up
decode, then one StepReport per step carrying every sequence's new events, and Fatal (then exit)
when anything in the loop fails. A native crash needs no message: the parent sees the pipe close.

Detokenising and stop strings run here, inside `Sequence.append_token`, as llama.cpp's server does
it in its slot loop: a step report then carries text, not token ids, and the server process (the
one that shares a GIL with every open connection) does no per-token work but forwarding.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection

from tokenmill.engines import EngineSpec
from tokenmill.engines.sequence import Sequence
from tokenmill.generation import DEFAULT_SHARE, Share
from tokenmill.heap import freeze_long_lived
from tokenmill.runners.engine_core import EngineCore
from tokenmill.runners.process_worker import (  # the same lifecycle messages as process mode's workers
    Ready,
    Stop,
)
from tokenmill.runners.scheduler import SchedulerConfig
from tokenmill.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class AddSequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    share: Share = DEFAULT_SHARE


@dataclass(frozen=True, slots=True)
class AbortSequence:
    seq_id: int


@dataclass(frozen=True, slots=True)
class Fatal:
    """The engine failed; the process exits right after sending this."""

    message: str


log = logging.getLogger("tokenmill.engine_process")


def engine_main(
    spec: EngineSpec, config: SchedulerConfig, conn: Connection, log_level: str = "INFO", freeze_heap: bool = False
) -> None:
    # The parent owns shutdown: a Ctrl-C, or a SIGTERM sent to the whole process group (`timeout`,
    # systemd's control-group kill), must not end the engine before the parent has drained its
    # requests. The parent stops it with a Stop message, and kills it if that fails.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s %(name)s[engine {os.getpid()}]: %(message)s"
    )
    from tokenmill.engines import build_engine

    try:
        engine = build_engine(spec)
    except Exception as error:  # noqa: BLE001 -- reported whatever it is; the parent decides
        _fatal(conn, "start", error)
    core = EngineCore(engine, config)
    if freeze_heap:  # the step loop, like the server's event loop, should not pause for the model's tables
        freeze_long_lived()
    conn.send(Ready(os.getpid()))
    try:
        _serve(core, conn)
    except (EOFError, BrokenPipeError):  # the parent is gone: nobody to serve
        return
    except Exception as error:  # noqa: BLE001
        _fatal(conn, "serving", error)
    core.close()


def _serve(core: EngineCore, conn: Connection) -> None:
    last_stats = core.stats()
    while True:
        # Block for a message only when there is nothing to step; otherwise take what has arrived.
        messages = [conn.recv()] if not core.has_work else []
        while conn.poll():
            messages.append(conn.recv())
        for message in messages:
            if isinstance(message, AddSequence):
                tokenizer = core.engine.tokenizer
                core.add(
                    Sequence(
                        message.request_id,
                        message.prompt_ids,
                        message.params,
                        message.max_new_tokens,
                        tokenizer,
                        message.seq_id,
                        message.share,
                    )
                )
            elif isinstance(message, AbortSequence):
                core.abort(message.seq_id)
            elif isinstance(message, Stop):
                return
        report = core.step() if core.has_work else core.report()
        if not report.empty or report.stats != last_stats:
            conn.send(report)
            last_stats = report.stats


def _fatal(conn: Connection, during: str, error: BaseException) -> None:
    summary = f"{type(error).__name__}: {error}"
    log.error("engine failed during %s: %s", during, summary, exc_info=error)
    try:
        conn.send(Fatal(summary))
    except OSError:
        pass
    os._exit(1)  # no clean-up: the engine's state is not to be trusted
