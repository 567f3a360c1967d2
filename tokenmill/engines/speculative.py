"""Speculative decoding without a draft model: prompt lookup (n-gram) drafts, verified in one pass.

A sequence that quotes its context (a rewrite, an extraction, a RAG answer, code edits) writes
runs of tokens that already occur earlier in its prompt or answer. Take the last few tokens
written, find where they last occurred before, and guess that what followed them then follows
them now (llama.cpp's `ngram` speculators and vLLM's prompt-lookup proposer work the same way).
The engine feeds the guesses in the sequence's decode row as extra tokens, samples each position
as it would have, one after the other, and keeps the guesses up to the first one its own sample
disagrees with, then that sample: every step yields 1 to k+1 tokens for a bit more than one row's
cost while decoding is bound by weights read rather than by arithmetic.

Why the output is unchanged: position i is only used when every guess before it matched what was
sampled, so it is sampled from exactly the distribution it would have had, with the sequence's own
generator advanced once per token kept (seeded requests repeat with and without drafts). With a
draft that is one token for sure, that is the rejection-sampling rule of speculative decoding
(accept with p(guess); otherwise draw from p without the guess) written the simple way.

This module is pure bookkeeping (no model, no I/O): `Speculator` picks each decode row's draft and
learns from what was kept, turning drafting off for a sequence whose guesses keep failing, and for
the whole step when the batch is big enough that extra rows cost real arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.engines.base import Chunk, DraftCosts
from tokenmill.engines.sequence import Sequence
from tokenmill.generation import TokenEvent

MIN_NGRAM = 2  # one matching token says little about what follows it
MAX_NGRAM = 4  # longer matches first: the more context agrees, the better the guess
PRIOR_RATE, PRIOR_TRIALS = 0.75, 2.0  # a new sequence's guesses are taken to be kept this often
DECAY = 0.8  # how much of its past a sequence's rate keeps at each verification
PAUSE_TOKENS = 16  # no drafts for this many tokens once they stop paying; it doubles each time
MAX_PAUSE_TOKENS = 256


@dataclass(frozen=True, slots=True)
class DraftStats:
    """What drafting has done so far (counters: `tokenmill_spec_decode_*` on /metrics)."""

    drafts: int = 0  # decode rows that carried guesses
    draft_tokens: int = 0  # tokens guessed
    accepted_tokens: int = 0  # of those, kept

    def plus(self, other: DraftStats) -> DraftStats:
        return DraftStats(
            self.drafts + other.drafts,
            self.draft_tokens + other.draft_tokens,
            self.accepted_tokens + other.accepted_tokens,
        )


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    max_draft: int  # tokens guessed for one sequence in one step, where its request does not say (0: none)
    max_batch: int  # draft only while at most this many sequences decode in the step


class NgramIndex:
    """Where each n-gram (MIN_NGRAM to MAX_NGRAM tokens) of a growing token list last ended,
    indexed as the list grows: a lookup is a few dict reads, whatever its length."""

    def __init__(self, tokens: list[int]):
        self._tokens = tokens  # the sequence's own list: it only ever grows at the end
        self._last_end: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in the index

    def propose(self, k: int) -> tuple[int, ...]:
        """Up to `k` tokens guessed to follow the list, from the latest earlier occurrence of its
        longest possible ending (nothing where no ending of at least MIN_NGRAM tokens recurs)."""
        tokens = self._tokens
        if k <= 0 or len(tokens) <= MIN_NGRAM:
            return ()
        self._index_until(len(tokens) - 1)  # the ending itself must not find itself
        for n in range(min(MAX_NGRAM, len(tokens) - 1), MIN_NGRAM - 1, -1):
            end = self._last_end.get(tuple(tokens[-n:]))
            if end is not None:
                return tuple(tokens[end + 1 : end + 1 + k])
        return ()

    def _index_until(self, stop: int) -> None:
        tokens, index = self._tokens, self._last_end
        for end in range(max(self._indexed, MIN_NGRAM - 1), stop):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end + 1) + 1):
                index[tuple(tokens[end - n + 1 : end + 1])] = end
        self._indexed = max(self._indexed, stop)


class _Drafting:
    """One sequence's drafting state: its n-gram index and how often its guesses are kept."""

    __slots__ = ("index", "kept", "pause", "paused_until", "trials")

    def __init__(self, tokens: list[int]) -> None:
        self.index = NgramIndex(tokens)
        self.kept, self.trials = PRIOR_RATE * PRIOR_TRIALS, PRIOR_TRIALS  # decayed counts
        self.paused_until = 0  # no drafts before this many tokens are generated
        self.pause = PAUSE_TOKENS

    @property
    def rate(self) -> float:
        return self.kept / self.trials


class Speculator:
    """Picks drafts for a step's decode rows and learns from what the engine kept.

    How long a draft is follows from what a guessed row costs and how often this sequence's
    guesses are kept: at a rate `a`, k guesses yield 1 + a + ... + a^k tokens for a step that
    costs 1 + `row_cost` x k (the engine's `DraftCosts`, measured per engine); the best k is
    taken. Where no k beats a plain step, the sequence pauses, then tries again from the prior."""

    def __init__(self, config: SpeculativeConfig, costs: DraftCosts):
        self.config = config
        self.costs = costs
        self._states: dict[int, _Drafting] = {}
        self.draft_rows = 0  # decode rows that carried guesses, over the speculator's life
        self.drafted = 0  # tokens guessed
        self.accepted = 0  # of those, kept

    def stats(self) -> DraftStats:
        return DraftStats(self.draft_rows, self.drafted, self.accepted)

    def draft_length(self, seq: Sequence) -> int:
        """The most tokens `seq` may have guessed this step (0: none), by its request and its state."""
        wanted = seq.params.speculative_tokens
        limit = min(self.config.max_draft if wanted is None else wanted, self.costs.max_tokens)
        # a draft kept whole, and the token after it, must not pass the answer's length
        limit = min(limit, seq.max_new_tokens - seq.num_generated - 1)
        if limit <= 0 or not eligible(seq):
            return 0
        state = self._states.get(seq.seq_id)
        if state is None:
            return best_length(PRIOR_RATE, self.costs.row_cost, limit)
        if seq.num_generated < state.paused_until:
            return 0
        return best_length(state.rate, self.costs.row_cost, limit)

    def drafts(self, decoding: list[Sequence], budget: int) -> dict[int, tuple[int, ...]]:
        """A draft for each of `decoding` (sequences whose next step is one decode row) that has a
        guess, using at most `budget` extra tokens in all; none when the batch is too big."""
        if len(decoding) > self.config.max_batch:
            return {}
        if self.costs.max_step_rows is not None:
            budget = min(budget, self.costs.max_step_rows - len(decoding))
        drafts: dict[int, tuple[int, ...]] = {}
        for seq in decoding:
            k = min(self.draft_length(seq), budget)
            if k <= 0:
                continue
            state = self._states.get(seq.seq_id)
            if state is None:
                state = self._states[seq.seq_id] = _Drafting(seq.token_ids)
            guess = state.index.propose(k)
            if guess:
                drafts[seq.seq_id] = guess
                budget -= len(guess)
        return drafts

    def with_drafts(self, chunks: list[Chunk], budget: int) -> tuple[list[Chunk], int]:
        """`chunks` (one decode row each) with the drafts `drafts` gives them, and how many tokens
        those guess in all (0: `chunks` as they were)."""
        drafts = self.drafts([c.seq for c in chunks], budget)
        if not drafts:
            return chunks, 0
        guessed = sum(len(draft) for draft in drafts.values())
        return [Chunk(c.seq, 1, drafts.get(c.seq.seq_id, ())) for c in chunks], guessed

    def fit(self, chunks: list[Chunk]) -> list[Chunk]:
        """A step's chunks with their drafts cut, in order, so that a step whose fed tokens are
        within the engine's `max_step_rows` stays within it (prompt chunks planned after the drafts
        can leave less room than the decode rows alone did)."""
        limit = self.costs.max_step_rows
        if limit is None:
            return chunks
        rows = sum(c.num_tokens for c in chunks)
        room = limit - rows
        if rows > limit or sum(len(c.draft) for c in chunks) <= room:
            return chunks
        fitted = []
        for chunk in chunks:
            take = max(0, min(len(chunk.draft), room))
            room -= take
            fitted.append(Chunk(chunk.seq, chunk.num_tokens, chunk.draft[:take]) if take < len(chunk.draft) else chunk)
        return fitted

    def take(self, chunk: Chunk, tokens: list[int]) -> list[TokenEvent]:
        """`take_sampled` for a step's chunk, learning from what its draft kept."""
        if chunk.draft and tokens:
            self.note(chunk.seq, len(chunk.draft), len(tokens) - 1)
        return take_sampled(chunk.seq, chunk.num_tokens, tokens)

    def note(self, seq: Sequence, drafted: int, kept: int) -> None:
        """`kept` of `drafted` guessed tokens were what the engine sampled."""
        self.draft_rows += 1
        self.drafted += drafted
        self.accepted += kept
        state = self._states.get(seq.seq_id)
        if state is None:
            return
        # every guess up to the first one missed was a trial
        state.kept = DECAY * state.kept + kept
        state.trials = DECAY * state.trials + min(kept + 1, drafted)
        if best_length(state.rate, self.costs.row_cost, self.costs.max_tokens) == 0:
            state.paused_until = seq.num_generated + state.pause
            state.pause = min(2 * state.pause, MAX_PAUSE_TOKENS)
            state.kept, state.trials = PRIOR_RATE * PRIOR_TRIALS, PRIOR_TRIALS  # afresh after the pause
        elif kept:
            state.pause = PAUSE_TOKENS

    def forget(self, seq: Sequence) -> None:
        self._states.pop(seq.seq_id, None)


def best_length(rate: float, row_cost: float, limit: int) -> int:
    """The draft length k <= `limit` with the most tokens per unit of step cost, where each guess
    is kept with probability `rate` while those before it were (0: a plain step is best)."""
    best, best_gain = 0, 1.0
    tokens, chance = 1.0, 1.0
    for k in range(1, limit + 1):
        chance *= rate
        tokens += chance
        gain = tokens / (1.0 + row_cost * k)
        if gain > best_gain:
            best, best_gain = k, gain
    return best


def eligible(seq: Sequence) -> bool:
    """Whether a draft can be verified for `seq` token by token as it would have been sampled:
    not for a grammar (its mask follows each token), log-probabilities (one entry per step),
    penalties (they count the tokens before each position), or while min_tokens still forbids the
    end token (the mask depends on how many came before)."""
    params = seq.params
    return (
        params.grammar is None
        and not params.penalized
        and params.logprobs is None
        and params.prompt_logprobs is None
        and seq.num_generated >= params.min_tokens
    )


def verify(draft: tuple[int, ...], sample: Callable[[int], int], is_end: Callable[[int], bool]) -> list[int]:
    """The tokens a step yields for a row carrying `draft`: `sample(i)` samples the row after
    the last token fed (0) or after guess i, in turn, while each sample is the next guess (and
    not an end token); the samples taken are the guesses kept, then the token after them."""
    kept: list[int] = []
    for i, guess in enumerate((*draft, None)):
        token = sample(i)
        kept.append(token)
        if token != guess or is_end(token):
            break
    return kept


def take_sampled(seq: Sequence, num_fed: int, tokens: list[int]) -> list[TokenEvent]:
    """Record one step's outcome for `seq`: `num_fed` pending tokens went through the model, then
    `tokens` were sampled (with a draft: the guesses kept, then the engine's next token; each
    guess kept was computed in the same pass). Tokens after the sequence finished are dropped."""
    seq.num_computed += num_fed
    events: list[TokenEvent] = []
    for i, token in enumerate(tokens):
        if i:
            seq.num_computed += 1  # the guess before this token is in the KV cache
        events.extend(seq.append_token(token))
        if seq.is_finished:
            break
    return events
