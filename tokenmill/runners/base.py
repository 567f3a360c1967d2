"""The interface every serving pattern implements, and the handle a submitted request returns.

runner.submit(request) -> RequestHandle      (raises InvalidRequest before any model work)
async for event in handle: ...               (TextDelta ... Finished; raises TokenmillError)
handle.abort()                               (client gone / deadline: stop generating, free capacity)
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.engines.sequence import Sequence, prepare_sequence
from tokenmill.errors import EngineFailure, TokenmillError
from tokenmill.generation import Finished, GenerationRequest, TokenEvent


class RequestHandle:
    """Async iterator over one request's events. Producers call `put*` on the event loop thread."""

    def __init__(self, request_id: str, on_abort: Callable[[], object]):  # its result is ignored
        self.request_id = request_id
        self._on_abort = on_abort
        self._events: asyncio.Queue[TokenEvent | TokenmillError] = asyncio.Queue()
        self._done = False
        self.aborted = False

    # -- consumer side
    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._events.get()
        if isinstance(item, TokenmillError):
            self._done = True
            raise item
        if isinstance(item, Finished):
            self._done = True
        return item

    def abort(self) -> None:
        """Stop the generation if it is still running; idempotent, safe after completion."""
        if not self._done and not self.aborted:
            self.aborted = True
            self._on_abort()

    @property
    def finished(self) -> bool:
        return self._done

    # -- producer side (event loop thread only)
    def put(self, event: TokenEvent) -> None:
        self._events.put_nowait(event)

    def fail(self, error: BaseException) -> None:
        if not isinstance(error, TokenmillError):
            error = EngineFailure(f"generation failed: {type(error).__name__}: {error}")
        self._events.put_nowait(error)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class RunnerStats:
    running: int  # sequences the model is working on
    waiting: int  # submitted, not yet running (inside the runner)
    kv_tokens_used: int  # KV cache cells reserved (batch mode; 0 where not tracked)
    kv_tokens_capacity: int


class Runner(ABC):
    """A serving pattern: how admitted requests reach the model.

    A runner that supervises its engines says so through `ready` (False while an engine restarts)
    and `restarts()`; when it gives up (a crash loop) it calls `on_fatal`, which the server sets."""

    model_name: str
    limits: RequestLimits = RequestLimits()
    on_fatal: Callable[[str], None] | None = None
    on_capacity_change: Callable[[int, int], None] | None = None  # (engines up, engines configured)

    @property
    def ready(self) -> bool:
        """Whether a submitted request can start now (False while an engine is being replaced)."""
        return True

    def restarts(self) -> dict[str, int]:
        """Engine (or worker) restarts since start, by reason."""
        return {}

    def retry_after(self) -> float:
        """While not ready: seconds until it likely is again."""
        return 1.0

    def give_up(self, message: str) -> None:
        """The runner cannot serve any more: tell the server, which exits non-zero."""
        if self.on_fatal is not None:
            self.on_fatal(message)

    def prepare(self, request: GenerationRequest, tokenizer) -> Sequence:
        return prepare_sequence(request, tokenizer, self.limits.max_prompt_tokens, self.limits.max_tokens)

    @abstractmethod
    def stats(self) -> RunnerStats:
        """A snapshot for metrics."""

    @abstractmethod
    async def start(self) -> None:
        """Load models and start workers; returns when ready to serve."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop workers and release models."""

    @abstractmethod
    async def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate against the model (tokenize, size-check) and start generating."""

    # -- the bookkeeping every pattern shares (event-loop thread only)
    _in_flight: int = 0
    _aborted: int = 0

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet settled (finished, failed or aborted)."""
        return self._in_flight

    @property
    def aborted(self) -> int:
        """Generations stopped before their end (client gone, deadline, shutdown) since start."""
        return self._aborted

    def _admitted(self) -> None:
        self._in_flight += 1

    def _settled(self, aborted: bool = False) -> None:
        self._in_flight -= 1
        if aborted:
            self._aborted += 1
