"""Embeddings in the torch engine: the model's hidden states, mean-pooled (see engines.embeddings)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tokenmill.engines.embeddings import unit
from tokenmill.engines.torchlm.checkpoint import load_checkpoint
from tokenmill.engines.torchlm.engine import DTYPES, pick_device
from tokenmill.engines.torchlm.model import LlamaModel


class TorchEmbedder:
    def __init__(self, model_path: Path, context_window: int, dtype: str = "bfloat16", device: str = "auto"):
        self._device = pick_device(device)
        checkpoint = load_checkpoint(model_path, DTYPES[dtype], self._device, four_bit=False)
        window = min(context_window, checkpoint.config.trained_context)
        self._model = LlamaModel(checkpoint, max_positions=window)
        self._dimensions = checkpoint.embedding.shape[1]

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        vectors = []
        for tokens in inputs:
            ids = torch.tensor(list(tokens), dtype=torch.long, device=self._device)
            pooled = self._model.hidden_states(ids).float().mean(dim=0)
            vectors.append(unit(pooled.cpu().numpy()))
        return vectors

    def close(self) -> None:
        pass
