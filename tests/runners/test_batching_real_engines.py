"""`batch` mode on the real default model, on each engine: batched greedy text equals unbatched."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.config import Settings
from tokenmill.generation import GenerationRequest, TextDelta
from tokenmill.runners import build_runner
from tokenmill.sampling import SamplingParams


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


PROMPTS = ["Once upon a time", "def fibonacci(n):", "La capitale de la France est", "The three laws of robotics are"]


async def greedy_texts(
    engine: str,
    mode: str,
    prompts: list[str],
    stagger: float = 0.0,
    max_tokens: int = 32,
    observed: list | None = None,
    **settings,
) -> list[str]:
    """`observed`: gets the runner's stats once every answer is in."""
    settings = Settings(
        engine=engine, mode=mode, max_batch=8, kv_tokens=2048, context_window=1024, threads=2, **settings
    )
    runner = build_runner(settings)
    await runner.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        handles = []
        for i, prompt in enumerate(prompts):
            handles.append(await runner.submit(GenerationRequest(str(i), params, prompt=prompt)))
            await asyncio.sleep(stagger)  # later prompts join a batch already decoding

        async def text(handle) -> str:
            return "".join([e.text async for e in handle if isinstance(e, TextDelta)])

        texts = list(await asyncio.gather(*(text(h) for h in handles)))
        if observed is not None:
            observed.append(runner.stats())
        return texts
    finally:
        await runner.stop()


async def test_llamacpp_batched_greedy_equals_one_at_a_time():
    # llama.cpp does not promise bit-identical logits across batch compositions (matrix kernels block
    # differently by row count); on this model and CPU they are identical for these prompts of
    # ragged lengths arriving together, which this test pins down. (Prompts joining mid-decode
    # change llama.cpp's numerics: its third prompt drifts after ~20 tokens.) If a kernel upgrade
    # breaks this, record the divergence in docs/benchmarks.md.
    alone = await greedy_texts("llamacpp", "async", PROMPTS)  # one replica: one request at a time
    together = await greedy_texts("llamacpp", "batch", PROMPTS)
    assert together == alone


@pytest.mark.skipif(not _has_torch(), reason="needs tokenmill[torch]")
async def test_torch_batched_decode_with_ragged_joins_matches_alone():
    """Prompts of different lengths join a batch that is already decoding (prefill chunks mixed
    into decode steps). In float32 every sequence gets exactly its solo greedy tokens on any x86
    CPU (the 4-bit kernel of small steps multiplies by the same values as the dense weights).
    bfloat16 rounds differently with the rows in a step and with the CPU (AVX-512 or AMX): its
    ragged joins are held to the fp32 model by the near-tie rule in tests/engines/test_torch.py."""
    alone = await greedy_texts("torch", "async", PROMPTS, torch_dtype="float32", max_tokens=16)
    together = await greedy_texts("torch", "batch", PROMPTS, stagger=0.1, torch_dtype="float32", max_tokens=16)
    assert together == alone


QUOTING_PROMPTS = [
    "Days: Monday, Tuesday, Wednesday, Thursday, Friday.\nDays again: Monday,",
    "red green blue red green blue red green",
]


@pytest.mark.parametrize("mode", ["batch", "async"])
async def test_speculative_decoding_in_the_serving_patterns_leaves_the_text_unchanged(mode):
    """--speculative-tokens through build_runner: the scheduler (batch) or replica.generate (async)
    drafts, the llama.cpp engine verifies; two sequences at once in batch mode."""
    plain = await greedy_texts("llamacpp", mode, QUOTING_PROMPTS, max_tokens=40)
    observed: list = []
    drafted = await greedy_texts(
        "llamacpp", mode, QUOTING_PROMPTS, max_tokens=40, observed=observed, speculative_tokens=8
    )
    assert drafted == plain
    drafts = observed[0].speculative  # what /metrics exports as tokenmill_spec_decode_*
    assert drafts.drafts > 0 and 0 < drafts.accepted_tokens <= drafts.draft_tokens


async def test_requests_of_one_new_app_arriving_together_compute_its_system_prompt_once():
    """Cache-aware admission, end to end: four requests with one new ~1,100-token system prompt
    (three steps of prefill) reach the batch at once. The first prefills it; the others wait for
    that prefill and find it cached (without the wait, they would be admitted during it and
    compute it side by side, and none would hit)."""
    from tokenmill.generation import ChatMessage, Finished

    system = ChatMessage("system", "You answer questions about the harbour. " + "Rules: be brief and exact. " * 170)
    settings = Settings(engine="llamacpp", mode="batch", max_batch=8, kv_tokens=4096, context_window=2048, threads=2)
    runner = build_runner(settings)
    await runner.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=4)
        handles = [
            await runner.submit(
                GenerationRequest(str(i), params, messages=(system, ChatMessage("user", f"Question {i}?")))
            )
            for i in range(4)
        ]

        async def usage(handle):
            finished = [e async for e in handle if isinstance(e, Finished)]
            return finished[-1].usage

        usages = await asyncio.gather(*(usage(h) for h in handles))
    finally:
        await runner.stop()
    prompt = usages[0].prompt_tokens
    assert prompt > 2 * settings.max_step_tokens
    assert usages[0].cached_tokens < 20  # (at most the chat template's opening, from the warm-up)
    assert all(u.cached_tokens > prompt - 20 for u in usages[1:]), [u.cached_tokens for u in usages]
