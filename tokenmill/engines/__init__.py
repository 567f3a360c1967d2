"""Model backends. `build_engine` is the only place that knows which class backs which name.

spec = engine_spec(settings)     # small, picklable: what to build (crosses into engine processes)
engine = build_engine(spec)      # loads the model and runs a warm-up decode before returning
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill.cpus import available_cpus
from tokenmill.engines.base import Chunk, StepEngine, Tokenizer
from tokenmill.engines.embeddings import Embedder
from tokenmill.engines.speculative import SpeculativeConfig

if TYPE_CHECKING:  # only a type here: engine and worker processes never import the settings (~0.2 s)
    from tokenmill.config import Settings

__all__ = [
    "Chunk",
    "Embedder",
    "EngineSpec",
    "StepEngine",
    "Tokenizer",
    "build_embedder",
    "build_engine",
    "build_tokenizer",
    "engine_spec",
    "served_model_name",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SimulatedSpec:
    ttft_ms: float
    itl_ms: float
    batch_cost: float
    gil: str
    reply_tokens: int
    fault: str
    fault_at_step: int


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Everything needed to build one engine instance, and nothing else (never the whole Settings)."""

    engine: str
    model_path: str | None  # resolved; None for the simulated engine
    context_window: int
    threads: int
    batched: bool  # one engine stepping many sequences (batch mode) or one sequence at a time
    max_sequences: int
    kv_tokens: int
    max_step_tokens: int
    llama_extra_buffers: bool = False
    kv_streams: bool = False
    torch_dtype: str = "bfloat16"
    torch_device: str = "auto"
    torch_four_bit_rows: int = 4
    prefix_cache_tokens: int = 0  # cells the prefix cache may hold beside the running sequences; 0: off
    host_cache_bytes: int = 0  # the prefix cache's host-memory tier; 0: off
    speculative: SpeculativeConfig | None = None  # drafts for the replica patterns' decode steps
    simulated: SimulatedSpec | None = None


def engine_spec(settings: Settings) -> EngineSpec:
    from tokenmill.engines.model_files import resolve_model_path

    batched = settings.mode == "batch"
    model_path = None
    if settings.engine in ("llamacpp", "torch"):
        model_path = str(resolve_model_path(settings.model, folders=settings.engine == "torch"))
    simulated = None
    if settings.engine == "simulated":
        simulated = SimulatedSpec(
            settings.sim_ttft_ms,
            settings.sim_itl_ms,
            settings.sim_batch_cost,
            settings.sim_gil,
            settings.sim_reply_tokens,
            settings.sim_fault,
            settings.sim_fault_at_step,
        )
    return EngineSpec(
        engine=settings.engine,
        model_path=model_path,
        context_window=settings.context_window,
        threads=settings.threads_per_replica(),
        batched=batched,
        max_sequences=settings.max_batch if batched else 1,
        kv_tokens=settings.kv_budget(),
        max_step_tokens=settings.max_step_tokens if batched else 512,
        llama_extra_buffers=settings.llama_extra_buffers,
        kv_streams=settings.kv_streams and batched,
        torch_dtype=settings.torch_dtype,
        torch_device=settings.torch_device,
        torch_four_bit_rows=settings.torch_four_bit_rows,
        prefix_cache_tokens=settings.prefix_cache_budget(),
        host_cache_bytes=settings.host_cache_bytes(),
        speculative=SpeculativeConfig(settings.speculative_tokens, settings.speculative_max_batch),
        simulated=simulated,
    )


def build_tokenizer(settings: Settings) -> Tokenizer:
    """The engine's tokenizer without its weights (for processes that only validate requests)."""
    if settings.engine == "simulated":
        from tokenmill.engines.simulated import SimulatedTokenizer

        return SimulatedTokenizer(settings.context_window)
    from tokenmill.engines.model_files import resolve_model_path

    if settings.engine == "torch":
        from tokenmill.engines.torchlm.tokenizer import (
            load_tokenizer as load_torch_tokenizer,
        )

        return load_torch_tokenizer(resolve_model_path(settings.model, folders=True), settings.context_window)
    from tokenmill.engines.llamacpp import load_tokenizer

    return load_tokenizer(resolve_model_path(settings.model), settings.context_window)


def build_engine(spec: EngineSpec) -> StepEngine:
    """Load the engine and run one warm-up decode, so a native fault shows now, not on a request."""
    from tokenmill.engines.warmup import warm_up

    engine = _construct(spec)
    log.info(
        "engine %s: %d threads (%d CPUs usable by this process)%s",
        spec.engine,
        spec.threads,
        available_cpus(),
        ""
        if spec.engine != "llamacpp"
        else f"; llama.cpp extra weight buffers {'on' if spec.llama_extra_buffers else 'off'}"
        + ("; a KV stream per sequence" if spec.kv_streams else ""),
    )
    try:
        warm_up(engine)
    except BaseException:
        engine.close()
        raise
    return engine


def _construct(spec: EngineSpec) -> StepEngine:
    if spec.engine == "simulated":
        from tokenmill.engines.simulated import SimulatedEngine

        sim = spec.simulated
        assert sim is not None
        return SimulatedEngine(
            context_window=spec.context_window,
            ttft_ms=sim.ttft_ms,
            itl_ms=sim.itl_ms,
            batch_cost=sim.batch_cost,
            gil=sim.gil,  # type: ignore[arg-type]
            mean_reply_tokens=sim.reply_tokens,
            fault=sim.fault,  # type: ignore[arg-type]
            fault_at_step=sim.fault_at_step,
        )
    assert spec.model_path is not None
    if spec.engine == "llamacpp":
        from tokenmill.engines.llamacpp import LlamaCppEngine

        if spec.batched:
            return LlamaCppEngine(
                Path(spec.model_path),
                context_window=spec.context_window,
                max_sequences=spec.max_sequences,
                # slack over the scheduler's budget, so a step never lacks free cells to place its tokens
                # (the engine adds the prefix cache's cells itself)
                kv_tokens=spec.kv_tokens + spec.max_step_tokens,
                threads=spec.threads,
                max_step_tokens=spec.max_step_tokens,
                prefix_cache=spec.prefix_cache_tokens > 0,
                prefix_cache_tokens=spec.prefix_cache_tokens,
                host_cache_bytes=spec.host_cache_bytes,
                extra_buffers=spec.llama_extra_buffers,
                kv_streams=spec.kv_streams,
            )
        return LlamaCppEngine(
            Path(spec.model_path),
            context_window=spec.context_window,
            threads=spec.threads,
            prefix_cache=spec.prefix_cache_tokens > 0,
            prefix_cache_tokens=spec.prefix_cache_tokens,
            host_cache_bytes=spec.host_cache_bytes,
            extra_buffers=spec.llama_extra_buffers,
        )
    if spec.engine == "torch":
        from tokenmill.engines.torchlm.engine import TorchEngine

        return TorchEngine(
            Path(spec.model_path),
            context_window=spec.context_window,
            max_sequences=spec.max_sequences,
            kv_tokens=spec.kv_tokens if spec.batched else 0,  # 0: one sequence, one window
            threads=spec.threads,
            max_step_tokens=spec.max_step_tokens,
            dtype=spec.torch_dtype,
            device=spec.torch_device,
            four_bit_rows=spec.torch_four_bit_rows,
            prefix_cache_tokens=spec.prefix_cache_tokens,
            host_cache_bytes=spec.host_cache_bytes,
        )
    raise ValueError(f"unknown engine {spec.engine!r}")


def build_embedder(spec: EngineSpec) -> Embedder:
    """The served model's embeddings (engines.embeddings): its own copy of the weights."""
    if spec.engine == "simulated":
        from tokenmill.engines.simulated import SimulatedEmbedder

        return SimulatedEmbedder()
    assert spec.model_path is not None
    if spec.engine == "torch":
        from tokenmill.engines.torchlm.embedder import TorchEmbedder

        return TorchEmbedder(Path(spec.model_path), spec.context_window, spec.torch_dtype, spec.torch_device)
    from tokenmill.engines.embeddings import LlamaCppEmbedder

    return LlamaCppEmbedder(Path(spec.model_path), spec.context_window, spec.threads, spec.llama_extra_buffers)


def served_model_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    if settings.engine == "simulated":
        return "simulated"
    from tokenmill.engines.model_files import default_model_name, resolve_model_path

    return default_model_name(resolve_model_path(settings.model, folders=settings.engine == "torch"))
