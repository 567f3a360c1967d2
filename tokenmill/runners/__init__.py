"""Serving patterns behind one interface. `build_runner` maps `--mode` to a runner."""

from __future__ import annotations

import functools

from tokenmill.config import Settings
from tokenmill.engines import build_engine, served_model_name
from tokenmill.runners.base import RequestHandle, RequestLimits, Runner, RunnerStats

__all__ = ["RequestHandle", "RequestLimits", "Runner", "RunnerStats", "build_runner"]


def build_runner(settings: Settings) -> Runner:
    runner = _build(settings)
    runner.limits = RequestLimits(max_prompt_tokens=settings.max_prompt_tokens, max_tokens=settings.max_tokens_limit)
    return runner


def _build(settings: Settings) -> Runner:
    if settings.engine == "upstream":
        from tokenmill.runners.upstream import UpstreamRunner

        return UpstreamRunner(settings, settings.served_model_name or settings.upstream_model)
    name = served_model_name(settings)
    if settings.mode in ("async", "sync"):
        from tokenmill.runners.executor import ExecutorRunner

        threads = settings.sync_threads if settings.mode == "sync" else None
        return ExecutorRunner(functools.partial(build_engine, settings), settings.replicas, name, threads=threads)
    if settings.mode == "process":
        from tokenmill.runners.processes import ProcessRunner

        return ProcessRunner(settings, name)
    if settings.mode == "batch":
        from tokenmill.runners.batching import BatchingRunner
        from tokenmill.runners.scheduler import SchedulerConfig

        config = SchedulerConfig(
            max_batch=settings.max_batch, kv_tokens=settings.kv_tokens, max_step_tokens=settings.max_step_tokens
        )
        return BatchingRunner(functools.partial(build_engine, settings), config, name)
    raise ValueError(f"unknown mode {settings.mode!r}")
