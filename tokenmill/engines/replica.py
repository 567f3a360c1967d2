"""Run one sequence to the end on one engine: the inner loop of the replica serving patterns."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from tokenmill.engines.base import Chunk, StepEngine
from tokenmill.engines.sequence import Sequence, SequenceStatus
from tokenmill.generation import TokenEvent


def generate(engine: StepEngine, seq: Sequence, is_cancelled: Callable[[], bool]) -> Iterator[TokenEvent]:
    """Blocking: yields events as tokens are sampled; checks `is_cancelled` before every step."""
    engine.add_sequence(seq)
    seq.status = SequenceStatus.RUNNING
    try:
        while not seq.is_finished:
            if is_cancelled():
                seq.abort()
                return
            chunk = Chunk(seq, min(seq.num_pending, engine.max_chunk_tokens))
            (token,) = engine.step([chunk])
            seq.num_computed += chunk.num_tokens
            if token is not None:
                yield from seq.append_token(token)
    finally:
        engine.remove_sequence(seq)
