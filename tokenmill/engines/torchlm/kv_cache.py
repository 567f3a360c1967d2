"""The KV cache: one contiguous slot per running sequence, slots kept packed at the front.

Why slots and not pages: on a CPU, attention over a paged cache has to gather every sequence's
keys and values into one contiguous batch for every layer of every step, and that gather cost more
than the attention itself (measured: 1.7 ms per layer for 32 sequences of ~200 tokens, i.e. ~50 ms
a step, against ~0.4 ms for attention over contiguous slots). So running sequences live in slots
0..n-1 of one tensor, the decode batch reads `keys(layer)` as a plain contiguous prefix, and when a
sequence leaves, the last slot moves into its place (a copy of one sequence's cells).

Every slot has the same length (`capacity`), which follows the longest running sequence in steps
of `GROWTH` cells and starts again small whenever the cache empties. The tensor is allocated
uninitialised, so pages of slots no sequence has taken are never touched and cost no resident memory.
The scheduler's `--kv-tokens` budget still bounds what sequences are admitted; this cache's own
worst case is running sequences x the longest of them.
"""

from __future__ import annotations

import torch

from tokenmill.engines.torchlm.checkpoint import ModelConfig
from tokenmill.errors import EngineFailure

GROWTH = 128


class SlotKVCache:
    def __init__(self, config: ModelConfig, max_slots: int, max_length: int, dtype: torch.dtype, device: torch.device):
        self._config = config
        self._max_slots = max_slots
        self._max_length = max_length
        self.dtype, self._device = dtype, device
        self._order: list[int] = []  # slot i holds the sequence self._order[i]
        self._slot: dict[int, int] = {}
        self.capacity = 0
        self._cells = self._allocate(min(GROWTH, max_length))

    # -- slots
    @property
    def num_slots(self) -> int:
        return len(self._order)

    def slot_of(self, seq_id: int) -> int:
        return self._slot[seq_id]

    def add(self, seq_id: int) -> int:
        if len(self._order) >= self._max_slots:
            raise EngineFailure("no free KV slot in the torch engine")
        slot = self._slot[seq_id] = len(self._order)
        self._order.append(seq_id)
        self._cells[:, :, slot].zero_()  # see _allocate: masked cells must still be finite
        return slot

    def remove(self, seq_id: int) -> None:
        slot = self._slot.pop(seq_id, None)
        if slot is None:
            return
        last = len(self._order) - 1
        if slot != last:
            moved = self._order[last]
            self._cells[:, :, slot].copy_(self._cells[:, :, last])
            self._order[slot] = moved
            self._slot[moved] = slot
        self._order.pop()
        if not self._order and self.capacity > GROWTH:
            self._cells = self._allocate(min(GROWTH, self._max_length))  # give the memory back

    def reserve(self, length: int) -> None:
        """Make every slot hold at least `length` cells (called before a step writes past the end)."""
        if length <= self.capacity:
            return
        if length > self._max_length:
            raise EngineFailure(f"a sequence needs {length} KV cells; the context window is {self._max_length}")
        grown = self._allocate(min(self._max_length, -(-length // GROWTH) * GROWTH))
        old = self._cells.shape[4]
        grown[:, :, : self.num_slots, :, :old].copy_(self._cells[:, :, : self.num_slots])
        grown[:, :, : self.num_slots, :, old:].zero_()
        self._cells = grown

    # -- a sequence's cells, whole (the prefix cache's copies in and out)
    def read(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """A copy of positions [start, end) of a sequence: [layers, 2, kv heads, end - start, head dim]."""
        return self._cells[:, :, self._slot[seq_id], :, start:end].clone()

    def load(self, seq_id: int, cells: torch.Tensor) -> None:
        """Fill a sequence's positions from 0 with `cells` (as `read` gives them)."""
        self.reserve(cells.shape[3])
        self._cells[:, :, self._slot[seq_id], :, : cells.shape[3]] = cells

    # -- tensors
    def keys(self, layer: int) -> torch.Tensor:
        """[slots in use, kv heads, capacity, head dim], contiguous."""
        return self._cells[layer, 0, : self.num_slots]

    def values(self, layer: int) -> torch.Tensor:
        return self._cells[layer, 1, : self.num_slots]

    def write(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store token i's keys/values ([tokens, kv heads, head dim]) at (slots[i], positions[i])."""
        self._cells[layer, 0, slots, :, positions] = keys
        self._cells[layer, 1, slots, :, positions] = values

    def _allocate(self, capacity: int) -> torch.Tensor:
        # Uninitialised on purpose (untouched pages cost nothing), but attention multiplies masked-off
        # cells by a zero weight, and 0 x NaN is NaN: so a slot is zeroed when it is taken, and the
        # new cells of slots in use are zeroed when they grow.
        c = self._config
        self.capacity = capacity
        shape = (c.num_layers, 2, self._max_slots, c.num_kv_heads, capacity, c.head_dim)
        return torch.empty(shape, dtype=self.dtype, device=self._device)
