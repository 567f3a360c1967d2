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
    speculator: Speculator | None = None,
) -> Iterator[TokenEvent]:
    """Blocking: yields events as tokens are sampled; checks `is_cancelled` before every step.
    `speculator`: drafts the decode steps' next tokens (engines/speculative.py; one per engine)."""
    engine.add_sequence(seq)
    seq.status = SequenceStatus.RUNNING
    try:
        while not seq.is_finished:
            if is_cancelled():
                seq.abort()
                return
            chunk = Chunk(seq, min(seq.num_pending, engine.max_chunk_tokens))
            if speculator is not None and seq.num_pending == 1:
                (chunk,), _ = speculator.with_drafts([chunk], engine.max_chunk_tokens - 1)
            (tokens,) = engine.step([chunk])
            if speculator is not None:
                yield from speculator.take(chunk, tokens)
            else:
                yield from take_sampled(seq, chunk.num_tokens, tokens)
    finally:
        engine.remove_sequence(seq)
        if speculator is not None:
            speculator.forget(seq)


def speculator_for(engine: StepEngine, config: SpeculativeConfig | None) -> Speculator | None:
    """The drafting state of one replica's engine (None: speculative decoding is not set up)."""
    return None if config is None else Speculator(config, engine.draft_costs)
