"""The interface every serving pattern implements, and the handle a submitted request returns.

runner.submit(request) -> RequestHandle      (raises InvalidRequest before any model work)
async for event in handle: ...               (TextDelta ... Finished; raises TokenmillError)
handle.abort()                               (client gone / deadline: stop generating, free capacity)
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from tokenmill.engines.base import Tokenizer
from tokenmill.engines.prefix_cache import PrefixCacheStats
from tokenmill.engines.sequence import Sequence, chat_prompt, prepare_sequence
from tokenmill.engines.speculative import DraftStats
from tokenmill.errors import EngineFailure, InvalidRequest, Overloaded, TokenmillError
from tokenmill.generation import ChatMessage, Finished, GenerationRequest, TokenEvent, ToolFunction
from tokenmill.reasoning import ReasoningFormat, ReasoningSetup
from tokenmill.runners.embeddings import Embeddings, EmbeddingService
from tokenmill.runners.restarts import RestartPolicy
from tokenmill.tools import ToolCallFormat

log = logging.getLogger(__name__)


class RequestHandle:
    """Async iterator over one request's events. Producers call `put*` on the event loop thread."""

    def __init__(
        self, request_id: str, on_abort: Callable[[], object], prompt_tokens: int | None = None
    ):  # on_abort's result is ignored; prompt_tokens: None where unknown until the end (upstream)
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
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
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)  # zeros where out of reach
    speculative: DraftStats = field(default_factory=DraftStats)  # zeros where out of reach


class Runner(ABC):
    """A serving pattern: how admitted requests reach the model.

    A runner that supervises its engines says so through `ready` (False while an engine restarts)
    and `restarts()`; when it gives up (a crash loop) it calls `on_fatal`, which the server sets."""

    model_name: str
    limits: RequestLimits = RequestLimits()
    on_fatal: Callable[[str], None] | None = None
    on_capacity_change: Callable[[int, int], None] | None = None  # (engines up, engines configured)

    def __init__(self) -> None:
        self._in_flight = 0  # event-loop thread only, like everything here
        self._aborted = 0
        self._restarts: Counter[str] = Counter()

    @property
    def ready(self) -> bool:
        """Whether a submitted request can start now (False while an engine is being replaced)."""
        return True

    def restarts(self) -> dict[str, int]:
        """Engine (or worker) restarts since start, by reason."""
        return dict(self._restarts)

    def retry_after(self) -> float:
        """While not ready: seconds until it likely is again."""
        return 1.0

    def restarting_error(self) -> Overloaded:
        """What a request gets while no engine can take it: 503 engine_restarting, with Retry-After."""
        return Overloaded(
            "The model engine is restarting after a failure; retry shortly.",
            retry_after=self.retry_after(),
            code="engine_restarting",
        )

    def _restart_delay(self, policy: RestartPolicy, reason: str, *, keep_trying: bool = False) -> float | None:
        """Record an engine failure: seconds to wait before restarting it, or None after giving up
        (a crash loop ends the server). `keep_trying`: other engines still serve, so a crash loop
        only slows the retries to the policy's slowest pace."""
        delay = policy.next_delay()
        if delay is None and keep_trying:
            delay = policy.max_delay
        if delay is None:
            message = (
                f"the model engine failed {policy.limit + 1} times within {policy.window:g}s (last: {reason}); "
                "giving up so that the orchestrator can replace this server"
            )
            log.critical(message)
            if self.on_fatal is not None:
                self.on_fatal(message)
            return None
        self._restarts[reason] += 1
        return delay

    def request_tokenizer(self) -> Tokenizer:
        """The tokenizer requests are prepared with; /tokenize and /detokenize use it too."""
        raise InvalidRequest("this server relays to an upstream API and has no tokenizer of its own")

    relays = False  # an upstream API gets the client's own request fields (GenerationRequest.relay)
    embeddings: EmbeddingService | None = None  # set by build_runner for a local model

    async def embed(self, inputs: Seq[str] | Seq[Seq[int]]) -> Embeddings:
        """Unit vectors for texts (tokenized as prompts are) or token id lists, in order."""
        if self.embeddings is None:
            raise InvalidRequest("this server relays to an upstream API and serves no embeddings", param="input")
        tokenizer = self.request_tokenizer()
        token_lists = [tokenizer.encode(item) if isinstance(item, str) else list(item) for item in inputs]
        window = tokenizer.context_window
        for index, tokens in enumerate(token_lists):
            if not tokens:
                raise InvalidRequest(f"input {index} is empty", param="input")
            if len(tokens) > window:
                raise InvalidRequest(
                    f"input {index} has {len(tokens)} tokens; this model embeds at most {window}", param="input"
                )
            _check_token_ids(tokens, tokenizer, f"input {index}", "input")
        return await self.embeddings.embed(token_lists)

    def tool_call_format(self) -> ToolCallFormat | None:
        """How the served model writes tool calls; None where an upstream API parses its own."""
        return self.request_tokenizer().tool_call_format

    def reasoning(self, named: ReasoningFormat | None = None) -> ReasoningSetup | None:
        """How the served model writes its reasoning (`named`, else what its chat template says),
        and whether its chat prompt opens it; None where it writes none."""
        tokenizer = self.request_tokenizer()
        fmt = named or tokenizer.reasoning_format
        if fmt is None:
            return None
        return ReasoningSetup(fmt, fmt.opened_by(tokenizer.render_chat((ChatMessage("user", "hi"),))))

    def prepare(self, request: GenerationRequest) -> Sequence:
        return prepare_sequence(
            request, self.request_tokenizer(), self.limits.max_prompt_tokens, self.limits.max_tokens
        )

    def tokenize(
        self,
        prompt: str | None,
        messages: tuple[ChatMessage, ...] | None,
        add_special: bool,
        tools: tuple[ToolFunction, ...] = (),
        continue_final: bool = False,
    ) -> list[int]:
        """A prompt's token ids, or chat messages' (and tools') through the model's template,
        assistant turn opened: the prompt a generation of them would have."""
        tokenizer = self.request_tokenizer()
        text = chat_prompt(tokenizer, messages, tools, continue_final) if messages is not None else (prompt or "")
        return tokenizer.encode(text, add_special)

    def detokenize(self, token_ids: list[int]) -> str:
        tokenizer = self.request_tokenizer()
        _check_token_ids(token_ids, tokenizer, "tokens", "tokens")
        return b"".join(tokenizer.token_bytes(token) for token in token_ids).decode("utf-8", errors="replace")

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

    # -- the bookkeeping every pattern shares
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


def _check_token_ids(tokens: Seq[int], tokenizer: Tokenizer, what: str, param: str) -> None:
    if any(not 0 <= token < tokenizer.vocab_size for token in tokens):
        raise InvalidRequest(
            f"{what} holds a token id outside the vocabulary (0 to {tokenizer.vocab_size - 1})", param=param
        )
