"""The torch engine: the StepEngine protocol over `LlamaModel`, a paged KV cache and a batch sampler.

Everything here is bookkeeping that turns the scheduler's chunks into packed tensors (which cells
each token writes, which cells each row reads) and the sampled ids back into a list; the maths
lives in model.py and sampler.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from tokenmill.engines.base import Chunk
from tokenmill.engines.prefix_cache import HOLDERS, PrefixCacheStats, PrefixIndex
from tokenmill.engines.sequence import Sequence
from tokenmill.engines.structured import Constrained, structured_tokenizer
from tokenmill.engines.torchlm.checkpoint import load_checkpoint
from tokenmill.engines.torchlm.kv_cache import SlotKVCache
from tokenmill.engines.torchlm.model import DecodeBatch, LlamaModel, PrefillChunk, StepInputs
from tokenmill.engines.torchlm.sampler import BatchSampler
from tokenmill.engines.torchlm.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _return_freed_memory() -> None:
    """Hand the heap the load freed back to the OS. Loading frees hundreds of MB of converted
    copies in pieces below glibc's mmap threshold, which stay resident otherwise (measured: 994 ->
    664 MB RSS after building the default model). A no-op without glibc."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


class TorchEngine:
    def __init__(
        self,
        model_path: Path,
        *,
        context_window: int = 4096,
        max_sequences: int = 1,
        threads: int | None = None,
        max_step_tokens: int = 512,
        dtype: str = "bfloat16",
        device: str = "auto",
        four_bit_rows: int = 4,
        prefix_cache_tokens: int = 0,
    ):
        started = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        # the int4 kernel behind four_bit_rows is a CPU one (four_bit.py)
        checkpoint = load_checkpoint(
            model_path, DTYPES[dtype], self.device, four_bit=four_bit_rows > 0 and self.device.type == "cpu"
        )
        window = min(context_window, checkpoint.config.trained_context)
        self.tokenizer = load_tokenizer(model_path, window)
        self.model = LlamaModel(checkpoint, max_positions=window, four_bit_rows=four_bit_rows)
        self.cache = SlotKVCache(checkpoint.config, max_sequences, window, DTYPES[dtype], self.device)
        self.sampler = BatchSampler(self.tokenizer.eog_ids, self.device)
        self.max_chunk_tokens = max_step_tokens
        self._constrained: Constrained | None = None
        # the prefix cache: each cached prompt's cells in a tensor of its own, exactly its length,
        # so the memory it holds follows its budget (engines/prefix_cache.py decides what to keep)
        self._prefix = PrefixIndex(list(range(HOLDERS)), prefix_cache_tokens) if prefix_cache_tokens else None
        self._stored: dict[int, torch.Tensor] = {}
        _return_freed_memory()
        log.info("torch engine ready on %s (%s) in %.1f s", self.device, dtype, time.perf_counter() - started)

    # Every method that touches the KV cache runs in inference mode: the cache grows inside step(),
    # and a tensor made in inference mode may not be changed in place outside it.
    @torch.inference_mode()
    def add_sequence(self, seq: Sequence) -> None:
        self.cache.add(seq.seq_id)
        self.sampler.add(seq.seq_id, seq.params)
        if self._prefix is not None and seq.num_computed == 0:
            found = self._prefix.reuse(seq.token_ids[: seq.num_prompt_tokens])
            if found is not None:
                holder, shared = found
                self.cache.load(seq.seq_id, self._stored[holder][:, :, :, :shared])
                seq.num_computed = seq.num_cached = shared
        if seq.params.grammar is not None:
            if self._constrained is None:  # built with the first constrained sequence (~1 s)
                tokenizer = structured_tokenizer(self.tokenizer)
                self._constrained = Constrained(tokenizer, self.tokenizer.vocab_size, torch.get_num_threads())
            self._constrained.add(seq)

    @torch.inference_mode()
    def remove_sequence(self, seq: Sequence) -> None:
        self.cache.remove(seq.seq_id)
        self.sampler.remove(seq.seq_id)
        if self._constrained is not None:
            self._constrained.remove(seq)

    @torch.inference_mode()
    def step(self, chunks: Seq[Chunk]) -> list[int | None]:
        if sum(c.num_tokens for c in chunks) > self.max_chunk_tokens:
            raise ValueError("a step may carry at most max_chunk_tokens tokens")
        # Decode rows (one token each) go first, in slot order, so they line up with the cache's slots.
        slot_of = self.cache.slot_of
        ordered = sorted(chunks, key=lambda c: (c.num_tokens != 1, slot_of(c.seq.seq_id)))
        self.cache.reserve(max(c.seq.num_computed + c.num_tokens for c in chunks))
        inputs, sampled_chunks = self._pack(ordered)
        logits = self.model.forward(inputs, self.cache)  # writes every token's KV even when nothing is sampled
        if self._prefix is not None:
            for chunk in chunks:
                if chunk.completes_prompt:
                    self._remember_prompt(self._prefix, chunk.seq)
        if not sampled_chunks:
            return [None] * len(chunks)
        seqs = [chunk.seq for chunk in sampled_chunks]
        tokens = self.sampler.sample(logits, seqs, self._constrained)
        by_seq = {seq.seq_id: token for seq, token in zip(seqs, tokens, strict=True)}
        return [by_seq.get(c.seq.seq_id) if c.completes_sequence_input else None for c in chunks]

    def _remember_prompt(self, prefix: PrefixIndex, seq: Sequence) -> None:
        """`seq` has just finished prefill: a copy of its prompt's cells goes to the cache."""
        store = prefix.store(seq.token_ids[: seq.num_prompt_tokens])
        if store is None:
            return
        for holder in store.evicted:
            del self._stored[holder]
        cells = self.cache.read(seq.seq_id, store.start, store.end)
        if store.start:  # a conversation's next turn: its entry grows
            cells = torch.cat([self._stored[store.holder][:, :, :, : store.start], cells], dim=3)
        self._stored[store.holder] = cells

    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self._prefix.stats() if self._prefix is not None else PrefixCacheStats()

    def _pack(self, chunks: list[Chunk]) -> tuple[StepInputs, list[Chunk]]:
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_slots: list[int] = []
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
        sampled: list[Chunk] = []
        lengths = [1] * self.cache.num_slots  # key cells each slot's decode row may see
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.seq.num_computed, chunk.num_tokens
            slot, row = self.cache.slot_of(seq.seq_id), len(token_ids)
            token_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend([slot] * n)
            if n == 1:
                decode_slots.append(slot)
                lengths[slot] = start + 1
            else:
                mask = torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(diagonal=start)
                prefills.append(PrefillChunk(start=row, length=n, slot=slot, mask=mask))
            if chunk.completes_sequence_input:
                sample_rows.append(row + n - 1)
                sampled.append(chunk)
        tensor = functools.partial(torch.tensor, dtype=torch.long, device=self.device)
        decode = None
        if decode_slots:
            cells = torch.arange(self.cache.capacity, device=self.device)[None, :]
            decode = DecodeBatch(
                size=len(decode_slots),
                slots=tensor(decode_slots),
                covers_all_slots=len(decode_slots) == self.cache.num_slots,
                bias=torch.zeros(
                    len(lengths), 1, 1, self.cache.capacity, dtype=self.cache.dtype, device=self.device
                ).masked_fill_((cells >= tensor(lengths)[:, None])[:, None, None, :], -torch.inf),
            )
        inputs = StepInputs(
            token_ids=tensor(token_ids),
            positions=tensor(positions),
            slots=tensor(slots),
            decode=decode,
            prefills=prefills,
            sample_rows=tensor(sample_rows),
        )
        return inputs, sampled

    def close(self) -> None:
        pass  # tensors are freed with the engine
