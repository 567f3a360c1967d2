"""The application factory: `create_app(settings)` wires a runner into the HTTP layer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import Scope

import tokenmill
from tokenmill.config import Settings
from tokenmill.heap import freeze_long_lived
from tokenmill.protocol import now
from tokenmill.runners import Runner, build_runner
from tokenmill.server.admission import Admission
from tokenmill.server.deadlines import Deadlines
from tokenmill.server.errors import install_error_handlers
from tokenmill.server.lifecycle import Lifecycle
from tokenmill.server.metrics import Metrics, watch_event_loop
from tokenmill.server.middleware import RequestContext
from tokenmill.server.routes import METRICS_PATH, OPEN_PATHS, known_paths, router
from tokenmill.server.serving import Serving


def create_app(settings: Settings | None = None, runner: Runner | None = None, *, freeze_heap: bool = False) -> FastAPI:
    """Build the app; the runner (built from settings unless given) starts and stops with it.
    `freeze_heap`: once it has started, freeze what is alive out of the garbage collector's
    sight (tokenmill.heap); for a process that serves until it exits, never for one that builds
    many apps (a test run)."""
    settings = settings or Settings()
    runner = runner or build_runner(settings)
    tenants = settings.tenants()
    admission = Admission(settings.capacity(), settings.queue_limit(), settings.queue_timeout, named=tenants.values())
    lifecycle = Lifecycle(admission)
    metrics = _metrics_for(runner, admission, lifecycle)
    deadlines = Deadlines(settings.first_token_timeout, settings.inter_token_timeout, settings.request_timeout)
    serving = Serving(runner, admission, lifecycle, metrics, deadlines)
    serving.ping_interval = settings.sse_ping_interval

    runner.on_fatal = lifecycle.fatal
    configured = settings.capacity()
    runner.on_capacity_change = lambda up, total: admission.set_capacity(configured * up // total)
    started = False

    async def start_runner() -> None:
        """Load the model; idempotent, so a server may call it before the lifespan to fail cleanly."""
        nonlocal started
        if not started:
            await runner.start()
            serving.set_reasoning(settings.reasoning_parser)
            started = True

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await start_runner()
        if freeze_heap:
            freeze_long_lived()
        lifecycle.ready = True
        watcher = asyncio.create_task(watch_event_loop(metrics))
        try:
            yield
        finally:
            lifecycle.ready = False
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            lifecycle.end_all("The server is stopping.")
            await runner.stop()
            if runner.embeddings is not None:  # its thread, and its model if one was built
                await asyncio.to_thread(runner.embeddings.close)

    app = FastAPI(title="tokenmill", version=tokenmill.__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.serving = serving
    app.state.start_runner = start_runner
    app.state.started_at = now()
    install_error_handlers(app)
    app.include_router(router)

    known = known_paths()

    def count_response(scope: Scope, status: int) -> None:
        route = scope["path"] if scope["path"] in known else "other"
        metrics.requests.labels(route, str(status)).inc()

    app.add_middleware(
        RequestContext,
        tenants=tenants,
        protect_metrics=settings.metrics_require_key,
        max_body_bytes=settings.max_body_bytes,
        json_logs=settings.log_format == "json",
        on_response=count_response,
        open_paths=OPEN_PATHS,
        metrics_path=METRICS_PATH,
        lenient=settings.lenient_fields,
    )
    if settings.cors_origins:  # outermost, so preflight requests need no API key
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    return app


_HOST_TIER_METRICS = (  # (name, help, PrefixCacheStats field, kind): the tiers' own figures
    (
        "tokenmill_prefix_cache_host_hit_tokens",
        "Of the prefix cache's hit tokens, those restored from its host-memory tier",
        "host_hit_tokens",
        "counter",
    ),
    (
        "tokenmill_prefix_cache_host_used_bytes",
        "Bytes of KV copies the host-memory tier holds now",
        "host_bytes",
        "gauge",
    ),
    (
        "tokenmill_prefix_cache_host_used_tokens",
        "Tokens the host-memory tier holds copies of now",
        "host_tokens",
        "gauge",
    ),
    ("tokenmill_prefix_cache_host_entries", "Prompts the host-memory tier holds now", "host_entries", "gauge"),
    (
        "tokenmill_prefix_cache_evictions",
        "Prompts the KV tier dropped for room (to the host-memory tier, where it is on)",
        "evictions",
        "counter",
    ),
    (
        "tokenmill_prefix_cache_host_evictions",
        "Copies the host-memory tier dropped for room",
        "host_evictions",
        "counter",
    ),
)


_DRAFT_METRICS = (  # (name, help, DraftStats field), as vLLM's spec_decode counters
    ("tokenmill_spec_decode_drafts", "Decode rows that carried guessed tokens (speculative decoding)", "drafts"),
    ("tokenmill_spec_decode_draft_tokens", "Tokens guessed by prompt lookup and checked", "draft_tokens"),
    ("tokenmill_spec_decode_accepted_tokens", "Guessed tokens the model agreed with (kept)", "accepted_tokens"),
)


def _metrics_for(runner: Runner, admission: Admission, lifecycle: Lifecycle) -> Metrics:
    metrics = Metrics()
    metrics.gauge("tokenmill_in_flight_requests", "Admitted requests not yet finished", lambda: admission.active)
    metrics.gauge(
        "tokenmill_capacity",
        "Requests admitted to run at once now (fewer while engines are down)",
        lambda: admission.capacity,
    )
    metrics.gauge("tokenmill_queue_depth", "Requests waiting for a place", lambda: admission.queued)
    metrics.gauge(
        "tokenmill_batch_running_sequences", "Sequences the model is working on", lambda: runner.stats().running
    )
    metrics.gauge(
        "tokenmill_kv_cache_used_tokens",
        "KV cache cells reserved by running sequences",
        lambda: runner.stats().kv_tokens_used,
    )
    metrics.gauge(
        "tokenmill_kv_cache_capacity_tokens", "KV cache cells in the budget", lambda: runner.stats().kv_tokens_capacity
    )
    metrics.counter(
        "tokenmill_prefix_cache_queries_tokens",
        "Prompt tokens looked up in the prefix cache",
        lambda: runner.stats().prefix_cache.queried_tokens,
    )
    metrics.counter(
        "tokenmill_prefix_cache_hit_tokens",
        "Prompt tokens served from the prefix cache (not computed)",
        lambda: runner.stats().prefix_cache.hit_tokens,
    )
    metrics.gauge(
        "tokenmill_prefix_cache_used_tokens",
        "KV cache cells the prefix cache holds now",
        lambda: runner.stats().prefix_cache.cached_tokens,
    )
    metrics.counter(
        "tokenmill_prefix_cache_answers_skipped",
        "Finished answers not cached, while too few cached answers were resent by a next turn",
        lambda: runner.stats().prefix_cache.answers_skipped,
    )
    for name, help_text, field, kind in _HOST_TIER_METRICS:
        read = lambda field=field: getattr(runner.stats().prefix_cache, field)
        (metrics.counter if kind == "counter" else metrics.gauge)(name, help_text, read)
    for name, help_text, field in _DRAFT_METRICS:
        read_drafts = lambda field=field: getattr(runner.stats().speculative, field)
        metrics.counter(name, help_text, read_drafts)
    metrics.gauge("tokenmill_draining", "1 while the server drains for shutdown", lambda: float(lifecycle.draining))
    metrics.gauge("tokenmill_engine_ready", "1 while the model engine can take requests", lambda: float(runner.ready))
    metrics.labelled_counter(
        "tokenmill_engine_restarts",
        "Engine (or worker process) restarts after a failure, by reason",
        "reason",
        runner.restarts,
    )
    return metrics
