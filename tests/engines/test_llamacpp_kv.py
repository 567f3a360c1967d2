"""The llama.cpp engine's KV layouts (engines/llamacpp_kv.py): slots, the row order of a step, and
a KV stream per sequence (`--kv-streams`) answering as the shared cache does."""

from __future__ import annotations

import pytest

from tests.engines.near_ties import NEAR_TIE_LOGITS
from tests.engines.test_engine_contract import PROMPTS
from tokenmill.config import Settings
from tokenmill.cpus import available_cpus
from tokenmill.engines.base import Chunk
from tokenmill.engines.llamacpp import LlamaCppEngine
from tokenmill.engines.llamacpp_kv import Slots
from tokenmill.engines.model_files import default_model_path
from tokenmill.engines.sequence import Sequence, prepare_sequence
from tokenmill.generation import GenerationRequest, TextDelta, TokenLogprob
from tokenmill.sampling import SamplingParams


def test_slots_go_lowest_free_first_and_come_back():
    slots = Slots(4)
    assert [slots.take(seq_id) for seq_id in (10, 11, 12)] == [0, 1, 2]
    assert slots.give_back(11) == 1
    assert slots.take(13) == 1  # the gap is filled before slot 3 is opened
    assert slots.take(14) == 3 and slots.take(15) is None
    assert slots.give_back(99) is None and slots.get(99) is None


def _engine(kv_streams: bool, max_sequences: int = 4, prefix_cache: bool = False) -> LlamaCppEngine:
    return LlamaCppEngine(
        default_model_path(),
        context_window=512,
        max_sequences=max_sequences,
        kv_tokens=2048,
        threads=available_cpus(),
        max_step_tokens=256,
        prefix_cache=prefix_cache,
        kv_streams=kv_streams,
    )


def _sequence(engine: LlamaCppEngine, prompt: str, max_tokens: int, logprobs: int | None = None) -> Sequence:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    return prepare_sequence(GenerationRequest(prompt, params, prompt=prompt), engine.tokenizer)


def _run_together(engine: LlamaCppEngine, prompts: list[str], max_tokens: int, logprobs: int | None = None):
    """Greedy, all prompts prefilled in one step then decoded together, the chunks handed to the
    engine in the reverse of their slot order; each sequence's tokens (with logprobs when asked),
    and the sequence ids of every step's batch."""
    seqs = [_sequence(engine, prompt, max_tokens, logprobs) for prompt in prompts]
    entries: dict[int, list[TokenLogprob]] = {seq.seq_id: [] for seq in seqs}
    for seq in seqs:
        engine.add_sequence(seq)
    batches = []
    try:
        while not all(seq.is_finished for seq in seqs):
            live = [seq for seq in reversed(seqs) if not seq.is_finished]
            chunks = [Chunk(seq, seq.num_pending) for seq in live]
            tokens = engine.step(chunks)
            batch = engine._batch
            batches.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
            for chunk, sampled in zip(chunks, tokens, strict=True):
                chunk.seq.num_computed += chunk.num_tokens
                for token in sampled:
                    for event in chunk.seq.append_token(token):
                        if isinstance(event, TextDelta):
                            entries[chunk.seq.seq_id] += event.logprobs
    finally:
        for seq in seqs:
            engine.remove_sequence(seq)
    return [entries[seq.seq_id] for seq in seqs], batches


@pytest.mark.parametrize("kv_streams", [False, True], ids=["shared", "streams"])
def test_a_step_feeds_its_rows_in_slot_order(kv_streams):
    """With a stream per sequence llama.cpp cuts a batch into a pass over the weights per run of
    consecutive sequence ids in batch order: rows handed over as 2,1,0 would cost three passes."""
    engine = _engine(kv_streams)
    try:
        _, batches = _run_together(engine, PROMPTS, max_tokens=4)
    finally:
        engine.close()
    for ids in batches:
        assert ids == sorted(ids)
    assert batches[-1] == [0, 1, 2]  # the decode steps: one row a sequence, slots from 0


def test_both_layouts_answer_a_batch_as_each_prompt_alone():
    """Greedy, three prompts in one batch (handed over against their slot order), in both layouts,
    against each prompt run alone. Token for token the same up to a near tie: llama.cpp blocks
    its matrix kernels differently by rows in a step, and cuts a stream layout's steps otherwise.
    A row given another row's logits, a row reading another sequence's stream, or a cell at the
    wrong position costs whole logits."""
    shared, streams = _engine(kv_streams=False), _engine(kv_streams=True)
    try:
        alone = [_run_together(shared, [prompt], max_tokens=24, logprobs=5)[0][0] for prompt in PROMPTS]
        batched = {engine: _run_together(engine, PROMPTS, max_tokens=24, logprobs=5)[0] for engine in (shared, streams)}
    finally:
        shared.close()
        streams.close()
    for got in batched.values():
        for prompt, mine, theirs in zip(PROMPTS, got, alone, strict=True):
            assert len(mine) == len(theirs) == 24
            for position, (token, reference) in enumerate(zip(mine, theirs, strict=True)):
                if token.token != reference.token:
                    alternatives = {alt.token: alt.logprob for alt in reference.top}
                    assert token.token in alternatives, (prompt, position, token.token, alternatives)
                    assert reference.logprob - alternatives[token.token] < NEAR_TIE_LOGITS, (prompt, position)
                    break
                assert abs(token.logprob - reference.logprob) < NEAR_TIE_LOGITS, (prompt, position)


def test_kv_streams_give_every_sequence_a_window_and_are_the_llama_cpp_engines_alone():
    settings = Settings(engine="llamacpp", mode="batch", kv_streams=True, max_batch=8, context_window=1024)
    assert settings.kv_budget() == 8 * 1024  # admission never holds back a request that fits its window
    assert Settings(engine="llamacpp", mode="batch", kv_tokens=4096).kv_budget() == 4096
    with pytest.raises(ValueError, match="kv-streams"):
        Settings(engine="simulated", mode="batch", kv_streams=True)


def test_a_cached_prompt_that_cannot_be_written_back_is_computed_and_not_counted(monkeypatch):
    """With a stream per sequence a cached prompt is a host copy written back into the slot; if
    llama.cpp refuses it, the prompt is computed from its start, answers the same, counts no hit,
    and its entry is dropped (nothing would ever restore from it)."""
    import llama_cpp

    engine = _engine(kv_streams=True, prefix_cache=True)
    first, _ = _run_together(engine, [PROMPTS[0]], 6, logprobs=1)
    hits = engine.prefix_cache_stats().hit_tokens
    monkeypatch.setattr(llama_cpp, "llama_state_seq_set_data_ext", lambda *args: 0)
    seq = _sequence(engine, PROMPTS[0], 6)
    engine.add_sequence(seq)
    assert seq.num_computed == 0 and engine.prefix_cache_stats().hit_tokens == hits
    engine.remove_sequence(seq)
    again, _ = _run_together(engine, [PROMPTS[0]], 6, logprobs=1)
    assert len(first[0]) == 6 and again == first and engine.prefix_cache_stats().hit_tokens == hits
