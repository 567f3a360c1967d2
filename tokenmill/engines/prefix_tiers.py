"""The prefix cache as both engines run it: the KV tier (prefix_cache.PrefixIndex, cells in the KV
cache itself) in front of the host-memory tier (host_cache.HostTier, copies of cells in RAM).

An engine gives its cells through `CellStore` (llama.cpp: sequence ids or per-sequence copies,
llamacpp_kv.py; torch: block references, torchlm/engine.py) and calls three things:
- `reuse(seq, slot)` when a sequence joins: the longest start found in either tier is written to
  `slot`, the host copy where it reaches further than the KV tier by MIN_RESTORE_TOKENS;
- `remember(seq, slot, tokens)` after a prompt's prefill and when a sequence finishes;
- `reclaim()` when a running sequence needs cells the KV tier holds (torch).
An entry the KV tier drops for room is copied to the host tier first (unless a copy already
covers it), so a prompt asked again after many others is restored, not recomputed.
"""

from __future__ import annotations

from typing import Protocol

from tokenmill.engines.host_cache import MIN_RESTORE_TOKENS, HostTier
from tokenmill.engines.prefix_cache import CachedPrompt, PrefixCacheStats, PrefixIndex, Store
from tokenmill.engines.sequence import Sequence


class CellStore(Protocol):
    """An engine's cells, as the tiers move them. `slot`: where a running sequence's cells are."""

    def restore(self, holder: int, slot: int, shared: int) -> bool:
        """Give `slot` (empty) the first `shared` cells of `holder`; False when it could not (the
        slot is left empty)."""
        ...

    def keep(self, store: Store, slot: int) -> None:
        """Keep cells [0, store.end) of `slot` in `store.holder` (built on `store.source`'s, if any)."""
        ...

    def drop(self, holder: int) -> None: ...

    def copy_out(self, holder: int) -> tuple[object, int] | None:
        """A host copy of `holder`'s cells and its size in bytes; None where none can be taken."""
        ...

    def copy_in(self, copy: object, slot: int, shared: int) -> bool:
        """Write the first `shared` cells of `copy` to `slot` (empty); False when they do not fit
        (the slot is left empty)."""
        ...


class PrefixCache:
    def __init__(self, index: PrefixIndex, cells: CellStore, host: HostTier | None = None):
        self.index = index
        self.host = host
        self._cells = cells
        self._copies: dict[int, object] = {}  # host tier key -> the engine's copy
        self._host_hits = 0
        self._evictions = 0  # KV entries dropped for room (copied to the host tier where one is)
        index.evicting = self._evicted

    def reuse(self, seq: Sequence, slot: int) -> None:
        """Start `seq` (no cell computed yet) with the longest cached start of its prompt; the last
        prompt token is always computed (the first sampled token needs its logits)."""
        prompt = seq.token_ids[: seq.num_prompt_tokens]
        found = self.index.reuse(prompt)
        holder, shared = found if found is not None else (None, 0)
        if self.host is not None:
            copy, restorable = self.host.longest_match(prompt[:-1], touch=False)  # a use only if it wins
            if copy is not None and restorable >= shared + MIN_RESTORE_TOKENS:
                if self._cells.copy_in(self._copies[copy.key], slot, restorable):
                    self.host.touch(copy)
                    self.index.served_elsewhere(shared)
                    self._host_hits += restorable
                    seq.num_computed = seq.num_cached = restorable
                    return
                self.host.forget(copy.key)
                self._copies.pop(copy.key, None)
        if holder is None:
            return
        if self._cells.restore(holder, slot, shared):
            seq.num_computed = seq.num_cached = shared
        else:  # no cells to write back (a per-sequence copy missing): the prompt is computed
            self.index.lost(holder, shared)
            self._cells.drop(holder)

    def remember(self, seq: Sequence, slot: int, tokens: int, answer_from: int | None = None) -> None:
        """`seq`'s first `tokens` are all the cells it holds (its prompt after prefill, or all it
        computed when it finishes): they go to the cache."""
        store = self.index.store(seq.token_ids[:tokens], answer_from)
        if store is None:
            return
        for holder in store.evicted:
            self._cells.drop(holder)
        self._cells.keep(store, slot)

    def cached_length(self, tokens: list[int]) -> int:
        """The longest start of `tokens` either tier holds, untouched (no use, no hit counted)."""
        _, held = self.index.peek(tokens)
        if self.host is not None:
            held = max(held, self.host.longest_match(tokens, touch=False)[1])
        return held

    def reclaim(self) -> bool:
        """A running sequence needs cells: give up the least recently used KV entry (to the host
        tier); False when none is left."""
        holder = self.index.evict_oldest()
        if holder is None:
            return False
        self._cells.drop(holder)
        return True

    def stats(self) -> PrefixCacheStats:
        kv = self.index.stats()
        host = self.host
        return PrefixCacheStats(
            queried_tokens=kv.queried_tokens,
            hit_tokens=kv.hit_tokens + self._host_hits,
            cached_tokens=kv.cached_tokens,
            answers_skipped=kv.answers_skipped,
            host_hit_tokens=self._host_hits,
            host_tokens=host.used_tokens if host is not None else 0,
            host_bytes=host.used_bytes if host is not None else 0,
            host_entries=len(host.copies) if host is not None else 0,
            evictions=self._evictions,
            host_evictions=host.evictions if host is not None else 0,
        )

    def _evicted(self, entry: CachedPrompt) -> None:
        """The KV tier drops `entry` for room; its cells are still in place: copy them out."""
        self._evictions += 1
        if self.host is None or self.host.covers(entry.tokens):
            return
        taken = self._cells.copy_out(entry.holder)
        if taken is None:
            return
        copy, nbytes = taken
        kept = self.host.keep(entry.tokens, nbytes)
        for key in kept.dropped:
            self._copies.pop(key, None)
        if kept.key is not None:
            self._copies[kept.key] = copy
