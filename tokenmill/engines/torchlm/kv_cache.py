"""The KV cache: fixed blocks of cells in one pool, a block table per sequence, shared blocks counted.

Memory follows the tokens really held: a sequence takes a block when its last one fills, and
gives them all back when it leaves. The pool is sized by the scheduler's `--kv-tokens` budget (plus
one partly filled block per sequence), so every admitted sequence fits; allocated uninitialised,
pages of blocks never taken cost no resident memory, and free blocks are handed out lowest first so
the touched part stays compact.

A block may be referenced by several tables: the prefix cache (engine.py) holds the blocks of a
cached prompt, and a new sequence sharing that prompt starts with the same full blocks (a partly
filled last block is copied, since the new sequence will write into it). A block goes back to the
free list when its last reference does. When none is free, `reclaim` is asked to drop cached
prompts (which only the cache references) before a sequence is refused.

Why this layout ([layer, k/v, block, kv head, cell, head dim]): decode attention works block
by block (model.py) straight on the pool's leading blocks (`span`, a view: lowest-first
allocation keeps the blocks in use there), each block attended by the sequence that owns it, and
copies out (`gather`) only the blocks a second sequence also reads (a shared prompt). A gather of
every block a step reads cost a third of the step at 32 sequences here; the contiguous
per-sequence slots this replaced needed none, but held every slot at the longest sequence's
length and attended over all of it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import torch

from tokenmill.engines.prefix_cache import Store
from tokenmill.engines.torchlm.checkpoint import ModelConfig
from tokenmill.errors import EngineFailure

BLOCK = 64  # cells per block (64 measured faster than 16 or 32 for the gather-and-attend here)


def blocks_for(cells: int, block: int = BLOCK) -> int:
    return -(-cells // block)


class PagedKVCache:
    def __init__(
        self, config: ModelConfig, num_blocks: int, dtype: torch.dtype, device: torch.device, block: int = BLOCK
    ):
        self.block = block
        self.num_blocks = num_blocks
        self.dtype = dtype
        shape = (config.num_layers, 2, num_blocks, config.num_kv_heads, block, config.head_dim)
        self._cells = torch.empty(shape, dtype=dtype, device=device)
        self._free = list(range(num_blocks))  # a heap: lowest first
        self._refs = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reclaim: Callable[[], bool] | None = None  # drops a cached prompt; False when none is left

    # -- bookkeeping
    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    def table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def add(self, seq_id: int) -> None:
        self._tables[seq_id] = []

    def remove(self, seq_id: int) -> None:
        self.release(self._tables.pop(seq_id, []))

    def ensure(self, seq_id: int, cells: int) -> None:
        """Give the sequence blocks for its first `cells` positions (before a step writes them)."""
        table = self._tables[seq_id]
        while len(table) * self.block < cells:
            table.append(self._take())

    def share(self, seq_id: int, blocks: list[int], cells: int) -> None:
        """Start the (empty) sequence with the first `cells` positions of `blocks`: whole blocks by
        reference, a partly used last block as a copy of its own."""
        table = self._tables[seq_id]
        whole, part = divmod(cells, self.block)
        table.extend(blocks[:whole])
        self.hold(blocks[:whole])
        if part:
            self.hold(blocks[whole : whole + 1])  # taking a block may reclaim the entry `blocks` came from
            copy = self._take()
            self._cells[:, :, copy, :, :part] = self._cells[:, :, blocks[whole], :, :part]
            self.release(blocks[whole : whole + 1])
            table.append(copy)

    def copy_blocks(self, blocks: list[int]) -> torch.Tensor:
        """The cells of `blocks`, copied to host memory: [layer, k/v, block, kv head, cell, head dim]."""
        index = torch.tensor(blocks, dtype=torch.long, device=self._cells.device)
        return self._cells.index_select(2, index).to("cpu", copy=self._cells.device.type != "cpu")

    def write_blocks(self, seq_id: int, copy: torch.Tensor, cells: int) -> None:
        """Start the (empty) sequence with the first `cells` positions of a host copy."""
        self.ensure(seq_id, cells)
        table = self._tables[seq_id][: blocks_for(cells, self.block)]
        index = torch.tensor(table, dtype=torch.long, device=self._cells.device)
        self._cells.index_copy_(2, index, copy[:, :, : len(table)].to(self._cells.device))

    def hold(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                heapq.heappush(self._free, block)

    def _take(self) -> int:
        while not self._free:
            if self.reclaim is None or not self.reclaim():
                raise EngineFailure("the torch engine's KV cache has no free block")
        block = heapq.heappop(self._free)
        self._refs[block] = 1
        # attention weighs masked cells by zero, and 0 x NaN is NaN: a block's cells must be finite
        self._cells[:, :, block].zero_()
        return block

    # -- tensors
    def write(
        self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store token i's keys/values ([tokens, kv heads, head dim]) at cell offsets[i] of blocks[i]."""
        self._cells[layer, 0, blocks, :, offsets] = keys
        self._cells[layer, 1, blocks, :, offsets] = values

    def span(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of blocks [0, end), as views: [end, kv heads, cells, head dim] each.
        Every block below `end` has been taken at some point (the lowest free block goes first),
        so all of their cells are finite."""
        return self._cells[layer, 0, :end], self._cells[layer, 1, :end]

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `blocks` ([count]), as [count, kv heads, cells, head dim] each, in a
        buffer reused by every layer (a fresh multi-MB tensor per layer cost page faults that
        outweighed attention)."""
        count = blocks.shape[0]
        if self._gathered is None or self._gathered[0].shape[0] < count:
            shape = (count, *self._cells.shape[3:])
            self._gathered = (self._cells.new_empty(shape), self._cells.new_empty(shape))
        keys, values = (buffer[:count] for buffer in self._gathered)
        torch.index_select(self._cells[layer, 0], 0, blocks, out=keys)
        torch.index_select(self._cells[layer, 1], 0, blocks, out=values)
        return keys, values

    def sequence(self, layer: int, blocks: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first `cells` keys and values, [kv heads, cells, head dim] each."""

        def read(kind: int) -> torch.Tensor:
            found = self._cells[layer, kind].index_select(0, blocks)  # [blocks, kv heads, cells, dim]
            return found.transpose(0, 1).flatten(1, 2)[:, :cells]

        return read(0), read(1)


class CachedBlocks:
    """The prefix cache's cells in the block pool (a `prefix_tiers.CellStore`; a slot is a
    sequence id): a cached prompt holds references to its blocks, and a host copy is a tensor of
    them in host memory."""

    def __init__(self, cache: PagedKVCache):
        self._cache = cache
        self._stored: dict[int, list[int]] = {}  # holder -> blocks

    def restore(self, holder: int, slot: int, shared: int) -> bool:
        self._cache.share(slot, self._stored[holder], shared)
        return True

    def keep(self, store: Store, slot: int) -> None:
        # the sequence's own blocks hold all those tokens (shared ones included), whether the entry
        # is new or a conversation's earlier turn growing; it keeps writing only past them. A new
        # entry built on another takes that one's whole blocks for their shared start instead.
        blocks = self._cache.table(slot)[: blocks_for(store.end, self._cache.block)]
        if store.source is not None:
            whole = store.start // self._cache.block
            blocks = self._stored[store.source][:whole] + blocks[whole:]
        self._cache.hold(blocks)
        self._cache.release(self._stored.pop(store.holder, []))
        self._stored[store.holder] = blocks

    def drop(self, holder: int) -> None:
        self._cache.release(self._stored.pop(holder, []))

    def copy_out(self, holder: int) -> tuple[object, int] | None:
        copy = self._cache.copy_blocks(self._stored[holder])
        return copy, copy.numel() * copy.element_size()

    def copy_in(self, copy: object, slot: int, shared: int) -> bool:
        assert isinstance(copy, torch.Tensor)
        try:
            self._cache.write_blocks(slot, copy, shared)
        except EngineFailure:  # the pool is full of running sequences: compute it
            self._cache.remove(slot)
            self._cache.add(slot)
            return False
        return True
