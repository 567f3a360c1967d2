"""The prefix cache's second tier: copies of cached prompts' KV cells in host memory, within a
byte budget (in the spirit of llama.cpp's `--cache-ram`).

The KV tier (prefix_cache.py) holds what fits beside the running sequences; an entry it drops to
make room comes here as a copy of its cells, and a later prompt that starts like it gets the copy
written back instead of computing it. Measured on the default model (AMD EPYC Zen 5, 2 cores):
1,068 tokens are 24.6 MB, copied out in 19 ms and written back in 3 ms, where computing them took
5.6 s; 16 tokens restore in 0.1 ms against 75 ms of prefill. Restoring pays at every length, so
any longer match than the KV tier's is restored (`MIN_RESTORE_TOKENS` only skips the trivial).

Pure bookkeeping, as the KV index: the engine keeps the copies themselves, by key.
- A copy that another one already covers (the same tokens, or the start of a longer one) is not
  taken again; one that extends a held copy replaces it.
- The least recently used copies go first when the budget is full; a copy larger than the whole
  budget is not kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenmill.engines.prefix_cache import shared_length

MIN_RESTORE_TOKENS = 8  # a shorter gain over the KV tier is computed (two template tokens are not worth a copy)


@dataclass
class HostCopy:
    key: int
    tokens: list[int]
    nbytes: int
    last_used: int = 0


@dataclass(frozen=True, slots=True)
class HostKeep:
    """What the engine does: store its copy under `key` (None: take no copy), having dropped `dropped`."""

    key: int | None
    dropped: tuple[int, ...] = ()


@dataclass
class HostTier:
    budget_bytes: int
    copies: list[HostCopy] = field(default_factory=list)
    evictions: int = 0  # copies dropped for room
    _next_key: int = 0
    _clock: int = 0

    @property
    def used_bytes(self) -> int:
        return sum(copy.nbytes for copy in self.copies)

    def longest_match(self, prompt: Sequence[int], touch: bool = True) -> tuple[HostCopy | None, int]:
        """The copy sharing the most leading tokens with `prompt`, and how many (0: none); `touch`:
        it counts as used."""
        best, length = None, 0
        for copy in self.copies:
            shared = shared_length(copy.tokens, prompt)
            if shared > length:
                best, length = copy, shared
        if best is not None and touch:
            self._touch(best)
        return best, length

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether a held copy starts with all of `tokens` (it is touched: asked for again)."""
        for copy in self.copies:
            if len(copy.tokens) >= len(tokens) and shared_length(copy.tokens, tokens) == len(tokens):
                self._touch(copy)
                return True
        return False

    def keep(self, tokens: Sequence[int], nbytes: int) -> HostKeep:
        """Room for a copy of `tokens`' cells, `nbytes` large: the key to store it under, and the
        copies to drop first (the ones it extends, then the least recently used)."""
        if nbytes > self.budget_bytes:
            return HostKeep(None)
        extended = [c for c in self.copies if shared_length(c.tokens, tokens) == len(c.tokens)]
        for copy in extended:
            self.copies.remove(copy)
        dropped = [copy.key for copy in extended]
        while self.copies and self.used_bytes + nbytes > self.budget_bytes:
            oldest = min(self.copies, key=lambda copy: copy.last_used)
            self.copies.remove(oldest)
            dropped.append(oldest.key)
            self.evictions += 1
        copy = HostCopy(self._next_key, list(tokens), nbytes)
        self._next_key += 1
        self.copies.append(copy)
        self._touch(copy)
        return HostKeep(copy.key, tuple(dropped))

    def forget(self, key: int) -> None:
        """The engine could not use the copy under `key` (it no longer fits the context)."""
        self.copies = [copy for copy in self.copies if copy.key != key]

    def clear(self) -> list[int]:
        keys = [copy.key for copy in self.copies]
        self.copies.clear()
        return keys

    def _touch(self, copy: HostCopy) -> None:
        self._clock += 1
        copy.last_used = self._clock
