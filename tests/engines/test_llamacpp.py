"""The llama.cpp engine on the default model: agreement with llama_cpp.Llama, sampling, KV hygiene."""

from __future__ import annotations

import llama_cpp
import pytest

from tokenmill.engines.llamacpp import LlamaCppEngine
from tokenmill.engines.model_files import default_model_path
from tokenmill.engines.replica import generate
from tokenmill.engines.sequence import prepare_sequence
from tokenmill.generation import ChatMessage, GenerationRequest
from tokenmill.sampling import SamplingParams
from tests.engines.test_engine_contract import PROMPTS, complete

@pytest.fixture(scope="module")
def engine():
    engine = LlamaCppEngine(default_model_path(), context_window=2048, threads=2)
    yield engine
    engine.close()


def test_greedy_output_equals_llama_cpp_llama(engine):
    # Llama() defaults flash attention off; this llama.cpp enables it on CPU ('auto'), and the
    # two kernels round differently, so the reference is built with the same attention kernel.
    reference = llama_cpp.Llama(str(default_model_path()), n_ctx=2048, n_threads=2, flash_attn=True, verbose=False)
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
    before = engine.prompt_tokens_reused
    cached_text, _ = complete(engine, messages=second, temperature=0, max_tokens=24)
    reused = engine.prompt_tokens_reused - before
    shared_prefix = engine.tokenizer.encode(engine.tokenizer.render_chat((system,)))
    assert reused >= len(shared_prefix) - 1  # at least the template and system turn were not recomputed
    fresh_engine = LlamaCppEngine(default_model_path(), context_window=2048, threads=2, prefix_cache=False)
    try:
        fresh_text, _ = complete(fresh_engine, messages=second, temperature=0, max_tokens=24)
        assert fresh_engine.prompt_tokens_reused == 0
    finally:
        fresh_engine.close()
    assert cached_text == fresh_text


def test_prefix_cache_on_an_identical_prompt_recomputes_only_its_last_token(engine):
    complete(engine, PROMPTS[1], temperature=0, max_tokens=4)
    before = engine.prompt_tokens_reused
    again, _ = complete(engine, PROMPTS[1], temperature=0, max_tokens=16)
    prompt_length = len(engine.tokenizer.encode(PROMPTS[1]))
    assert engine.prompt_tokens_reused - before == prompt_length - 1
    assert again == complete(engine, PROMPTS[1], temperature=0, max_tokens=16)[0]
