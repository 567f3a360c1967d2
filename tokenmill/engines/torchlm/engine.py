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

from tokenmill.engines import logprobs, speculative
from tokenmill.engines.base import Chunk, DraftCosts, SampledLogprobs
from tokenmill.engines.host_cache import HostTier
from tokenmill.engines.prefix_cache import HOLDERS, PrefixCacheStats, PrefixIndex
from tokenmill.engines.prefix_tiers import PrefixCache
from tokenmill.engines.sequence import Sequence, SequenceStatus
from tokenmill.engines.structured import Constrained, structured_tokenizer
from tokenmill.engines.torchlm.checkpoint import load_checkpoint
from tokenmill.engines.torchlm.kv_cache import CachedBlocks, PagedKVCache, blocks_for
from tokenmill.engines.torchlm.model import BlockReads, DecodeBatch, LlamaModel, PrefillChunk, StepInputs
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


FEW_DECODE_ROWS = 1  # measured: 1 row 55.7 tok/s this way against 43.8 block-wise; at 2 rows block-wise is faster


class TorchEngine:
    def __init__(
        self,
        model_path: Path,
        *,
        context_window: int = 4096,
        max_sequences: int = 1,
        kv_tokens: int = 0,
        threads: int | None = None,
        max_step_tokens: int = 512,
        dtype: str = "bfloat16",
        device: str = "auto",
        four_bit_rows: int = 4,
        prefix_cache_tokens: int = 0,
        host_cache_bytes: int = 0,
    ):
        started = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        # The int4 kernel behind four_bit_rows is a CPU one (four_bit.py), and it pays only with bf16
        # activations: with fp32 ones torch's kernel ran 25x slower here (0.92 against 0.038 ms a
        # projection at 1 row), slower than the dense fp32 matmul it would replace.
        if self.device.type != "cpu" or DTYPES[dtype] != torch.bfloat16:
            four_bit_rows = 0
        # On a CPU, a step with a single decode row attends it like a one-token prompt chunk:
        # block-wise attention's fixed cost (about twenty small ops a layer) is what such a step
        # would pay. On CUDA the chunk's path was the dearer one: on an H200 one row took 1.54x an
        # 8-row block-wise step that way, and 0.96x block-wise (two runs, docs/benchmarks.md).
        self._chunk_decode_rows = FEW_DECODE_ROWS if self.device.type == "cpu" else 0
        checkpoint = load_checkpoint(model_path, DTYPES[dtype], self.device, four_bit=four_bit_rows > 0)
        window = min(context_window, checkpoint.config.trained_context)
        self.tokenizer = load_tokenizer(model_path, window)
        self.model = LlamaModel(checkpoint, max_positions=window, four_bit_rows=four_bit_rows)
        # every sequence the scheduler admits fits: its budget of cells, plus a partly filled last
        # block per sequence (one window when nothing sets a budget: a single sequence)
        budget = kv_tokens or window
        self.cache = PagedKVCache(checkpoint.config, blocks_for(budget) + max_sequences, DTYPES[dtype], self.device)
        self.sampler = BatchSampler(self.tokenizer.eog_ids, self.device)
        self.max_chunk_tokens = max_step_tokens
        # measured on 2 Zen 5 cores, one sequence at 300 tokens: 29 ms a step, 40 ms with 3 guesses
        # on the few-rows (int4) kernel, 90 ms with 4 (bf16 weights): guesses stay on that kernel.
        # Without it (fp32, CUDA) the figure is a guess, not a measurement.
        few_rows = self.model.four_bit_rows
        self.draft_costs = DraftCosts(0.15, few_rows - 1, few_rows) if few_rows > 1 else DraftCosts(0.5, 8)
        self._constrained: Constrained | None = None
        # the prefix cache (engines/prefix_cache.py decides what to keep): a cached prompt holds
        # references to its blocks in the KV cache, given up when a running sequence needs them
        self._prefix: PrefixCache | None = None
        if prefix_cache_tokens:
            host = HostTier(host_cache_bytes) if host_cache_bytes else None
            self._prefix = PrefixCache(
                PrefixIndex(list(range(HOLDERS)), prefix_cache_tokens), CachedBlocks(self.cache), host
            )
            self.cache.reclaim = self._prefix.reclaim
        _return_freed_memory()
        log.info("torch engine ready on %s (%s) in %.1f s", self.device, dtype, time.perf_counter() - started)

    # Every method that touches the KV cache runs in inference mode: the cache grows inside step(),
    # and a tensor made in inference mode may not be changed in place outside it.
    @torch.inference_mode()
    def add_sequence(self, seq: Sequence) -> None:
        self.cache.add(seq.seq_id)
        self.sampler.add(seq.seq_id, seq.params)
        if self._prefix is not None and seq.num_computed == 0 and seq.params.prompt_logprobs is None:
            self._prefix.reuse(seq, seq.seq_id)
        if seq.params.grammar is not None:
            if self._constrained is None:  # built with the first constrained sequence (~1 s)
                tokenizer = structured_tokenizer(self.tokenizer)
                self._constrained = Constrained(tokenizer, self.tokenizer.vocab_size, torch.get_num_threads())
            self._constrained.add(seq)

    @torch.inference_mode()
    def remove_sequence(self, seq: Sequence) -> None:
        if self._prefix is not None and seq.status is SequenceStatus.FINISHED:
            # the answer too: a conversation's next turn resends it after this prompt
            self._prefix.remember(seq, seq.seq_id, seq.num_computed, seq.num_prompt_tokens)
        self.cache.remove(seq.seq_id)
        self.sampler.remove(seq.seq_id)
        if self._constrained is not None:
            self._constrained.remove(seq)

    @torch.inference_mode()
    def step(self, chunks: Seq[Chunk]) -> list[list[int]]:
        if sum(c.num_tokens + len(c.draft) for c in chunks) > self.max_chunk_tokens:
            raise ValueError("a step may carry at most max_chunk_tokens tokens")
        for chunk in chunks:
            self.cache.ensure(chunk.seq.seq_id, chunk.seq.num_computed + chunk.num_tokens + len(chunk.draft))
        # decode rows (one token each) go first: the model attends them as one batch
        inputs, sampled_chunks, scored = self._pack(sorted(chunks, key=lambda c: c.num_tokens != 1 or bool(c.draft)))
        logits = self.model.forward(inputs, self.cache)  # writes every token's KV even when nothing is sampled
        sample_rows = sum(1 + len(c.draft) for c in sampled_chunks)
        if scored:
            self._score_prompts(logits[sample_rows:], scored)
            logits = logits[:sample_rows]
        if self._prefix is not None:
            for chunk in chunks:
                if chunk.completes_prompt:
                    self._prefix.remember(chunk.seq, chunk.seq.seq_id, chunk.seq.num_prompt_tokens)
        by_seq: dict[int, list[int]] = {}
        plain, plain_rows, row = [], [], 0
        for chunk in sampled_chunks:
            if chunk.draft:
                by_seq[chunk.seq.seq_id] = self._verify(chunk, logits[row : row + 1 + len(chunk.draft)])
            else:
                plain.append(chunk.seq)
                plain_rows.append(row)
            row += 1 + len(chunk.draft)
        if plain:
            rows = logits if len(plain_rows) == len(logits) else logits[torch.tensor(plain_rows, device=self.device)]
            for seq, token in zip(plain, self.sampler.sample(rows, plain, self._constrained), strict=True):
                by_seq[seq.seq_id] = [token]
        return [by_seq.get(c.seq.seq_id, []) if c.completes_sequence_input else [] for c in chunks]

    def _verify(self, chunk: Chunk, rows: torch.Tensor) -> list[int]:
        """`speculative.verify` over `rows` (the last token fed, then each guess). The cells of
        guesses not kept need no clearing: nothing reads past a sequence's length, and the next
        step writes over them."""
        seq = chunk.seq
        return speculative.verify(
            chunk.draft, lambda i: self.sampler.sample(rows[i : i + 1], [seq])[0], self.tokenizer.is_end_of_generation
        )

    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self._prefix.stats() if self._prefix is not None else PrefixCacheStats()

    def cached_prefix_length(self, tokens: list[int]) -> int | None:
        return self._prefix.cached_length(tokens) if self._prefix is not None else None

    @staticmethod
    def _score_prompts(logits: torch.Tensor, scored: list[tuple[Sequence, range]]) -> None:
        """`logits`: the scored prompt positions' rows, sequence after sequence, as `_pack` listed them."""
        log_probs = logits.log_softmax(dim=-1)
        row = 0
        for seq, positions in scored:
            rows = log_probs[row : row + len(positions)]
            row += len(positions)
            targets = torch.tensor(seq.token_ids[positions.start + 1 : positions.stop + 1], device=rows.device)
            chosen = rows.gather(1, targets[:, None])
            ranks = ((rows > chosen).sum(dim=1) + 1).tolist()
            k = seq.params.prompt_logprobs or 0
            top_values, top_ids = rows.topk(k, dim=-1) if k else (rows[:, :0], rows[:, :0].long())
            seq.note_prompt_logprobs(
                [
                    SampledLogprobs(target, value, tuple(zip(ids, values, strict=True)), rank)
                    for target, value, ids, values, rank in zip(
                        targets.tolist(),
                        chosen[:, 0].tolist(),
                        top_ids.tolist(),
                        top_values.tolist(),
                        ranks,
                        strict=True,
                    )
                ]
            )

    def _pack(self, chunks: list[Chunk]) -> tuple[StepInputs, list[Chunk], list[tuple[Sequence, range]]]:
        block = self.cache.block
        token_ids: list[int] = []
        positions: list[int] = []
        written: list[int] = []  # the block each token's key and value go to
        decode_reads: list[tuple[list[int], int]] = []  # per decode row: its blocks, cells of the last one
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
        sampled: list[Chunk] = []
        scored_rows: list[int] = []  # after the sample rows: prompt positions whose logits score a prompt token
        scored: list[tuple[Sequence, range]] = []
        tensor = functools.partial(torch.tensor, dtype=torch.long, device=self.device)
        blockwise = sum(1 for c in chunks if c.num_tokens == 1 and not c.draft) > self._chunk_decode_rows
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed
            n = chunk.num_tokens + len(chunk.draft)  # a draft's guesses go in after the tokens fed
            table, row = self.cache.table(seq.seq_id), len(token_ids)
            token_ids.extend(seq.token_ids[start : start + chunk.num_tokens])
            token_ids.extend(chunk.draft)
            positions.extend(range(start, start + n))
            written.extend(table[p // block] for p in range(start, start + n))
            if n == 1 and blockwise:
                used = blocks_for(start + 1, block)
                decode_reads.append((table[:used], start + 1 - (used - 1) * block))
            else:
                mask = torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(diagonal=start)
                prompt_blocks = tensor(table[: blocks_for(start + n, block)])
                prefills.append(PrefillChunk(start=row, length=n, blocks=prompt_blocks, mask=mask))
            if chunk.completes_sequence_input:  # the last token fed, and every guess after it
                sample_rows.extend(range(row + chunk.num_tokens - 1, row + n))
                sampled.append(chunk)
            predicting = logprobs.scored_positions(seq, start, chunk.num_tokens)
            if predicting:
                scored_rows.extend(range(row, row + len(predicting)))
                scored.append((seq, predicting))
        position_tensor = tensor(positions)
        decode = self._decode_batch(decode_reads) if decode_reads else None
        inputs = StepInputs(
            token_ids=tensor(token_ids),
            positions=position_tensor,
            blocks=tensor(written),
            offsets=position_tensor % block,
            decode=decode,
            prefills=prefills,
            sample_rows=tensor(sample_rows + scored_rows),
        )
        return inputs, sampled, scored

    def _decode_batch(self, reads: list[tuple[list[int], int]]) -> DecodeBatch:
        """Which row reads which block, and how many of its cells: blocks below the highest one
        read are attended in place, each by its first reader; a block's further readers get a copy
        (and every reader does, where most of that span is blocks no row reads)."""
        block = self.cache.block
        span = 1 + max(max(blocks) for blocks, _ in reads)
        if span > 2 * sum(len(blocks) for blocks, _ in reads):
            # mostly blocks no row reads (cached prompts, free ones, a few rows): gathering the
            # read ones costs less than attending the whole span
            span = 0
        owner, readable = [0] * span, [0] * span  # a block nobody reads: row 0, no cell readable
        gathered: list[int] = []
        gathered_rows: list[int] = []
        gathered_cells: list[int] = []
        for row, (blocks, last_cells) in enumerate(reads):
            for i, b in enumerate(blocks):
                cells = last_cells if i == len(blocks) - 1 else block
                if b < span and not readable[b]:
                    owner[b], readable[b] = row, cells
                else:
                    gathered.append(b)
                    gathered_rows.append(row)
                    gathered_cells.append(cells)
        tensor = functools.partial(torch.tensor, dtype=torch.long, device=self.device)
        cell = torch.arange(block, device=self.device)[None, :]

        def block_reads(rows: list[int], cells: list[int], blocks: torch.Tensor | None = None) -> BlockReads:
            masked = (cell >= tensor(cells)[:, None])[:, None, None, :]
            bias = torch.zeros(len(rows), 1, 1, block, dtype=self.cache.dtype, device=self.device)
            return BlockReads(rows=tensor(rows), bias=bias.masked_fill_(masked, -torch.inf), blocks=blocks)

        block_lists = [block_reads(owner, readable)] if span else []
        if gathered:
            block_lists.append(block_reads(gathered_rows, gathered_cells, tensor(gathered)))
        return DecodeBatch(size=len(reads), reads=block_lists)

    def close(self) -> None:
        pass  # tensors are freed with the engine
