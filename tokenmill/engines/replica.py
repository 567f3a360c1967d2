"""Run one sequence to the end on one engine: the inner loop of the replica serving patterns."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from tokenmill.engines.base import Chunk, StepEngine
from tokenmill.engines.sequence import Sequence, SequenceStatus
from tokenmill.engines.speculative import SpeculativeConfig, Speculator, take_sampled
from tokenmill.generation import TokenEvent


def generate(
    engine: StepEngine,
    seq: Sequence,
    is_cancelled: Callable[[], bool],
    speculative: SpeculativeConfig | None = None,
) -> Iterator[TokenEvent]:
    """Blocking: yields events as tokens are sampled; checks `is_cancelled` before every step.
    `speculative`: draft the decode steps' next tokens (engines/speculative.py)."""
    speculator = (
        Speculator(speculative, engine.draft_row_cost, engine.max_draft_tokens) if speculative is not None else None
    )
    engine.add_sequence(seq)
    seq.status = SequenceStatus.RUNNING
    try:
        while not seq.is_finished:
            if is_cancelled():
                seq.abort()
                return
            chunk = Chunk(seq, min(seq.num_pending, engine.max_chunk_tokens))
            if speculator is not None and seq.num_pending == 1:
                draft = speculator.drafts([seq], engine.max_chunk_tokens - 1).get(seq.seq_id, ())
                chunk = Chunk(seq, 1, draft)
            (tokens,) = engine.step([chunk])
            if chunk.draft and speculator is not None:
                speculator.note(seq, len(chunk.draft), len(tokens) - 1)
            yield from take_sampled(seq, chunk.num_tokens, tokens)
    finally:
        engine.remove_sequence(seq)
