"""The torch engine's tokenizer, loadable without torch (process mode validates in the parent)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tokenmill.engines.base import Tokenizer


class ModelTokenizer(Tokenizer, Protocol):
    """A real model's tokenizer also names its end-of-generation tokens (the sampler masks them)."""

    eog_ids: list[int]


def load_tokenizer(model_path: Path, context_window: int) -> ModelTokenizer:
    """A GGUF file carries its own vocabulary, read with llama.cpp's tokenizer so both engines turn
    a prompt into the same tokens; a Hugging Face folder carries tokenizer.json."""
    if model_path.is_dir():
        from tokenmill.engines.torchlm.hf_tokenizer import HFTokenizer

        return HFTokenizer(model_path, context_window)
    from tokenmill.engines.llamacpp import load_tokenizer as load_gguf_tokenizer

    return load_gguf_tokenizer(model_path, context_window)
