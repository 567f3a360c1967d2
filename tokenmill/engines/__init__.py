"""Model backends. `build_engine` is the only place that knows which class backs which name."""

from __future__ import annotations

from tokenmill.config import Settings
from tokenmill.engines.base import Chunk, StepEngine, Tokenizer

__all__ = ["Chunk", "StepEngine", "Tokenizer", "build_engine", "build_tokenizer", "served_model_name"]


def build_tokenizer(settings: Settings) -> Tokenizer:
    """The engine's tokenizer without its weights (process mode validates in the parent)."""
    if settings.engine == "simulated":
        from tokenmill.engines.simulated import SimulatedTokenizer

        return SimulatedTokenizer(settings.context_window)
    if settings.engine == "torch":
        from tokenmill.engines.model_files import resolve_model_path
        from tokenmill.engines.torchlm.tokenizer import load_tokenizer as load_torch_tokenizer

        return load_torch_tokenizer(resolve_model_path(settings.model, folders=True), settings.context_window)
    from tokenmill.engines.llamacpp import load_tokenizer
    from tokenmill.engines.model_files import resolve_model_path

    return load_tokenizer(resolve_model_path(settings.model), settings.context_window)


def build_engine(settings: Settings) -> StepEngine:
    if settings.engine == "simulated":
        from tokenmill.engines.simulated import SimulatedEngine

        return SimulatedEngine(
            context_window=settings.context_window,
            ttft_ms=settings.sim_ttft_ms,
            itl_ms=settings.sim_itl_ms,
            batch_cost=settings.sim_batch_cost,
            gil=settings.sim_gil,
            mean_reply_tokens=settings.sim_reply_tokens,
        )
    if settings.engine == "llamacpp":
        from tokenmill.engines.llamacpp import LlamaCppEngine
        from tokenmill.engines.model_files import resolve_model_path

        if settings.mode == "batch":
            return LlamaCppEngine(
                resolve_model_path(settings.model),
                context_window=settings.context_window,
                max_sequences=settings.max_batch,
                # Headroom over the scheduler's budget: the cells the prefix cache holds on its own
                # (at most one prompt), and slack so a step never lacks free cells to place its tokens.
                kv_tokens=settings.kv_tokens + settings.context_window + settings.max_step_tokens,
                threads=settings.threads_per_replica(),
                max_step_tokens=settings.max_step_tokens,
            )
        return LlamaCppEngine(
            resolve_model_path(settings.model),
            context_window=settings.context_window,
            threads=settings.threads_per_replica(),
        )
    if settings.engine == "torch":
        from tokenmill.engines.model_files import resolve_model_path
        from tokenmill.engines.torchlm.engine import TorchEngine

        batched = settings.mode == "batch"
        return TorchEngine(
            resolve_model_path(settings.model, folders=True),
            context_window=settings.context_window,
            max_sequences=settings.max_batch if batched else 1,
            threads=settings.threads_per_replica(),
            max_step_tokens=settings.max_step_tokens if batched else 512,
            dtype=settings.torch_dtype,
            device=settings.torch_device,
            four_bit_rows=settings.torch_four_bit_rows,
        )
    raise ValueError(f"unknown engine {settings.engine!r}")


def served_model_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    if settings.engine == "simulated":
        return "simulated"
    from tokenmill.engines.model_files import default_model_name, resolve_model_path

    return default_model_name(resolve_model_path(settings.model, folders=settings.engine == "torch"))
