"""In-process baselines for the llama.cpp engine: what the layers under HTTP cost.

The same workload as the HTTP bench (same prompts through the model's chat template, same
sampling, same closed loop) measured two ways, each in its own process by the caller:
- `batch` (or `async`): tokenmill's runner (scheduler + engine + events) driven without HTTP;
- `llama`: llama_cpp.Llama.create_completion, one request after another: the plain library.
This is the one bench module that loads a model itself; it exists to price the layers. The engine's
ceiling is llama.cpp's own llama-batched-bench (`--cpp-baselines`, bench/cpp.py): a Python loop
over the engine's step measured well below it, so it was no ceiling.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from tokenmill.bench.stats import RequestRecord
from tokenmill.bench.workload import Workload
from tokenmill.config import Settings
from tokenmill.engines.model_files import resolve_model_path
from tokenmill.generation import ChatMessage, Finished, GenerationRequest
from tokenmill.runners import build_runner
from tokenmill.sampling import SamplingParams


@dataclass(frozen=True)
class Measurement:
    name: str
    concurrency: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def to_generation_request(body: dict, index: int) -> GenerationRequest:
    params = SamplingParams(
        max_tokens=body["max_tokens"], temperature=body["temperature"], seed=body["seed"], ignore_eos=body["ignore_eos"]
    )
    messages = tuple(ChatMessage(m["role"], m["content"]) for m in body["messages"])
    return GenerationRequest(request_id=f"bench-{index}", params=params, messages=messages)


def runner_closed_loop(settings: Settings, workload: Workload, concurrency: int, requests: int) -> Measurement:
    async def one(runner, index: int, started_at: float) -> RequestRecord:
        record = RequestRecord(started=time.perf_counter() - started_at)
        handle = await runner.submit(to_generation_request(workload.request_body(index, "m"), index))
        async for event in handle:
            if isinstance(event, Finished):
                record.output_tokens, record.status = event.usage.completion_tokens, "ok"
        return record

    async def run() -> Measurement:
        runner = build_runner(settings)
        await runner.start()
        try:
            await asyncio.gather(*(one(runner, -1 - i, 0.0) for i in range(min(2, concurrency))))  # warm-up
            records: list[RequestRecord] = []
            next_index = 0
            started = time.perf_counter()

            async def client() -> None:
                nonlocal next_index
                while next_index < requests:
                    index, next_index = next_index, next_index + 1
                    records.append(await one(runner, index, started))

            await asyncio.gather(*(client() for _ in range(concurrency)))
            seconds = time.perf_counter() - started
            produced = sum(r.output_tokens for r in records if r.status == "ok")
            return Measurement(f"tokenmill {settings.mode} runner, in-process", concurrency, produced, seconds)
        finally:
            await runner.stop()

    return asyncio.run(run())


def llama_library_loop(settings: Settings, workload: Workload, requests: int) -> Measurement:
    """llama_cpp.Llama.create_completion on the same rendered prompts, one at a time."""
    import llama_cpp

    from tokenmill.engines.llamacpp import LlamaCppTokenizer, portable_llama

    with portable_llama():
        llm = llama_cpp.Llama(
            str(resolve_model_path(settings.model)),
            n_ctx=settings.context_window,
            n_threads=settings.threads_per_replica(),
            flash_attn=True,
            verbose=False,
        )
    tokenizer = LlamaCppTokenizer(llm.model, llama_cpp.llama_model_get_vocab(llm.model), settings.context_window)
    eog_bias = {t: -1e9 for t in tokenizer.eog_ids}  # ignore_eos, as in the workload

    def prompt(i: int) -> str:
        return tokenizer.render_chat(_messages(workload, i))

    llm.create_completion(prompt(-1), max_tokens=4)  # warm-up
    started = time.perf_counter()
    produced = 0
    for i in range(requests):
        body = workload.request_body(i, "m")
        out = llm.create_completion(
            prompt(i),
            max_tokens=workload.max_tokens,
            temperature=body["temperature"],
            seed=body["seed"],
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            logit_bias=eog_bias,
        )
        assert isinstance(out, dict)  # not streamed: one response
        produced += out["usage"]["completion_tokens"]
    seconds = time.perf_counter() - started
    llm.close()
    return Measurement("llama_cpp.Llama.create_completion loop", 1, produced, seconds)


def _messages(workload: Workload, i: int) -> tuple[ChatMessage, ...]:
    messages = to_generation_request(workload.request_body(i, "m"), i).messages
    assert messages is not None  # the workload sends chat requests
    return messages


def main(argv: list[str] | None = None) -> None:
    """`python -m tokenmill.bench.inprocess KIND CONCURRENCY REQUESTS MAX_TOKENS SETTINGS_JSON`: one
    measurement in a fresh process (engines left behind by another measurement would skew it),
    printed as one JSON line. SETTINGS_JSON is the served Settings, as the bench command parsed them."""
    import json
    import sys

    kind, concurrency_arg, requests_arg, max_tokens, settings_json = argv if argv is not None else sys.argv[1:]
    concurrency, requests = int(concurrency_arg), int(requests_arg)
    settings = Settings.model_validate_json(settings_json)
    workload = Workload(max_tokens=int(max_tokens))
    batch = settings.model_copy(update={"mode": "batch", "max_batch": max(settings.max_batch, concurrency)})
    measure = {
        "batch": lambda: runner_closed_loop(batch, workload, concurrency, requests),
        "async": lambda: runner_closed_loop(
            settings.model_copy(update={"mode": "async"}), workload, concurrency, requests
        ),
        "llama": lambda: llama_library_loop(settings, workload, requests),
    }[kind]
    result = measure()
    print(
        json.dumps(
            {
                "kind": kind,
                "name": result.name,
                "concurrency": result.concurrency,
                "tokens": result.tokens,
                "seconds": result.seconds,
                "tokens_per_s": result.tokens_per_second,
            }
        )
    )


if __name__ == "__main__":
    main()
