"""The simulated engine: deterministic text, UTF-8 splitting, and its cost model."""

from __future__ import annotations

import time

from tokenmill.engines.replica import generate
from tokenmill.engines.sequence import prepare_sequence
from tokenmill.engines.simulated import SimulatedEngine
from tokenmill.generation import Finished, GenerationRequest, TextDelta
from tokenmill.sampling import SamplingParams


def run(engine: SimulatedEngine, prompt: str = "hello world", **params):
    request = GenerationRequest(request_id="r", params=SamplingParams(**params), prompt=prompt)
    seq = prepare_sequence(request, engine.tokenizer)
    events = list(generate(engine, seq, lambda: False))
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def fast(**kwargs) -> SimulatedEngine:
    return SimulatedEngine(ttft_ms=0, itl_ms=0, **kwargs)


def test_greedy_depends_only_on_prompt():
    engine = fast()
    assert run(engine, temperature=0)[0] == run(engine, temperature=0)[0]
    assert run(engine, "other prompt", temperature=0)[0] != run(engine, temperature=0)[0]


def test_seed_makes_sampling_repeatable():
    engine = fast()
    assert run(engine, seed=9, max_tokens=30)[0] == run(engine, seed=9, max_tokens=30)[0]
    assert run(engine, seed=9, max_tokens=30)[0] != run(engine, seed=10, max_tokens=30)[0]


def test_replies_end_naturally_unless_eos_is_ignored():
    engine = fast(mean_reply_tokens=8)
    _, finished = run(engine, temperature=0)
    assert finished.reason == "stop"
    _, finished = run(engine, temperature=0, ignore_eos=True, max_tokens=200)
    assert finished == Finished("length", finished.usage) and finished.usage.completion_tokens == 200


def test_min_tokens_postpones_the_end():
    engine = fast(mean_reply_tokens=4)
    _, finished = run(engine, temperature=0, min_tokens=50, max_tokens=400)
    assert finished.usage.completion_tokens > 50


def test_split_multibyte_tokens_decode_cleanly():
    engine = fast()
    text, _ = run(engine, seed=1, ignore_eos=True, max_tokens=400)
    assert "\ufffd" not in text
    assert any(word in text for word in ("café", "naïve", "東京", "Ünïcode", "🚀"))


def test_ttft_and_itl_follow_configuration():
    engine = SimulatedEngine(ttft_ms=40, itl_ms=10)
    request = GenerationRequest(request_id="r", params=SamplingParams(max_tokens=6, ignore_eos=True), prompt="x")
    seq = prepare_sequence(request, engine.tokenizer)
    started = time.perf_counter()
    stamps = [time.perf_counter() - started for _ in generate(engine, seq, lambda: False)]
    assert stamps[0] >= 0.040
    assert stamps[-1] >= 0.040 + 5 * 0.010


def test_batch_cost_grows_step_time_with_batch_size():
    from tokenmill.engines.base import Chunk

    engine = SimulatedEngine(ttft_ms=0, itl_ms=10, batch_cost=1.0)
    seqs = []
    for i in range(4):
        request = GenerationRequest(request_id=str(i), params=SamplingParams(), prompt="x")
        seq = prepare_sequence(request, engine.tokenizer)
        seq.num_computed = seq.num_prompt_tokens  # pretend prefilled: decode rows only
        seq.token_ids.append(0)
        engine.add_sequence(seq)
        seqs.append(seq)
    started = time.perf_counter()
    engine.step([Chunk(s, 1) for s in seqs])
    assert time.perf_counter() - started >= 0.010 * (1 + 1.0 * 3)


def test_hold_mode_spins_in_python_and_release_mode_sleeps(monkeypatch):
    """The mechanism, checked deterministically: 'release' waits in time.sleep (which frees the
    GIL), 'hold' never sleeps and spins for the whole step instead. What that does to a server
    (loop lag, throughput per mode) is measured by the bench in docs/serving-patterns.md, not
    asserted here: timing ratios on a shared 2-core machine are too noisy for a unit test."""
    from tokenmill.engines import simulated

    real_sleep = time.sleep
    sleeps: list[float] = []
    monkeypatch.setattr(simulated.time, "sleep", lambda s: (sleeps.append(s), real_sleep(s)))

    started = time.perf_counter()
    run(SimulatedEngine(ttft_ms=30, itl_ms=0, gil="hold"), max_tokens=1, ignore_eos=True)
    assert sleeps == [] and time.perf_counter() - started >= 0.03

    run(SimulatedEngine(ttft_ms=30, itl_ms=0, gil="release"), max_tokens=1, ignore_eos=True)
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 0.03
