"""The prefix cache's second tier: copies of cached prompts' KV cells in host memory, within a
byte budget (in the spirit of llama.cpp's `--cache-ram`).

The KV tier (prefix_cache.py) holds what fits beside the running sequences; an entry it drops to
make room comes here as a copy of its cells, and a later prompt that starts like it gets the copy
written back instead of computing it. Measured on the default model (AMD EPYC Zen 5, 2 cores):
1,068 tokens are 24.6 MB, copied out in 19 ms and written back in 3 ms, where computing them took
5.6 s; 16 tokens restore in 0.1 ms against 75 ms of prefill. Restoring pays at every length, so
any longer match than the KV tier's is restored (`MIN_RESTORE_TOKENS` only skips the trivial).

Pure bookkeeping, as the KV index: the engine keeps the copies themselves, by key.
- Copies are found by their starts in whole blocks of BLOCK tokens, each block's key chained on
  the one before (as vLLM's block hashes): a lookup costs one dict probe per block of the prompt,
  however many thousand copies are held (a scan of them all, on every new sequence, would stall
  the engine's step). The deepest block found names the copies that start that way; the most
  recently used one is then compared token by token, so a match is exact (a hash that collides
  only shortens it) and at most BLOCK - 1 tokens short of the best.
- A copy that another one already covers (the same tokens, or the start of a longer one) is not
  taken again; one that extends the copy found for it replaces it.
- The least recently used copies go first when the budget is full; a copy larger than the whole
  budget is not kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenmill.engines.prefix_cache import shared_length

MIN_RESTORE_TOKENS = 8  # a shorter gain over the KV tier is computed (two template tokens are not worth a copy)
BLOCK = 16  # tokens per block of a copy's start, as the lookup sees it


@dataclass
class HostCopy:
    key: int
    tokens: list[int]
    nbytes: int
    starts: list[int]  # the chained key of each whole block of `tokens`
    last_used: int = 0


@dataclass(frozen=True, slots=True)
class HostKeep:
    """What the engine does: store its copy under `key` (None: take no copy), having dropped `dropped`."""

    key: int | None
    dropped: tuple[int, ...] = ()


def block_starts(tokens: Sequence[int]) -> list[int]:
    """The chained key of each whole block of `tokens`: block i's depends on blocks 0..i."""
    keys, key = [], 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        key = hash((key, *tokens[start : start + BLOCK]))
        keys.append(key)
    return keys


@dataclass
class HostTier:
    budget_bytes: int
    copies: OrderedDict[int, HostCopy] = field(default_factory=OrderedDict)  # least recently used first
    used_bytes: int = 0
    used_tokens: int = 0
    evictions: int = 0  # copies dropped for room
    _by_start: dict[int, set[int]] = field(default_factory=dict)  # chained block key -> copies starting so
    _next_key: int = 0
    _clock: int = 0

    def longest_match(self, prompt: Sequence[int], touch: bool = True) -> tuple[HostCopy | None, int]:
        """A copy sharing the most leading tokens with `prompt` (to within BLOCK - 1), and how many
        (0: none, or less than a block); `touch`: it counts as used."""
        found: set[int] | None = None
        for key in block_starts(prompt):
            starting = self._by_start.get(key)
            if not starting:
                break
            found = starting
        if not found:
            return None, 0
        copy = max((self.copies[key] for key in found), key=lambda held: held.last_used)
        if touch:
            self.touch(copy)
        return copy, shared_length(copy.tokens, prompt)

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether the copy found for `tokens` starts with all of them (it is touched: asked for again)."""
        copy, shared = self.longest_match(tokens)
        return copy is not None and shared == len(tokens)

    def keep(self, tokens: Sequence[int], nbytes: int) -> HostKeep:
        """Room for a copy of `tokens`' cells, `nbytes` large: the key to store it under, and the
        copies to drop first (the one it extends, then the least recently used)."""
        if nbytes > self.budget_bytes:
            return HostKeep(None)
        dropped = []
        found, shared = self.longest_match(tokens, touch=False)
        if found is not None and shared == len(found.tokens):  # a shorter copy of the same start
            self._remove(found.key)
            dropped.append(found.key)
        while self.copies and self.used_bytes + nbytes > self.budget_bytes:
            oldest = next(iter(self.copies))
            self._remove(oldest)
            dropped.append(oldest)
            self.evictions += 1
        copy = HostCopy(self._next_key, list(tokens), nbytes, block_starts(tokens))
        self._next_key += 1
        self.copies[copy.key] = copy
        self.touch(copy)
        self.used_bytes += nbytes
        self.used_tokens += len(copy.tokens)
        for start in copy.starts:
            self._by_start.setdefault(start, set()).add(copy.key)
        return HostKeep(copy.key, tuple(dropped))

    def forget(self, key: int) -> None:
        """The engine could not use the copy under `key` (it no longer fits the context)."""
        if key in self.copies:
            self._remove(key)

    def _remove(self, key: int) -> None:
        copy = self.copies.pop(key)
        self.used_bytes -= copy.nbytes
        self.used_tokens -= len(copy.tokens)
        for start in copy.starts:
            starting = self._by_start[start]
            starting.discard(key)
            if not starting:
                del self._by_start[start]

    def touch(self, copy: HostCopy) -> None:
        """`copy` was used: it goes last in the eviction order."""
        self._clock += 1
        copy.last_used = self._clock
        self.copies.move_to_end(copy.key)
