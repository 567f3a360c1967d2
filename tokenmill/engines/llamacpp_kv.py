"""Where the llama.cpp engine keeps its KV cells, and where the prefix cache keeps its copies.

Two layouts, one interface (`SharedCache`, `StreamPerSequence`: prefix_tiers.CellStore):
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

import llama_cpp

from tokenmill.engines.base import Chunk
from tokenmill.engines.prefix_cache import Store


def _copy_of(ctx: llama_cpp.llama_context_p, seq_id: int) -> tuple[ctypes.Array[ctypes.c_uint8], int] | None:
    """Sequence `seq_id`'s cells in host memory (23 KB a token for the default model)."""
    size = llama_cpp.llama_state_seq_get_size_ext(ctx, seq_id, 0)
    copy = (ctypes.c_uint8 * size)()
    if llama_cpp.llama_state_seq_get_data_ext(ctx, copy, size, seq_id, 0) != size:
        return None  # never reused half-copied: the entry finds nothing and computes its prompt
    return copy, size


def _write_back(
    ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t, copy: object, slot: int, shared: int
) -> bool:
    """Write a copy's first `shared` cells into the empty `slot`; False (slot left empty) when
    llama.cpp finds no room for them."""
    assert isinstance(copy, ctypes.Array)
    if not llama_cpp.llama_state_seq_set_data_ext(ctx, copy, len(copy), slot, 0):
        llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)
        return False
    llama_cpp.llama_memory_seq_rm(memory, slot, shared, -1)
    return True


class SharedCache:
    """Cached prompts are sequence ids of the one unified cache, past the running sequences'
    (a `prefix_tiers.CellStore`). An entry built on another (`Store.source`) references that
    one's cells for their shared start, so a system prompt in N entries is held once."""

    def __init__(self, ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t):
        self._ctx = ctx
        self._memory = memory

    def restore(self, holder: int, slot: int, shared: int) -> bool:
        llama_cpp.llama_memory_seq_cp(self._memory, holder, slot, 0, shared)
        return True

    def keep(self, store: Store, slot: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, store.holder, store.start, -1)
        if store.source is not None:
            llama_cpp.llama_memory_seq_cp(self._memory, store.source, store.holder, 0, store.start)
        if store.end > store.start:
            llama_cpp.llama_memory_seq_cp(self._memory, slot, store.holder, store.start, store.end)

    def drop(self, holder: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, holder, -1, -1)

    def copy_out(self, holder: int) -> tuple[object, int] | None:
        return _copy_of(self._ctx, holder)

    def copy_in(self, copy: object, slot: int, shared: int) -> bool:
        return _write_back(self._ctx, self._memory, copy, slot, shared)


class StreamPerSequence:
    """Cached prompts are host-memory copies of a sequence's cells, taken whole each time an entry
    grows or shrinks: the slot then holds exactly the entry's tokens, so the copy never carries
    cells the index does not count. The host tier takes the same copy, not another one."""

    def __init__(self, ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t):
        self._ctx = ctx
        self._memory = memory
        self._copies: dict[int, ctypes.Array[ctypes.c_uint8]] = {}  # holder -> its copy (no cells of its own)

    def restore(self, holder: int, slot: int, shared: int) -> bool:
        copy = self._copies.get(holder)
        if copy is None:
            return False
        return _write_back(self._ctx, self._memory, copy, slot, shared)

    def keep(self, store: Store, slot: int) -> None:
        taken = _copy_of(self._ctx, slot)
        if taken is not None:
            self._copies[store.holder] = taken[0]
        else:
            self._copies.pop(store.holder, None)

    def drop(self, holder: int) -> None:
        self._copies.pop(holder, None)

    def copy_out(self, holder: int) -> tuple[object, int] | None:
        copy = self._copies.get(holder)
        return (copy, len(copy)) if copy is not None else None

    def copy_in(self, copy: object, slot: int, shared: int) -> bool:
        return _write_back(self._ctx, self._memory, copy, slot, shared)


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
