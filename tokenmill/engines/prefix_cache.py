"""The prefix cache's bookkeeping, shared by both engines: which prompts are cached, which one a new
prompt shares the most with, and which to drop when full. Pure Python, no model code: an engine
keeps each cached prompt's KV cells in a *holder* of its own (a llama.cpp sequence id, a torch
cache row) and asks this index what to copy where.

- `longest_match(prompt)`: the cached prompt sharing the longest start with `prompt`.
- `store(prompt)`: a prompt that just finished prefill is remembered, and a finished sequence's
  prompt and answer (the next turn of a conversation resends both). A cached prompt it extends
  (a conversation's earlier turn, the sequence's own prompt) is grown in place; one that already
  covers it is only touched.
  Otherwise it takes a free holder, dropping the least recently used entries until it fits in
  `budget_tokens` and a holder is free. A new entry that starts like a held one is built on that
  one's cells (`Store.source`), so the start they share is held once.

The budget counts distinct cells: entries sharing a start (N conversations on one system prompt)
are a tree of prefixes, and the cells of the shared start count once (`cached_tokens`). An entry
dropped to make room is offered first to `evicting` (the host-memory tier, prefix_tiers.py), while
its cells are still there to copy.

Running sequences own their cells: an entry is a copy (or, in llama.cpp's unified cache, a shared
reference), so dropping one never touches a sequence in flight.

Answers are cached while they pay. A cached answer helps only a conversation that comes back with
it; in llama.cpp's unified cache every held cell costs every decode row of every step (attention
walks the mask of all cells up to the highest in use), and caching single-turn answers cost a
fifth of the throughput at 8 and 32 streams (docs/benchmarks.md). So the index counts how the
answers it cached ended: resent by a later prompt, or not -- dropped unused, or its prompt sent
again without it (a single-turn app's repeated prompt: the entry's prompt is used, so LRU alone
would keep the answer's cells forever; it shrinks back to the prompt at the next store). While
fewer than one in ANSWER_WORTH were resent, it caches only one answer in ANSWER_PROBE, enough to
see a workload turn conversational. Prompts are always cached.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field

HOLDERS = 16  # cached prompts at most (llama.cpp: sequence ids kept for them)
ANSWER_WORTH = 8  # cache every answer while at least one in this many cached was reused
ANSWER_PROBE = 8  # else cache one finished answer in this many, to notice conversations starting
ANSWER_MEMORY = 64  # outcomes counted (older ones fade by halves), so a change of workload shows


@dataclass
class CachedPrompt:
    holder: int
    tokens: list[int]
    last_used: int = 0
    answer_from: int | None = None  # where a finished sequence's answer starts (None: a prompt alone)
    answer_unused: bool = False  # its prompt came again without it: shrink back to the prompt


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """Counters (totals since start) and gauges (now) of both tiers."""

    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, served from the cache (either tier)
    cached_tokens: int = 0  # distinct cells the KV tier holds now
    answers_skipped: int = 0  # finished answers not cached, since too few cached ones were resent
    host_hit_tokens: int = 0  # of hit_tokens, restored from the host-memory tier
    host_tokens: int = 0  # tokens the host tier holds copies of now
    host_bytes: int = 0  # and their size
    host_entries: int = 0
    evictions: int = 0  # KV tier entries dropped for room (copied to the host tier, where it is on)
    host_evictions: int = 0  # host copies dropped for room

    GAUGES = frozenset({"cached_tokens", "host_tokens", "host_bytes", "host_entries"})

    @staticmethod
    def total(parts: Sequence[PrefixCacheStats]) -> PrefixCacheStats:
        """Several engines' stats as one (replicas side by side)."""
        return PrefixCacheStats(*(sum(values) for values in zip(*(astuple(part) for part in parts), strict=True)))

    def after(self, earlier: PrefixCacheStats) -> PrefixCacheStats:
        """This engine's stats carried on from an earlier one's (a restarted engine): counters
        add up, gauges are this one's."""
        return PrefixCacheStats(
            **{
                name: getattr(self, name) + (0 if name in self.GAUGES else getattr(earlier, name))
                for name in self.__dataclass_fields__
            }
        )


@dataclass(frozen=True, slots=True)
class Store:
    """What an engine does to remember a prompt: copy cells [start, end) of the sequence into
    `holder` (after clearing the holder from `start` on), having first dropped `evicted`. With
    start == end it only clears: an entry shrinks back to its prompt. A new entry with a `source`
    takes that holder's first `start` cells (the same cells, where the engine can share them)."""

    holder: int
    start: int
    end: int
    evicted: tuple[int, ...] = ()
    source: int | None = None


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share: slices compared in C, halving the range, since a
    match runs to hundreds of tokens and the index compares every entry on every lookup."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def distinct_tokens(prompts: Sequence[list[int]]) -> int:
    """The cells a tree of these prompts holds: each shared start once (the sum of the lengths,
    less what each prompt shares with its neighbour in sorted order)."""
    ordered = sorted(prompts)
    total = sum(len(prompt) for prompt in ordered)
    return total - sum(shared_length(a, b) for a, b in itertools.pairwise(ordered))


@dataclass
class PrefixIndex:
    holders: list[int]  # the engine's holders, all free at first
    budget_tokens: int
    entries: list[CachedPrompt] = field(default_factory=list)
    evicting: Callable[[CachedPrompt], None] | None = (
        None  # told of an entry dropped for room, before its holder is freed
    )
    _clock: int = 0
    _queried: int = 0
    _hits: int = 0
    _answers_reused: float = 0.0
    _answers_unused: float = 0.0
    _answers_skipped: int = 0
    _since_probe: int = 0
    _distinct: int | None = None  # cached_tokens, kept until the entries change (read at every step's stats)

    def longest_match(self, prompt: Sequence[int]) -> tuple[CachedPrompt | None, int]:
        """The entry sharing the most leading tokens with `prompt`, and how many (0: none)."""
        best, length = self.peek(prompt)
        if best is not None:
            self._touch(best)
            if best.answer_from is not None and not best.answer_unused:
                if length > best.answer_from:
                    best.answer_from = None  # resent: from here on it is a conversation's prompt
                    self._answer_ended(reused=True)
                elif length >= best.answer_from - 1:  # the same prompt (less its last token) again
                    best.answer_unused = True
                    self._answer_ended(reused=False)
        return best, length

    def reuse(self, prompt: Sequence[int]) -> tuple[int, int] | None:
        """For a new sequence's prompt: (the holder whose cells to copy, how many), or None. The
        last prompt token is always left to compute: the first sampled token needs its logits."""
        entry, shared = self.longest_match(prompt[:-1])
        self._queried += len(prompt)
        self._hits += shared
        return (entry.holder, shared) if entry is not None and shared else None

    def store(self, prompt: Sequence[int], answer_from: int | None = None) -> Store | None:
        """Remember `prompt` -- with `answer_from`, a finished sequence's prompt and answer, the
        answer starting there; None when nothing need be copied (already cached, too long, or an
        answer while answers are not being reused)."""
        try:
            return self._store(prompt, answer_from)
        finally:
            self._distinct = None  # an entry may have grown, shrunk or been added

    def _store(self, prompt: Sequence[int], answer_from: int | None) -> Store | None:
        tokens = list(prompt)
        if len(tokens) > self.budget_tokens:
            return None
        if answer_from is not None and not self._caching_answer():
            return None
        for entry in self.entries:
            shared = shared_length(entry.tokens, tokens)
            if shared == len(tokens):  # already held, as a prompt or as the start of a longer one
                self._touch(entry)
                if entry.answer_unused and entry.answer_from == len(tokens):  # its answer goes
                    entry.tokens, entry.answer_from, entry.answer_unused = tokens, None, False
                    return Store(entry.holder, len(tokens), len(tokens))
                return None
            same_prompt = answer_from is not None and entry.answer_from == answer_from and shared >= answer_from
            if same_prompt and not self._answers_pay():
                # the same prompt with another answer, while answers are not resent: the new
                # answer replaces the entry's. A second entry would push out another prompt (in a
                # single-turn flood, a light key's cached prompt: measured, its 12-token prefill)
                evicted = self._make_room(len(tokens) - len(entry.tokens), keep=entry, need_holder=False)
                if not entry.answer_unused:
                    self._answer_ended(reused=False)
                entry.tokens, entry.answer_unused = tokens, False
                self._touch(entry)
                return Store(entry.holder, shared, len(tokens), evicted)
            if shared == len(entry.tokens):  # the prompt extends this entry: grow it in place
                evicted = self._make_room(len(tokens) - len(entry.tokens), keep=entry, need_holder=False)
                entry.tokens, entry.answer_from = tokens, answer_from  # (reuse() saw any answer resent)
                entry.answer_unused = False
                self._touch(entry)
                return Store(entry.holder, shared, len(tokens), evicted)
        source, start = self.peek(tokens)
        evicted = self._make_room(len(tokens) - start, keep=source, need_holder=True)
        entry = CachedPrompt(self.holders.pop(), tokens, answer_from=answer_from)
        self.entries.append(entry)
        self._touch(entry)
        if source is None:
            return Store(entry.holder, 0, len(tokens), evicted)
        return Store(entry.holder, start, len(tokens), evicted, source=source.holder)

    def peek(self, tokens: Sequence[int]) -> tuple[CachedPrompt | None, int]:
        """The entry sharing the longest start with `tokens` (a new entry is built on it), untouched."""
        best, length = None, 0
        for entry in self.entries:
            shared = shared_length(entry.tokens, tokens)
            if shared > length:
                best, length = entry, shared
        return best, length

    def clear(self) -> list[int]:
        """Drop every entry; returns the holders to empty."""
        dropped = [entry.holder for entry in self.entries]
        self.holders.extend(dropped)
        self._distinct = None
        self.entries.clear()  # what nobody resent before a reset says nothing of the workload
        return dropped

    def evict_oldest(self, keep: CachedPrompt | None = None) -> int | None:
        """Drop the least recently used entry but `keep` (an engine short of cells: any); its
        holder, or None when there is none to drop."""
        victims = [entry for entry in self.entries if entry is not keep]
        if not victims:
            return None
        victim = min(victims, key=lambda entry: entry.last_used)
        self._drop(victim)
        return victim.holder

    def served_elsewhere(self, shared: int) -> None:
        """The `shared` tokens `reuse()` offered were served by a longer host copy instead."""
        self._hits -= shared

    def lost(self, holder: int, shared: int) -> None:
        """The engine could not copy `holder`'s cells after `reuse()` offered `shared` of them:
        they were computed, not served, and an entry with nothing to copy is dropped."""
        self._hits -= shared
        for entry in self.entries:
            if entry.holder == holder:
                self._drop(entry, for_room=False)  # nothing to copy
                return

    def _drop(self, entry: CachedPrompt, for_room: bool = True) -> None:
        """Forget `entry` and free its holder; an answer nobody resent before it went counts as unused."""
        if for_room and self.evicting is not None:
            self.evicting(entry)
        self._distinct = None
        self.entries.remove(entry)
        if entry.answer_from is not None and not entry.answer_unused:
            self._answer_ended(reused=False)
        self.holders.append(entry.holder)

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._queried, self._hits, self.cached_tokens, self._answers_skipped)

    @property
    def cached_tokens(self) -> int:
        """Distinct cells held: a start shared by several entries counts once."""
        if self._distinct is None:
            self._distinct = distinct_tokens([entry.tokens for entry in self.entries])
        return self._distinct

    def _make_room(self, tokens: int, keep: CachedPrompt | None, need_holder: bool) -> tuple[int, ...]:
        evicted = []
        while self.cached_tokens + tokens > self.budget_tokens or (need_holder and not self.holders):
            holder = self.evict_oldest(keep)
            if holder is None:
                break
            evicted.append(holder)
        return tuple(evicted)

    def _answers_pay(self) -> bool:
        """Whether at least one in ANSWER_WORTH of the cached answers whose fate is known was
        resent (or none is known yet)."""
        reused, unused = self._answers_reused, self._answers_unused
        return reused * ANSWER_WORTH >= reused + unused

    def _caching_answer(self) -> bool:
        """Whether to cache this finished answer: yes while answers pay, else one in ANSWER_PROBE."""
        if self._answers_pay():
            return True
        self._since_probe += 1
        if self._since_probe < ANSWER_PROBE:
            self._answers_skipped += 1
            return False
        self._since_probe = 0
        return True

    def _answer_ended(self, reused: bool) -> None:
        if reused:
            self._answers_reused += 1
        else:
            self._answers_unused += 1
        if self._answers_reused + self._answers_unused > ANSWER_MEMORY:
            self._answers_reused /= 2
            self._answers_unused /= 2

    def _touch(self, entry: CachedPrompt) -> None:
        self._clock += 1
        entry.last_used = self._clock
