"""Embeddings from the served model: its last hidden states, mean-pooled over the input's tokens and
scaled to unit length (OpenAI's embeddings are unit vectors, so a dot product is the cosine).

An `Embedder` holds its own copy of the model, apart from the generating engine: a llama.cpp
context in embeddings mode (llama.cpp pools in C), or the torch model's forward pass without its
output head. A chat model is not trained as an embedding model; its pooled states still place a
paraphrase nearer than an unrelated sentence (tests/e2e/test_model_embeddings.py measures it).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from tokenmill.errors import EngineFailure


class Embedder(Protocol):
    @property
    def dimensions(self) -> int: ...

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One unit vector (float32, `dimensions` long) per input's token ids, in order."""

    def close(self) -> None: ...


def unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype(np.float32)


class LlamaCppEmbedder:
    def __init__(self, model_path: Path, context_window: int, threads: int, extra_buffers: bool = False):
        import llama_cpp

        from tokenmill.engines.llamacpp import load_model, model_params

        self._llama = llama_cpp
        self._model = load_model(model_path, model_params(extra_buffers))
        params = llama_cpp.llama_context_default_params()
        # a pooled input must fit one micro-batch: the whole window in one step
        params.n_ctx = params.n_batch = params.n_ubatch = context_window
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineFailure("llama.cpp could not create an embeddings context")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(context_window, 0, 1)
        self._dimensions = llama_cpp.llama_model_n_embd(self._model)

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        llama, batch = self._llama, self._batch
        vectors = []
        for tokens in inputs:
            llama.llama_memory_clear(self._memory, True)
            for position, token in enumerate(tokens):
                batch.token[position], batch.pos[position], batch.n_seq_id[position] = token, position, 1
                batch.seq_id[position][0], batch.logits[position] = 0, True
            batch.n_tokens = len(tokens)
            status = llama.llama_decode(self._ctx, batch)
            if status != 0:
                raise EngineFailure(f"llama_decode failed for an embedding (status {status})")
            pooled = llama.llama_get_embeddings_seq(self._ctx, 0)
            if not pooled:
                raise EngineFailure("llama.cpp returned no pooled embedding")
            array = ctypes.cast(pooled, ctypes.POINTER(ctypes.c_float * self._dimensions)).contents
            vectors.append(unit(np.array(array, dtype=np.float32)))
        return vectors

    def close(self) -> None:
        if self._ctx:
            self._llama.llama_batch_free(self._batch)
            self._llama.llama_free(self._ctx)
            self._llama.llama_model_free(self._model)
            self._ctx = None
