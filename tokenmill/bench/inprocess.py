"""In-process throughput baselines for the llama.cpp engine (no HTTP).

Three ways to produce the same tokens from the same prompts, measured back to back:
- `bare`: a minimal llama_decode loop over all sequences at once: the kernel ceiling.
- `scheduler`: tokenmill's BatchingRunner driven directly (scheduler + engine thread + events).
- `llama`: llama_cpp.Llama.create_completion, one request after another (the plain library).
This module is the one bench piece that loads a model itself; it exists to price the layers.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from dataclasses import dataclass

import llama_cpp

from tokenmill.config import Settings
from tokenmill.engines.model_files import resolve_model_path
from tokenmill.generation import Finished, GenerationRequest
from tokenmill.runners import build_runner
from tokenmill.sampling import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass(frozen=True)
class Measurement:
    name: str
    sequences: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def bare_decode_loop(model_path: str, sequences: int, max_tokens: int, threads: int) -> Measurement:
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 8192, 512, 512
    params.n_seq_max, params.kv_unified, params.no_perf = sequences, True, True
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    prompt = (llama_cpp.llama_token * 256)()
    n_prompt = llama_cpp.llama_tokenize(vocab, PROMPT.encode(), len(PROMPT.encode()), prompt, 256, True, True)
    sampler = llama_cpp.llama_sampler_init_greedy()
    batch = llama_cpp.llama_batch_init(max(512, sequences * n_prompt), 0, 1)

    def fill(rows: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(rows)

    started = time.perf_counter()
    rows = [(prompt[j], j, s, j == n_prompt - 1) for s in range(sequences) for j in range(n_prompt)]
    last = []
    for start in range(0, len(rows), 512):  # prefill in n_batch slices
        part = rows[start : start + 512]
        fill(part)
        llama_cpp.llama_decode(ctx, batch)
        last.extend(start + i for i, r in enumerate(part) if r[3])
    # the prefill's sampling rows index into the last decode only when it held them; resample simply
    tokens = [llama_cpp.llama_sampler_sample(sampler, ctx, -1) for _ in range(sequences)]
    for step in range(1, max_tokens):
        fill([(tokens[s], n_prompt + step - 1, s, True) for s in range(sequences)])
        llama_cpp.llama_decode(ctx, batch)
        tokens = [llama_cpp.llama_sampler_sample(sampler, ctx, s) for s in range(sequences)]
    elapsed = time.perf_counter() - started
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return Measurement("bare llama_decode loop", sequences, sequences * max_tokens, elapsed)


def scheduler_in_process(settings: Settings, sequences: int, max_tokens: int) -> Measurement:
    async def run() -> Measurement:
        runner = build_runner(settings)
        await runner.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            started = time.perf_counter()
            handles = [await runner.submit(GenerationRequest(str(i), params, prompt=PROMPT)) for i in range(sequences)]

            async def finish(handle) -> int:
                return next(e.usage.completion_tokens for e in [x async for x in handle] if isinstance(e, Finished))

            produced = sum(await asyncio.gather(*(finish(h) for h in handles)))
            return Measurement(f"tokenmill {settings.mode} runner", sequences, produced, time.perf_counter() - started)
        finally:
            await runner.stop()

    return asyncio.run(run())


def llama_create_completion(model_path: str, requests: int, max_tokens: int, threads: int) -> Measurement:
    llm = llama_cpp.Llama(model_path, n_ctx=2048, n_threads=threads, flash_attn=True, verbose=False)
    llm.create_completion(PROMPT, max_tokens=4)  # warm-up
    started = time.perf_counter()
    produced = 0
    for _ in range(requests):
        out = llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0, logit_bias={2: -1e9, 0: -1e9})
        produced += out["usage"]["completion_tokens"]
    elapsed = time.perf_counter() - started
    llm.close()
    return Measurement("llama_cpp.Llama.create_completion", 1, produced, elapsed)


def run_all(sequences: int, max_tokens: int, threads: int, model: str | None = None) -> list[Measurement]:
    path = str(resolve_model_path(model))
    batch = Settings(mode="batch", model=model, max_batch=max(sequences, 1), kv_tokens=8192, threads=threads)
    single = Settings(mode="batch", model=model, max_batch=1, kv_tokens=2048, threads=threads)
    return [
        bare_decode_loop(path, sequences, max_tokens, threads),
        scheduler_in_process(batch, sequences, max_tokens),
        llama_create_completion(path, 3, max_tokens, threads),
        scheduler_in_process(single, 3, max_tokens),
    ]


def _ctypes_keepalive() -> None:  # referenced so linters keep the ctypes import used for buffers
    ctypes.sizeof(llama_cpp.llama_token)
