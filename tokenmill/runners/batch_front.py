"""The event-loop side of `batch` mode, whatever carries requests to the engine core.

It validates and registers requests, turns each step report into handle events, and is the one
place that knows whether the engine can take work: `ready` is False from the moment an engine
fails until its replacement has passed its warm-up, and every request the failed engine held has
already ended with an explicit error by then. Subclasses move messages (a thread's inbox, or a
pipe to an engine process) and decide how an engine is replaced.
"""

from __future__ import annotations

import logging
from abc import abstractmethod

from tokenmill.engines.base import Tokenizer
from tokenmill.engines.prefix_cache import PrefixCacheStats
from tokenmill.engines.sequence import Sequence
from tokenmill.engines.speculative import DraftStats
from tokenmill.errors import ContextLengthExceeded, EngineFailure
from tokenmill.generation import GenerationRequest
from tokenmill.runners.base import RequestHandle, Runner, RunnerStats
from tokenmill.runners.engine_core import CoreStats, StepReport
from tokenmill.runners.restarts import RestartPolicy
from tokenmill.runners.scheduler import SchedulerConfig

log = logging.getLogger(__name__)


class BatchFront(Runner):
    def __init__(self, config: SchedulerConfig, model_name: str, policy: RestartPolicy | None = None):
        super().__init__()
        self.model_name = model_name
        self.config = config
        self.policy = policy or RestartPolicy()
        self._handles: dict[int, RequestHandle] = {}  # event loop only
        self._stats = CoreStats()
        self._lost_prefix = PrefixCacheStats()  # what engines that have since failed had counted
        self._lost_drafts = DraftStats()
        self._ready = False
        self._next_attempt_in = 1.0

    def request_tokenizer(self) -> Tokenizer:
        return self._tokenizer()

    # -- what the transport provides
    @abstractmethod
    def _tokenizer(self) -> Tokenizer:
        """The tokenizer requests are validated with."""

    @abstractmethod
    def _send_add(self, seq: Sequence) -> None: ...

    @abstractmethod
    def _send_abort(self, seq_id: int) -> None: ...

    # -- Runner
    @property
    def ready(self) -> bool:
        return self._ready

    def retry_after(self) -> float:
        return max(1.0, self._next_attempt_in)

    @property
    def kv_tokens_reserved(self) -> int:
        return self._stats.kv_tokens_used

    def stats(self) -> RunnerStats:
        return RunnerStats(
            running=self._stats.running,
            waiting=self._stats.waiting,
            kv_tokens_used=self._stats.kv_tokens_used,
            kv_tokens_capacity=self.config.kv_tokens,
            prefix_cache=self._stats.prefix_cache.after(self._lost_prefix),  # counters go on across restarts
            speculative=self._stats.speculative.plus(self._lost_drafts),
        )

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        if not self._ready:
            raise self.restarting_error()
        seq = self.prepare(request)
        if seq.kv_tokens_needed > self.config.kv_tokens:
            raise ContextLengthExceeded(
                f"The request needs {seq.kv_tokens_needed} KV cache tokens (prompt + max_tokens) but the "
                f"whole cache holds {self.config.kv_tokens}. Lower max_tokens.",
                param="max_tokens",
            )
        handle = RequestHandle(
            request.request_id, on_abort=lambda: self._send_abort(seq.seq_id), prompt_tokens=seq.num_prompt_tokens
        )
        self._handles[seq.seq_id] = handle
        self._admitted()
        self._send_add(seq)
        return handle

    # -- event loop: what comes back from the engine
    def _dispatch(self, report: StepReport) -> None:
        self._stats = report.stats
        for seq_id, events in report.events:
            handle = self._handles.get(seq_id)
            if handle is not None:
                for event in events:
                    handle.put(event)
        for seq_id in report.settled:
            handle = self._handles.pop(seq_id, None)
            if handle is not None:
                self._settled(aborted=handle.aborted)

    def _fail(self, seq_ids: list[int] | None, error: EngineFailure) -> None:
        """End these requests (None: all of them) with `error`: an error event, then [DONE]."""
        for seq_id in list(self._handles) if seq_ids is None else seq_ids:
            handle = self._handles.pop(seq_id, None)
            if handle is not None:
                self._settled()
                handle.fail(error)
        if seq_ids is None:
            self._lost_prefix = self.stats().prefix_cache
            self._lost_drafts = self.stats().speculative
            self._stats = CoreStats()

    def _engine_lost(self, reason: str, error: EngineFailure, seq_ids: list[int] | None = None) -> float | None:
        """An engine has failed: end its requests, refuse new ones; the restart delay, or None to give up."""
        self._ready = False
        lost = len(self._handles) if seq_ids is None else len(seq_ids)
        self._fail(seq_ids, error)
        delay = self._restart_delay(self.policy, reason)
        if delay is None:
            return None
        self._next_attempt_in = delay + 1.0
        log.error("model engine failed (%s); %d requests ended; restarting in %.1fs", reason, lost, delay)
        return delay
