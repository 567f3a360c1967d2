"""The llama.cpp engine, on llama-cpp-python's low-level API.

One context holds up to `max_sequences` sequences, in one unified KV cache or, with `kv_streams`,
a KV stream each (llamacpp_kv.py); each sequence gets a slot (its llama.cpp sequence id) and its
own seeded sampler (llamacpp_sampling.py), so seeds are per request even when batched.
`step()` packs every chunk into one `llama_batch` and runs one `llama_decode`; ctypes releases the
GIL for the duration, so the event loop and other replicas keep running.

Prefix cache: `prefix_cache.HOLDERS` holders keep the KV cells of recent prompts, as the shared
`PrefixIndex` directs (engines/prefix_cache.py). A new sequence whose prompt starts like a cached
one (a chat template, a system prompt, a conversation so far) gets those cells and only prefills
the rest. A prompt that finished prefill is kept the same way, and the whole sequence, answer
included, when it finishes (a conversation's next turn grows its own entry). In the unified cache
a holder is an extra sequence id (a reference to the cells, not a copy), and the context is sized
for the cache's budget on top of the running sequences', so the cache never takes a cell a running
sequence needs; with a stream per sequence, a host-memory copy (llamacpp_kv.py).

Weights stay in plain CPU buffers unless `extra_buffers` opts in: llama.cpp's "extra buffer types"
(AMX tiles, repacked layouts) are on by default in the library, and its AMX matmul segfaults at the
first decode on some Intel Xeons (4th generation and later), as llama-server does without
`--no-repack`. Every model this project loads -- engine, tokenizer, references, baselines -- takes
its parameters from `model_params()` (or, for `llama_cpp.Llama`, `portable_llama()`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from pathlib import Path

import llama_cpp
import numpy as np

from tokenmill.engines import logprobs, speculative
from tokenmill.engines.base import Chunk, DraftCosts
from tokenmill.engines.chat_template import ChatTemplate
from tokenmill.engines.host_cache import HostTier
from tokenmill.engines.llamacpp_kv import SharedCache, Slots, StreamPerSequence
from tokenmill.engines.llamacpp_sampling import RowSampler
from tokenmill.engines.prefix_cache import HOLDERS, PrefixCacheStats, PrefixIndex
from tokenmill.engines.prefix_tiers import PrefixCache
from tokenmill.engines.sequence import Sequence, SequenceStatus
from tokenmill.engines.structured import Constrained
from tokenmill.errors import EngineFailure
from tokenmill.generation import ChatMessage, ToolFunction
from tokenmill.reasoning import ReasoningFormat
from tokenmill.tools import ToolCallFormat

log = logging.getLogger(__name__)
_LLAMA_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 2 info, 3 warn, 4 error


@llama_cpp.llama_log_callback
def _forward_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp is chatty at load time; keep its warnings and errors, and which buffer types the
    # backend chose for the weights and caches (what decides whether the AMX/repack paths run).
    if not text:
        return
    line = text.decode("utf-8", "replace").rstrip()
    if level in _LLAMA_LOG_LEVELS:
        log.log(_LLAMA_LOG_LEVELS[level], "llama.cpp: %s", line)
    elif "buffer size =" in line:
        log.info("llama.cpp: %s", line.strip())


llama_cpp.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


class LlamaCppTokenizer:
    def __init__(self, model, vocab, context_window: int):
        self._model = model  # the vocabulary lives inside the model: keep it alive as long as this
        self._vocab = vocab
        self._context_window = context_window
        self._pieces: dict[int, bytes] = {}
        self._add_bos = llama_cpp.llama_vocab_get_add_bos(vocab)
        bos = self._piece(llama_cpp.llama_vocab_bos(vocab), special=True).decode("utf-8", "replace")
        eos = self._piece(llama_cpp.llama_vocab_eos(vocab), special=True).decode("utf-8", "replace")
        source = llama_cpp.llama_model_chat_template(model, None)
        self._bos_text = bos
        self._template = ChatTemplate(source.decode() if source else None, bos_token=bos, eos_token=eos)
        self.eog_ids = [
            t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)
        ]
        self._eog = frozenset(self.eog_ids)  # checked for every generated token: no ctypes call

    @property
    def context_window(self) -> int:
        return self._context_window

    def render_chat(self, messages: Seq[ChatMessage], tools: Seq[ToolFunction] = ()) -> str:
        text = self._template.render(messages, tools)
        if self._add_bos and self._bos_text and text.startswith(self._bos_text):
            text = text[len(self._bos_text) :]  # encode() adds it; never send it twice
        return text

    @property
    def tool_call_format(self) -> ToolCallFormat:
        return self._template.tool_format

    @property
    def reasoning_format(self) -> ReasoningFormat | None:
        return self._template.reasoning_format

    @property
    def vocab_size(self) -> int:
        return llama_cpp.llama_vocab_n_tokens(self._vocab)

    def structured_tokenizer(self):
        """llguidance's view of this vocabulary, for constrained decoding (built once, ~1 s)."""
        from tokenmill.engines.structured import ll_tokenizer

        return ll_tokenizer(self._vocab, self.vocab_size, self.eog_ids)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, True)
            if n >= 0:
                return list(tokens[:n])
            capacity = -n

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id, special=False)
        return piece

    def is_end_of_generation(self, token_id: int) -> bool:
        return token_id in self._eog

    def _piece(self, token_id: int, special: bool) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buffer, len(buffer), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buffer, len(buffer), 0, special)
        return buffer.raw[:n]


def _metadata(model, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    return buffer.value.decode() if n >= 0 else None


def _trained_context(model) -> int:
    """The context length the model was trained for (also when only its vocabulary is loaded)."""
    trained = llama_cpp.llama_model_n_ctx_train(model)
    if trained > 0:
        return trained
    architecture = _metadata(model, "general.architecture")
    value = _metadata(model, f"{architecture}.context_length") if architecture else None
    return int(value) if value and value.isdigit() else 2048


_library_model_defaults = llama_cpp.llama_cpp.llama_model_default_params


def model_params(extra_buffers: bool = False) -> llama_cpp.llama_model_params:
    """llama.cpp's default model parameters, with the extra weight buffers off unless asked for."""
    params = _library_model_defaults()
    params.use_extra_bufts = extra_buffers
    return params


def load_model(model_path: Path, params: llama_cpp.llama_model_params) -> llama_cpp.llama_model_p:
    """The model in `model_path`; EngineFailure where llama.cpp cannot load it."""
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise EngineFailure(f"llama.cpp could not load the model file {model_path}")
    return model


@contextlib.contextmanager
def portable_llama() -> Iterator[None]:
    """While open, `llama_cpp.Llama(...)` loads with the extra weight buffers off.

    `Llama.__init__` builds its own model parameters from `llama_model_default_params()` and has no
    argument for this one; references and baselines built on it must not crash where the engine
    does not."""
    library = llama_cpp.llama_cpp  # the module `Llama` reads it from
    library.llama_model_default_params = model_params
    try:
        yield
    finally:
        library.llama_model_default_params = _library_model_defaults


def load_tokenizer(model_path: Path, context_window: int) -> LlamaCppTokenizer:
    """Just the vocabulary, template and window (no weights): for processes that only validate."""
    params = model_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise EngineFailure(f"llama.cpp could not read the vocabulary of {model_path}")
    window = min(context_window, _trained_context(model))
    return LlamaCppTokenizer(model, llama_cpp.llama_model_get_vocab(model), window)


class LlamaCppEngine:
    def __init__(
        self,
        model_path: Path,
        *,
        context_window: int = 4096,
        max_sequences: int = 1,
        kv_tokens: int | None = None,
        threads: int | None = None,
        max_step_tokens: int = 512,
        prefix_cache: bool = True,
        prefix_cache_tokens: int | None = None,
        host_cache_bytes: int = 0,
        extra_buffers: bool = False,
        kv_streams: bool = False,
    ):
        threads = threads or os.cpu_count() or 1
        self.model_params = model_params(extra_buffers)
        self._model: llama_cpp.llama_model_p | None = load_model(model_path, self.model_params)
        window = min(context_window, _trained_context(self._model))
        cache_budget = (prefix_cache_tokens if prefix_cache_tokens is not None else window) if prefix_cache else 0
        params = llama_cpp.llama_context_default_params()
        holders = HOLDERS if prefix_cache else 0
        if kv_streams:  # a window of cells for each sequence; cached prompts live in host memory
            params.n_ctx, params.n_seq_max = max_sequences * window, max_sequences
        else:  # one budget however it is split; the cache's cells and sequence ids on top
            params.n_ctx, params.n_seq_max = (kv_tokens or window) + cache_budget, max_sequences + holders
        params.kv_unified = not kv_streams
        params.n_batch = params.n_ubatch = max_step_tokens
        # a scored prompt (prompt_logprobs) wants the logits of every row of its chunk; the library's
        # default is one per sequence. The output buffer grows only when a step asks (RSS unchanged).
        # At least one output per sequence id: the context reserves for that many at start.
        params.n_outputs_max = max(max_step_tokens, params.n_seq_max)
        params.n_outputs_max_per_seq = max_step_tokens
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineFailure("llama.cpp could not create a context (KV cache too large for memory?)")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        cells = StreamPerSequence(self._ctx, self._memory) if kv_streams else SharedCache(self._ctx, self._memory)
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.tokenizer = LlamaCppTokenizer(self._model, vocab, window)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.max_chunk_tokens = max_step_tokens
        # measured on 2 Zen 5 cores, one sequence at 300 tokens: 9.3 ms a step, +5.6 ms a guess
        # (5 rows 31.6 ms, 9 rows 50.6): a quantized matmul's rows cost nearly a row's arithmetic each
        self.draft_costs = DraftCosts(row_cost=0.6, max_tokens=16)
        self._batch = llama_cpp.llama_batch_init(max_step_tokens, 0, 1)
        self._slots = Slots(max_sequences)
        self._rows = RowSampler(self._n_vocab, window, self.tokenizer.eog_ids)
        self._threads = threads
        self._constrained: Constrained | None = None  # built with the first constrained sequence
        self._prefix: PrefixCache | None = None
        if prefix_cache:
            index = PrefixIndex(list(range(max_sequences, max_sequences + holders)), cache_budget)
            self._prefix = PrefixCache(index, cells, HostTier(host_cache_bytes) if host_cache_bytes else None)

    def add_sequence(self, seq: Sequence) -> None:
        slot = self._slots.take(seq.seq_id)
        if slot is None:
            raise EngineFailure("no free sequence slot in the llama.cpp context")
        self._rows.add(seq)
        if seq.params.grammar is not None:
            if self._constrained is None:
                self._constrained = Constrained(self.tokenizer.structured_tokenizer(), self._n_vocab, self._threads)
            self._constrained.add(seq)
        if self._prefix is not None and seq.num_computed == 0 and seq.params.prompt_logprobs is None:
            self._prefix.reuse(seq, slot)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self._prefix.stats() if self._prefix is not None else PrefixCacheStats()

    def cached_prefix_length(self, tokens: list[int]) -> int | None:
        return self._prefix.cached_length(tokens) if self._prefix is not None else None

    def remove_sequence(self, seq: Sequence) -> None:
        slot = self._slots.get(seq.seq_id)
        if slot is not None:
            if self._prefix is not None and seq.status is SequenceStatus.FINISHED:
                # the answer too: a conversation's next turn resends it after this prompt
                self._prefix.remember(seq, slot, seq.num_computed, seq.num_prompt_tokens)
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self._slots.give_back(seq.seq_id)
        self._rows.remove(seq.seq_id)
        if self._constrained is not None:
            self._constrained.remove(seq)

    def step(self, chunks: Seq[Chunk]) -> list[list[int]]:
        batch, n = self._batch, 0
        if sum(c.num_tokens + len(c.draft) for c in chunks) > self.max_chunk_tokens:
            raise ValueError("a step may carry at most max_chunk_tokens tokens")
        sample_rows: list[int | None] = [None] * len(chunks)
        scored: list[tuple[Sequence, int, range]] = []  # prompt positions scored: (seq, first row, positions)
        for i, slot in self._slots.order_by_slot(chunks):
            chunk = chunks[i]
            seq, start = chunk.seq, chunk.seq.num_computed
            first_row = n
            fed = seq.token_ids[start : start + chunk.num_tokens]
            for offset, token in enumerate(fed + list(chunk.draft)):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + offset, 1
                batch.seq_id[n][0], batch.logits[n] = slot, False
                n += 1
            positions = logprobs.scored_positions(seq, start, chunk.num_tokens)
            if positions:
                scored.append((seq, first_row, positions))
                for row in range(first_row, first_row + len(positions)):
                    batch.logits[row] = True
            if chunk.completes_sequence_input:
                last_fed = first_row + chunk.num_tokens - 1
                sample_rows[i] = last_fed
                for row in range(last_fed, n):  # the last token fed, and every guess after it
                    batch.logits[row] = True
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, batch)
        # 1: no room for the step's cells (nothing was computed): cached prompts give theirs back
        while status == 1 and self._prefix is not None and self._prefix.reclaim():
            status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineFailure(f"llama_decode failed (status {status})")
        for seq, first_row, positions in scored:
            self._score_prompt(seq, first_row, positions)
        if self._prefix is not None:
            for chunk in chunks:
                if chunk.completes_prompt:
                    seq = chunk.seq
                    self._prefix.remember(seq, self._slots[seq.seq_id], seq.num_prompt_tokens)
        plain = [(c.seq, row) for c, row in zip(chunks, sample_rows, strict=True) if row is not None and not c.draft]
        # every constrained row of the step in one call (None: no row is constrained)
        masks = None if self._constrained is None else self._constrained.mask_rows([seq for seq, _ in plain])
        tokens = iter(self._rows.sample(self._ctx, plain, masks, self._constrained))
        sampled: list[list[int]] = []
        for chunk, first_sampled in zip(chunks, sample_rows, strict=True):
            if first_sampled is None:
                sampled.append([])
            elif chunk.draft:
                sampled.append(self._verify(chunk, first_sampled))
            else:
                sampled.append([next(tokens)])
        return sampled

    def _verify(self, chunk: Chunk, first_row: int) -> list[int]:
        """`speculative.verify` over the rows of `chunk`'s last token and its draft; then drop
        the cells of the guesses not kept."""
        seq = chunk.seq
        kept = speculative.verify(
            chunk.draft,
            lambda i: self._rows.sample(self._ctx, [(seq, first_row + i)], None, None)[0],
            self.tokenizer.is_end_of_generation,
        )
        first_dropped = seq.num_computed + chunk.num_tokens + len(kept) - 1
        llama_cpp.llama_memory_seq_rm(self._memory, self._slots[seq.seq_id], first_dropped, -1)
        return kept

    def _score_prompt(self, seq: Sequence, first_row: int, positions: range) -> None:
        """The prompt tokens that the logits of batch rows `first_row ...` predict."""
        rows = np.stack(
            [
                np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, first_row + i), shape=(self._n_vocab,))
                for i in range(len(positions))
            ]
        )
        targets = seq.token_ids[positions.start + 1 : positions.stop + 1]
        seq.note_prompt_logprobs(logprobs.score_rows(rows, targets, seq.params.prompt_logprobs or 0))

    def close(self) -> None:
        self._rows.close()
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = self._model = None
