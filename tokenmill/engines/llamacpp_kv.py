"""Where the llama.cpp engine keeps its KV cells, and where the prefix cache keeps its copies.

Two layouts, one interface (`SharedCache`, `StreamPerSequence`):
- **shared** (default): one unified KV cache for every sequence, sized by `--kv-tokens`. A cached
  prompt is one more sequence id on the cells it covers: `llama_memory_seq_cp` adds the id, a
  reference, not a copy. Every row's attention walks the mask of every cell up to the highest in
  use, so each step costs more the more cells all sequences (and the cache) hold.
- **a stream per sequence** (`--kv-streams`, llama-server's layout): each running sequence has a
  KV stream of its own, one context window long, so a row walks only its own cells. llama.cpp
  copies between streams only whole, so a cached prompt is a copy of the sequence's cells in host
  memory (`llama_state_seq_get_data_ext`), written back into a new sequence's stream on reuse.

A step carries its rows in slot order (`order_by_slot`), and a new sequence takes the lowest free
slot: with a stream per sequence, llama.cpp cuts a batch into micro-batches of consecutive sequence
ids, each a separate pass over the weights, so slots 0,1,2,4 cost two passes where 0,1,2,3 cost one.
"""

from __future__ import annotations

import ctypes
import heapq
from collections.abc import Sequence as Seq
from typing import Protocol

import llama_cpp

from tokenmill.engines.base import Chunk
from tokenmill.engines.prefix_cache import Store


class KVLayout(Protocol):
    """Holders are the prefix cache's ids for its entries: sequence ids past the running ones."""

    def restore(self, holder: int, slot: int, shared: int) -> bool:
        """Give `slot` (an empty sequence) the first `shared` cells held by `holder`; False when
        it could not, and the slot is left empty."""
        ...

    def keep(self, store: Store, slot: int) -> None:
        """Keep cells [0, store.end) of `slot` (all it holds now) in `store.holder`."""
        ...

    def drop(self, holder: int) -> None: ...


class SharedCache:
    """Cached prompts are sequence ids of the one unified cache, past the running sequences'."""

    def __init__(self, memory: llama_cpp.llama_memory_t):
        self._memory = memory

    def restore(self, holder: int, slot: int, shared: int) -> bool:
        llama_cpp.llama_memory_seq_cp(self._memory, holder, slot, 0, shared)
        return True

    def keep(self, store: Store, slot: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, store.holder, store.start, -1)
        if store.end > store.start:
            llama_cpp.llama_memory_seq_cp(self._memory, slot, store.holder, store.start, store.end)

    def drop(self, holder: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, holder, -1, -1)


class StreamPerSequence:
    """Cached prompts are host-memory copies of a sequence's cells (23 KB a token for the default
    model), taken whole each time an entry grows or shrinks: the slot then holds exactly the
    entry's tokens, so the copy never carries cells the index does not count."""

    def __init__(self, ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t):
        self._ctx = ctx
        self._memory = memory
        self._copies: dict[int, ctypes.Array[ctypes.c_uint8]] = {}  # holder -> its copy (no cells of its own)

    def restore(self, holder: int, slot: int, shared: int) -> bool:
        copy = self._copies.get(holder)
        if copy is None or not llama_cpp.llama_state_seq_set_data_ext(self._ctx, copy, len(copy), slot, 0):
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
            return False
        llama_cpp.llama_memory_seq_rm(self._memory, slot, shared, -1)
        return True

    def keep(self, store: Store, slot: int) -> None:
        size = llama_cpp.llama_state_seq_get_size_ext(self._ctx, slot, 0)
        copy = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data_ext(self._ctx, copy, size, slot, 0) == size:
            self._copies[store.holder] = copy
        else:  # never reused half-copied: the entry finds nothing and computes its prompt
            self._copies.pop(store.holder, None)

    def drop(self, holder: int) -> None:
        self._copies.pop(holder, None)


class Slots:
    """Sequence ids for running sequences, the lowest free one first."""

    def __init__(self, count: int):
        self._free = list(range(count))  # a sorted list is a heap
        self._taken: dict[int, int] = {}  # tokenmill sequence id -> slot

    def take(self, seq_id: int) -> int | None:
        if not self._free:
            return None
        self._taken[seq_id] = slot = heapq.heappop(self._free)
        return slot

    def give_back(self, seq_id: int) -> int | None:
        slot = self._taken.pop(seq_id, None)
        if slot is not None:
            heapq.heappush(self._free, slot)
        return slot

    def __getitem__(self, seq_id: int) -> int:
        return self._taken[seq_id]

    def get(self, seq_id: int) -> int | None:
        return self._taken.get(seq_id)

    def order_by_slot(self, chunks: Seq[Chunk]) -> list[tuple[int, int]]:
        """(index in `chunks`, slot) of each chunk, slots ascending."""
        return sorted(((i, self._taken[chunk.seq.seq_id]) for i, chunk in enumerate(chunks)), key=lambda pair: pair[1])
