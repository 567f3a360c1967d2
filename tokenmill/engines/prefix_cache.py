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
  `budget_tokens` and a holder is free.

Running sequences own their cells: an entry is a copy (or, in llama.cpp's unified cache, a shared
reference), so dropping one never touches a sequence in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

HOLDERS = 16  # cached prompts at most (llama.cpp: sequence ids kept for them)


@dataclass
class CachedPrompt:
    holder: int
    tokens: list[int]
    last_used: int = 0


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, served from the cache
    cached_tokens: int = 0  # cells the cache holds now


@dataclass(frozen=True, slots=True)
class Store:
    """What an engine does to remember a prompt: copy cells [start, end) of the sequence into
    `holder` (after clearing the holder from `start` on), having first dropped `evicted`."""

    holder: int
    start: int
    end: int
    evicted: tuple[int, ...] = ()


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class PrefixIndex:
    holders: list[int]  # the engine's holders, all free at first
    budget_tokens: int
    entries: list[CachedPrompt] = field(default_factory=list)
    _clock: int = 0
    _queried: int = 0
    _hits: int = 0

    def longest_match(self, prompt: Sequence[int]) -> tuple[CachedPrompt | None, int]:
        """The entry sharing the most leading tokens with `prompt`, and how many (0: none)."""
        best, length = None, 0
        for entry in self.entries:
            shared = shared_length(entry.tokens, prompt)
            if shared > length:
                best, length = entry, shared
        if best is not None:
            self._touch(best)
        return best, length

    def reuse(self, prompt: Sequence[int]) -> tuple[int, int] | None:
        """For a new sequence's prompt: (the holder whose cells to copy, how many), or None. The
        last prompt token is always left to compute: the first sampled token needs its logits."""
        entry, shared = self.longest_match(prompt[:-1])
        self._queried += len(prompt)
        self._hits += shared
        return (entry.holder, shared) if entry is not None and shared else None

    def store(self, prompt: Sequence[int]) -> Store | None:
        """Remember `prompt`; None when nothing need be copied (already cached, or too long)."""
        tokens = list(prompt)
        if len(tokens) > self.budget_tokens:
            return None
        for entry in self.entries:
            shared = shared_length(entry.tokens, tokens)
            if shared == len(tokens):  # already held, as a prompt or as the start of a longer one
                self._touch(entry)
                return None
            if shared == len(entry.tokens):  # the prompt extends this entry: grow it in place
                evicted = self._make_room(len(tokens) - len(entry.tokens), keep=entry, need_holder=False)
                entry.tokens = tokens
                self._touch(entry)
                return Store(entry.holder, shared, len(tokens), evicted)
        evicted = self._make_room(len(tokens), keep=None, need_holder=True)
        entry = CachedPrompt(self.holders.pop(), tokens)
        self.entries.append(entry)
        self._touch(entry)
        return Store(entry.holder, 0, len(tokens), evicted)

    def clear(self) -> list[int]:
        """Drop every entry; returns the holders to empty."""
        dropped = [entry.holder for entry in self.entries]
        self.holders.extend(dropped)
        self.entries.clear()
        return dropped

    def evict_oldest(self, keep: CachedPrompt | None = None) -> int | None:
        """Drop the least recently used entry but `keep` (an engine short of cells: any); its
        holder, or None when there is none to drop."""
        victims = [entry for entry in self.entries if entry is not keep]
        if not victims:
            return None
        victim = min(victims, key=lambda entry: entry.last_used)
        self.entries.remove(victim)
        self.holders.append(victim.holder)
        return victim.holder

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._queried, self._hits, self.cached_tokens)

    @property
    def cached_tokens(self) -> int:
        return sum(len(entry.tokens) for entry in self.entries)

    def _make_room(self, tokens: int, keep: CachedPrompt | None, need_holder: bool) -> tuple[int, ...]:
        evicted = []
        while self.cached_tokens + tokens > self.budget_tokens or (need_holder and not self.holders):
            holder = self.evict_oldest(keep)
            if holder is None:
                break
            evicted.append(holder)
        return tuple(evicted)

    def _touch(self, entry: CachedPrompt) -> None:
        self._clock += 1
        entry.last_used = self._clock
