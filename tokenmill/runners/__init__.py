"""Serving patterns behind one interface. `build_runner` maps `--mode` to a runner."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from tokenmill.engines import (
    build_engine,
    build_tokenizer,
    engine_spec,
    served_model_name,
)
from tokenmill.runners.base import RequestHandle, RequestLimits, Runner, RunnerStats

if TYPE_CHECKING:  # only a type here: engine and worker processes never import the settings (~0.2 s)
    from tokenmill.config import Settings

__all__ = ["RequestHandle", "RequestLimits", "Runner", "RunnerStats", "build_runner"]


def build_runner(settings: Settings) -> Runner:
    runner = _build(settings)
    runner.limits = RequestLimits(max_prompt_tokens=settings.max_prompt_tokens, max_tokens=settings.max_tokens_limit)
    if settings.engine != "upstream":
        from tokenmill.runners.embeddings import EmbeddingService

        runner.embeddings = EmbeddingService(engine_spec(settings))
    return runner


def _build(settings: Settings) -> Runner:
    if settings.engine == "upstream":
        from tokenmill.runners.upstream import UpstreamRunner

        return UpstreamRunner(settings, settings.served_model_name or settings.upstream_model)
    name = served_model_name(settings)
    if settings.mode in ("async", "sync"):
        from tokenmill.runners.executor import ExecutorRunner

        threads = settings.sync_threads if settings.mode == "sync" else None
        spec = engine_spec(settings)
        return ExecutorRunner(
            functools.partial(build_engine, spec),
            settings.replicas,
            name,
            threads=threads,
            speculative=spec.speculative,
        )
    if settings.mode == "process":
        from tokenmill.runners.processes import ProcessRunner

        return ProcessRunner(settings, name)
    if settings.mode == "batch":
        from tokenmill.runners.restarts import RestartPolicy
        from tokenmill.runners.scheduler import SchedulerConfig

        spec = engine_spec(settings)
        config = SchedulerConfig(
            max_batch=settings.max_batch,
            kv_tokens=settings.kv_budget(),
            max_step_tokens=settings.max_step_tokens,
            over_share_rows=settings.over_share_rows,
            speculative=spec.speculative,
        )
        policy = RestartPolicy(settings.engine_restart_limit, settings.engine_restart_window)
        if settings.engine_process:
            from tokenmill.runners.engine_process import EngineProcessRunner

            tokenizer = functools.partial(build_tokenizer, settings)
            return EngineProcessRunner(
                spec, config, name, tokenizer, policy, settings.log_level.upper(), settings.gc_freeze
            )
        from tokenmill.runners.batching import BatchingRunner

        return BatchingRunner(functools.partial(build_engine, spec), config, name, policy)
    raise ValueError(f"unknown mode {settings.mode!r}")
