"""Speculative decoding on the real engines: drafts change the speed, never the output.

Each engine answers prompts that quote themselves (where guesses are kept) and one that does not,
with and without drafts; greedy answers must be token for token the same, and so must seeded
samples (the sequence's generator is advanced once per token kept). The KV cells of guesses not
kept must be gone after every step.

Seeded samples are compared where a pass's rows are the same arithmetic however many there are:
llama.cpp, and torch in fp32. In bf16, torch's kernels round a row differently with the rows
beside it (as they do with the batch's size), which moves a sampled token where the draw falls
next to a boundary; its greedy answers are held identical (drafts stay on the few-rows kernel).
"""

from __future__ import annotations

import pytest

from tests.engines.test_engine_contract import BUILD
from tokenmill.engines.base import Chunk
from tokenmill.engines.replica import generate, speculator_for
from tokenmill.engines.sequence import Sequence, prepare_sequence
from tokenmill.engines.speculative import SpeculativeConfig, Speculator
from tokenmill.generation import ChatMessage, GenerationRequest, TextDelta
from tokenmill.sampling import SamplingParams

PASSAGE = (
    "The lighthouse at the end of the harbour was built in 1874 from granite quarried on the island. "
    "Its lamp burned whale oil until 1911, then paraffin, and since 1962 it has been electric. "
    "The keeper's cottage beside it is now a small museum that opens every summer."
)
QUOTING = (ChatMessage("user", f"Repeat this text word for word:\n\n{PASSAGE}"),)
LISTING = "Days: Monday, Tuesday, Wednesday, Thursday, Friday.\nDays again: Monday,"
FREE = (ChatMessage("user", "Write a short poem about autumn."),)


ENGINES = {
    "llamacpp": BUILD["llamacpp"],
    "torch": BUILD["torch"],
    "torch-fp32": lambda: BUILD["torch"](dtype="float32"),
}


@pytest.fixture(scope="module", params=["llamacpp", "torch"])
def engine(request):
    engine = ENGINES[request.param]()
    yield engine
    engine.close()


@pytest.fixture(scope="module", params=["llamacpp", "torch-fp32"])
def exact_engine(request):
    """An engine whose rows do not depend on the rows beside them (see the module's docstring)."""
    engine = ENGINES[request.param]()
    yield engine
    engine.close()


def _answer(engine, draft: int, messages=None, prompt=None, **params) -> tuple[list[int], Speculator | None]:
    request = GenerationRequest("t", SamplingParams(**params), messages=messages, prompt=prompt)
    seq = prepare_sequence(request, engine.tokenizer)
    config = SpeculativeConfig(max_draft=draft, max_batch=4) if draft else None
    speculator = Speculator(config, engine.draft_costs) if config else None
    tokens = _run(engine, seq, speculator)
    return tokens, speculator


def _run(engine, seq: Sequence, speculator: Speculator | None) -> list[int]:
    """replica.generate's loop, checking the engine's KV cells before every step."""
    for _ in generate(_Checked(engine), seq, lambda: False, speculator):
        pass
    return seq.token_ids[seq.num_prompt_tokens :]


class _Checked:
    """The engine, asserting before each step that it holds no cell past what the last one kept."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def step(self, chunks: list[Chunk]) -> list[list[int]]:
        for chunk in chunks:
            _assert_no_cells_past(self._engine, chunk.seq)
        return self._engine.step(chunks)


def _assert_no_cells_past(engine, seq: Sequence) -> None:
    """The engine holds KV for exactly the tokens computed (llama.cpp: its sequence's last
    position; torch overwrites cells past a sequence's length, and reads none of them)."""
    import llama_cpp

    memory = getattr(engine, "_memory", None)
    if memory is None or seq.is_finished:
        return
    slot = engine._slots[seq.seq_id]
    assert llama_cpp.llama_memory_seq_pos_max(memory, slot) == seq.num_computed - 1


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"messages": QUOTING, "max_tokens": 72}, id="quoting"),
        pytest.param({"prompt": LISTING, "max_tokens": 40, "ignore_eos": True}, id="listing"),
        pytest.param({"messages": FREE, "max_tokens": 48}, id="free"),
    ],
)
def test_greedy_answers_are_the_same_with_and_without_drafts(engine, case):
    plain, _ = _answer(engine, 0, temperature=0, **case)
    drafted, speculator = _answer(engine, 8, temperature=0, **case)
    assert drafted == plain
    if case.get("messages") is QUOTING:
        # a quoting answer keeps most of its guesses: far fewer steps than tokens
        assert speculator.accepted >= len(plain) / 2, (speculator.drafted, speculator.accepted, len(plain))


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"temperature": 0.8, "seed": 11}, id="temperature"),
        pytest.param({"temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 12}, id="top-p-top-k"),
    ],
)
def test_seeded_samples_are_the_same_with_and_without_drafts(exact_engine, params):
    engine = exact_engine
    plain, _ = _answer(engine, 0, messages=QUOTING, max_tokens=48, **params)
    drafted, speculator = _answer(engine, 8, messages=QUOTING, max_tokens=48, **params)
    assert drafted == plain
    assert speculator.accepted > 0


def test_generate_drafts_for_the_replica_patterns_and_the_text_is_unchanged(engine):
    def text(speculative):
        request = GenerationRequest("t", SamplingParams(temperature=0, max_tokens=40), messages=QUOTING)
        seq = prepare_sequence(request, engine.tokenizer)
        events = generate(engine, seq, lambda: False, speculative)
        return "".join(e.text for e in events if isinstance(e, TextDelta))

    speculator = speculator_for(engine, SpeculativeConfig(8, 1))
    assert text(speculator) == text(None)
    assert speculator.accepted > 0 and speculator._states == {}  # its state goes with the sequence
