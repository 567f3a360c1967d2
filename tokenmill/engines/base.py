"""The protocols every token-level model backend implements.

One protocol serves every serving pattern: `step()` runs one forward pass over a list of chunks,
each chunk feeding some of one sequence's not-yet-computed tokens. The replica patterns call it
with a single chunk (see `replica.generate`); the batching scheduler calls it with many. Engines
do no HTTP and no asyncio: `step()` is a plain blocking call, so it runs in a thread or process.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tokenmill.generation import ChatMessage, ToolFunction
from tokenmill.reasoning import ReasoningFormat
from tokenmill.tools import ToolCallFormat

if TYPE_CHECKING:
    from tokenmill.engines.prefix_cache import PrefixCacheStats
    from tokenmill.engines.sequence import Sequence


class Tokenizer(Protocol):
    @property
    def context_window(self) -> int: ...

    def render_chat(self, messages: Seq[ChatMessage], tools: Seq[ToolFunction] = ()) -> str:
        """Apply the model's own chat template, ending with the assistant's turn opened; `tools`
        are declared in the prompt the way the model's family expects."""

    @property
    def tool_call_format(self) -> ToolCallFormat:
        """How this model writes tool calls (the prompt section, the grammar, the parser)."""

    @property
    def reasoning_format(self) -> ReasoningFormat | None:
        """How this model writes its reasoning (None: it writes none apart from its answer)."""

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1."""

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Prompt text -> token ids, with whatever special tokens the model expects up front
        (`add_special=False`: the text's own tokens only)."""

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (may be part of a multi-byte UTF-8 character)."""

    def is_end_of_generation(self, token_id: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """Feed `num_tokens` of `seq`'s pending tokens; sample a next token if that reaches its end.
    `draft` (speculative decoding, only on a chunk that reaches the end): tokens guessed to follow,
    fed in the same pass and checked against what the engine samples at each of their positions."""

    seq: Sequence
    num_tokens: int
    draft: tuple[int, ...] = ()

    @property
    def completes_sequence_input(self) -> bool:
        return self.num_tokens == self.seq.num_pending

    @property
    def completes_prompt(self) -> bool:
        """This chunk ends the prompt's prefill (the prefix cache stores the prompt then)."""
        return self.completes_sequence_input and self.seq.num_generated == 0


@dataclass(frozen=True, slots=True)
class DraftCosts:
    """What verifying guessed tokens costs one engine (speculative decoding, measured per engine)."""

    row_cost: float = 1.0  # one guessed row, as a fraction of a one-row step (1 or more: never pays)
    max_tokens: int = 0  # the most guesses it verifies for one sequence in one step
    # guesses must keep a step whose fed tokens fit in this many rows within it (None: no limit):
    # past it the engine computes differently (torch: the bf16 weights, not the int4 kernel)
    max_step_rows: int | None = None


@dataclass(frozen=True, slots=True)
class SampledLogprobs:
    """What an engine reports with a sampled token when the sequence asked for log-probabilities
    (`engines.logprobs`): the model's log-softmax before any sampling filter."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely tokens, most likely first
    rank: int | None = None  # 1 + how many tokens score higher (computed for prompt tokens only)


class StepEngine(Protocol):
    max_chunk_tokens: int  # the most tokens one chunk may carry
    draft_costs: DraftCosts  # speculative decoding: what guesses cost this engine

    @property
    def tokenizer(self) -> Tokenizer:
        """The engine's own tokenizer (a read-only member: each engine has its own kind)."""

    def add_sequence(self, seq: Sequence) -> None:
        """Set up per-sequence state (sampler, cache slot) before its first step. An engine with a
        prefix cache may advance `seq.num_computed` past prompt tokens it already holds."""

    def step(self, chunks: Seq[Chunk]) -> list[list[int]]:
        """One forward pass. Returns, per chunk, the tokens sampled: none for a partial prefill, else
        the next token; with a draft, first the draft's longest start that matches what the engine
        samples at those positions (each sampled in turn, as without a draft), then the token it
        samples after them. An engine may ignore drafts (it then samples one token) but must not
        keep the KV cells of guesses it did not return.
        For a sequence whose params ask for logprobs, first `seq.note_logprobs(...)` the token's;
        for one that asks for prompt_logprobs, `seq.note_prompt_logprobs(...)` every prompt token
        the chunk predicts (`engines.logprobs.scored_positions`). Such a sequence takes nothing
        from a prefix cache: its whole prompt is computed."""

    def remove_sequence(self, seq: Sequence) -> None:
        """Free everything `seq` held (its KV cells, its sampler). Safe to call twice."""

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """What the prefix cache has served so far, and holds now (zeros for an engine without one)."""

    def cached_prefix_length(self, tokens: list[int]) -> int | None:
        """How many leading `tokens` the prefix cache holds now, in either tier, without counting it
        as a use (None: the engine keeps no prefix cache). The scheduler asks it to tell whether a
        newcomer should wait for a prompt in prefill that starts the same way."""

    def close(self) -> None: ...
