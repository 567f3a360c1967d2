"""Embeddings beside generation, in any serving pattern.

The embedder (engines.embeddings) holds its own copy of the model and runs on one thread of its
own, so an embeddings request never waits for a generation step nor stalls one; it is built on the
first request (about half a second for the default model), so a server that never embeds never
pays its memory.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tokenmill.engines import EngineSpec, build_embedder
from tokenmill.engines.embeddings import Embedder


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: list[np.ndarray]
    prompt_tokens: int


class EmbeddingService:
    def __init__(self, spec: EngineSpec):
        self._spec = spec
        self._embedder: Embedder | None = None  # built and used on the one thread below only
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-embed")

    async def embed(self, inputs: Sequence[Sequence[int]]) -> Embeddings:
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._thread, functools.partial(self._embed, inputs))
        return Embeddings(vectors, sum(len(tokens) for tokens in inputs))

    def _embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        if self._embedder is None:
            self._embedder = build_embedder(self._spec)
        return self._embedder.embed(inputs)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._embedder is not None:
            self._embedder.close()
