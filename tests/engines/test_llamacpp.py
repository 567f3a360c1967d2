"""The llama.cpp engine on the default model: agreement with llama_cpp.Llama, sampling, KV hygiene."""

from __future__ import annotations

import llama_cpp
import pytest

from tests.engines.test_engine_contract import PROMPTS, complete
from tokenmill.cpus import available_cpus
from tokenmill.engines.llamacpp import LlamaCppEngine, portable_llama
from tokenmill.engines.model_files import default_model_path
from tokenmill.engines.replica import generate
from tokenmill.engines.sequence import prepare_sequence
from tokenmill.generation import ChatMessage, GenerationRequest
from tokenmill.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine():
    engine = LlamaCppEngine(default_model_path(), context_window=2048, threads=available_cpus())
    yield engine
    engine.close()


def _reference(**options) -> llama_cpp.Llama:
    """llama-cpp-python's own Llama on the default model, as the engine is set up: the same
    threads and attention kernel, its weights in plain CPU buffers (see the greedy test)."""
    with portable_llama():
        return llama_cpp.Llama(
            str(default_model_path()), n_ctx=2048, n_threads=available_cpus(), flash_attn=True, verbose=False, **options
        )


def test_greedy_output_equals_llama_cpp_llama(engine):
    # Llama() defaults flash attention off; this llama.cpp enables it on CPU ('auto'), and the
    # two kernels round differently, so the reference is built with the same attention kernel.
    # Its weights sit in plain CPU buffers, as the engine's do (the AMX buffers crash some Xeons).
    reference = _reference()
    try:
        for prompt in PROMPTS:
            expected = reference.create_completion(prompt, max_tokens=32, temperature=0)["choices"][0]["text"]
            assert complete(engine, prompt, temperature=0, max_tokens=32)[0] == expected
    finally:
        reference.close()


def test_removing_a_sequence_frees_its_kv_cells(engine):
    request = GenerationRequest(request_id="t", params=SamplingParams(temperature=0, max_tokens=50), prompt=PROMPTS[0])
    seq = prepare_sequence(request, engine.tokenizer)
    events = generate(engine, seq, lambda: False)
    next(events)  # prefilled and one token out
    memory = llama_cpp.llama_get_memory(engine._ctx)
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) >= seq.num_prompt_tokens - 1
    events.close()  # the consumer leaves early (abort)
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == -1


def test_prefix_cache_reuses_a_shared_prompt_start_without_changing_output(engine):
    system = ChatMessage("system", "You are a helpful assistant who answers in one short paragraph.")
    first = (system, ChatMessage("user", "Why is the sky blue?"))
    second = (system, ChatMessage("user", "What makes the sea salty?"))
    complete(engine, messages=first, temperature=0, max_tokens=8)
    before = engine.prefix_cache_stats().hit_tokens
    cached_text, _ = complete(engine, messages=second, temperature=0, max_tokens=24)
    reused = engine.prefix_cache_stats().hit_tokens - before
    shared_prefix = engine.tokenizer.encode(engine.tokenizer.render_chat((system,)))
    assert reused >= len(shared_prefix) - 1  # at least the template and system turn were not recomputed
    fresh_engine = LlamaCppEngine(
        default_model_path(), context_window=2048, threads=available_cpus(), prefix_cache=False
    )
    try:
        fresh_text, _ = complete(fresh_engine, messages=second, temperature=0, max_tokens=24)
        assert fresh_engine.prefix_cache_stats().hit_tokens == 0
    finally:
        fresh_engine.close()
    assert cached_text == fresh_text


def test_prefix_cache_on_an_identical_prompt_recomputes_only_its_last_token(engine):
    complete(engine, PROMPTS[1], temperature=0, max_tokens=4)
    before = engine.prefix_cache_stats().hit_tokens
    again, _ = complete(engine, PROMPTS[1], temperature=0, max_tokens=16)
    prompt_length = len(engine.tokenizer.encode(PROMPTS[1]))
    assert engine.prefix_cache_stats().hit_tokens - before == prompt_length - 1
    assert again == complete(engine, PROMPTS[1], temperature=0, max_tokens=16)[0]


def test_the_prefix_cache_holds_many_conversations_at_once(engine):
    # Before: one cached prompt, trimmed to each newcomer: two alternating conversations evicted
    # each other and neither was ever reused.
    a = (ChatMessage("user", "Tell me about lighthouses and how their lenses work."),)
    b = (ChatMessage("user", "Give me three tips for writing clear emails at work."),)
    for messages in (a, b):
        complete(engine, messages=messages, temperature=0, max_tokens=4)
    for messages in (a, b):
        before = engine.prefix_cache_stats().hit_tokens
        complete(engine, messages=messages, temperature=0, max_tokens=4)
        prompt = engine.tokenizer.encode(engine.tokenizer.render_chat(messages))
        assert engine.prefix_cache_stats().hit_tokens - before == len(prompt) - 1


def test_weights_stay_out_of_the_extra_buffers_unless_asked(engine, caplog):
    # llama.cpp's AMX weight buffer segfaults at the first decode on some Xeons: the engine, its
    # tokenizer and every reference load with use_extra_bufts off; only the setting turns it on.
    assert engine.model_params.use_extra_bufts is False
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # the library's own default
    with portable_llama():
        reference = llama_cpp.Llama(str(default_model_path()), n_ctx=64, n_threads=1, verbose=False)
    try:
        assert reference.model_params.use_extra_bufts is False
    finally:
        reference.close()
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # restored afterwards
    opted_in = LlamaCppEngine(default_model_path(), context_window=256, threads=1, extra_buffers=True)
    try:
        assert opted_in.model_params.use_extra_bufts is True
    finally:
        opted_in.close()


def test_build_engine_passes_the_setting_and_warms_up(monkeypatch):
    from tokenmill.config import Settings
    from tokenmill.engines import build_engine, engine_spec

    steps = []
    original_step = LlamaCppEngine.step
    monkeypatch.setattr(
        LlamaCppEngine, "step", lambda self, chunks: steps.append(len(chunks)) or original_step(self, chunks)
    )
    built = build_engine(engine_spec(Settings(mode="async", context_window=256, threads=1)))
    try:
        assert built.model_params.use_extra_bufts is False
        assert len(steps) == 2  # the warm-up: one prefill, one decode, before anyone is served
    finally:
        built.close()
    opted = engine_spec(Settings(context_window=256, threads=1, llama_extra_buffers=True))
    assert opted.llama_extra_buffers is True


def test_logprobs_equal_llama_cpp_llamas():
    """On an engine whose KV cache holds nothing else: llama.cpp's attention is not bit-for-bit the
    same when other cells are in use (other sequences, or cached prompts once they pass 256 cells
    here), and this test compares to four decimals."""
    from tests.engines.test_engine_contract import _logprobs_of

    engine = LlamaCppEngine(default_model_path(), context_window=2048, threads=available_cpus(), prefix_cache=False)
    reference = _reference(logits_all=True)
    try:
        for prompt in PROMPTS:
            expected = reference.create_completion(prompt, max_tokens=12, temperature=0, logprobs=5)["choices"][0]
            _seq, entries = _logprobs_of(engine, prompt, temperature=0, max_tokens=12, logprobs=5)
            want = expected["logprobs"]["token_logprobs"]
            got = [entry.logprob for entry in entries][: len(want)]
            assert got == pytest.approx(want, abs=2e-3)
            for entry, alternatives in zip(entries, expected["logprobs"]["top_logprobs"], strict=False):
                assert sorted(alternatives.values(), reverse=True) == pytest.approx(
                    [t.logprob for t in entry.top], abs=2e-3
                )
    finally:
        reference.close()
        engine.close()


@pytest.mark.parametrize("step_tokens", [512, 7])
def test_prompt_logprobs_equal_llama_cpp_llamas_logits(step_tokens):
    """The reference is llama_cpp.Llama(logits_all=True)'s logits after evaluating the prompt: the
    row at position p scores token p + 1. (Its own create_completion(echo=True) scores each token
    with the logits after that token, one place late: at " fox" after "The quick brown" it
    reports -7.0 where these logits give -1.5.) In chunks of 7 the prompt spans several steps."""
    from tests.engines.test_engine_contract import _scored

    engine = LlamaCppEngine(
        default_model_path(),
        context_window=2048,
        threads=available_cpus(),
        prefix_cache=False,
        max_step_tokens=step_tokens,
    )
    reference = _reference(logits_all=True)
    try:
        seq, prompt, _ = _scored(engine, max_tokens=0, prompt_logprobs=3)
        tokens = seq.token_ids[: seq.num_prompt_tokens]
        reference.eval(tokens)
        expected = llama_cpp.Llama.logits_to_logprobs(reference.scores[: len(tokens)])
        for position, entry in enumerate(prompt.scored):
            row = expected[position]
            assert entry.logprob == pytest.approx(float(row[tokens[position + 1]]), abs=2e-3)
            assert [t.logprob for t in entry.top] == pytest.approx(sorted(row.tolist(), reverse=True)[:3], abs=2e-3)
            assert entry.rank is not None and abs(entry.rank - 1 - int((row > row[tokens[position + 1]]).sum())) <= 1
    finally:
        reference.close()
        engine.close()
