"""The default model gives the same greedy text in every serving pattern."""

from __future__ import annotations

from tokenmill.config import Settings
from tokenmill.generation import GenerationRequest, TextDelta
from tokenmill.runners import build_runner
from tokenmill.sampling import SamplingParams

PROMPT = "The three primary colours are"


async def greedy_text(mode: str) -> str:
    runner = build_runner(Settings(mode=mode, replicas=1, max_batch=4, kv_tokens=2048, context_window=1024, threads=2))
    await runner.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        handle = await runner.submit(GenerationRequest("t", params, prompt=PROMPT))
        return "".join([e.text async for e in handle if isinstance(e, TextDelta)])
    finally:
        await runner.stop()


async def test_every_mode_serves_the_same_greedy_text():
    texts = {mode: await greedy_text(mode) for mode in ("sync", "async", "process", "batch")}
    assert len(set(texts.values())) == 1, texts
    assert len(texts["async"].split()) >= 10
