"""Continuous-batching scheduler: pure bookkeeping, no I/O, no model calls, no asyncio.

Each step: admit waiting sequences (FIFO) while the batch has room and their *whole* KV need
(prompt + max_tokens) fits the budget, so the cache can never overflow mid-generation; then plan
one decode row for every sequence that is generating, and spend what is left of the step's token
budget on prefill chunks. Decode rows go first, so a long prompt joining the batch delays the
others' next token by one (bounded) chunk, never by its whole prefill.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tokenmill.engines.base import Chunk
from tokenmill.engines.sequence import Sequence, SequenceStatus
from tokenmill.generation import TokenEvent


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch: int  # sequences running at once
    kv_tokens: int  # KV cells shared by all running sequences
    max_step_tokens: int  # tokens one step may feed to the model

    def __post_init__(self) -> None:
        if self.max_step_tokens < self.max_batch:
            raise ValueError("max_step_tokens must be at least max_batch (one decode row per sequence)")


@dataclass(frozen=True, slots=True)
class StepOutcome:
    events: list[tuple[Sequence, list[TokenEvent]]]
    finished: list[Sequence]  # the engine must remove_sequence() these


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_reserved = 0

    # -- queries
    def fits_at_all(self, seq: Sequence) -> bool:
        return seq.kv_tokens_needed <= self.config.kv_tokens

    def can_admit(self, seq: Sequence) -> bool:
        return (
            len(self.running) < self.config.max_batch
            and self.kv_reserved + seq.kv_tokens_needed <= self.config.kv_tokens
        )

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- transitions
    def add(self, seq: Sequence) -> None:
        if not self.fits_at_all(seq):
            raise ValueError("sequence can never fit the KV budget; refuse it before adding")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the batch while they fit. The engine must add_sequence()
        each one before `plan()`: it may find part of a prompt already cached."""
        admitted = []
        while self.waiting and self.can_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.kv_reserved += seq.kv_tokens_needed
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self) -> list[Chunk]:
        """This step's work: a decode row per generating sequence, then prefill chunks."""
        chunks = []
        budget = self.config.max_step_tokens
        prefilling = []
        for seq in self.running:
            if seq.num_pending == 1:
                chunks.append(Chunk(seq, 1))
                budget -= 1
            else:
                prefilling.append(seq)
        for seq in _fair_order(prefilling):
            if budget <= 0:
                break
            take = min(seq.num_pending, budget)
            chunks.append(Chunk(seq, take))
            budget -= take
        return chunks

    def postprocess(self, chunks: list[Chunk], tokens: list[int | None]) -> StepOutcome:
        events: list[tuple[Sequence, list[TokenEvent]]] = []
        finished: list[Sequence] = []
        for chunk, token in zip(chunks, tokens, strict=True):
            seq = chunk.seq
            seq.num_computed += chunk.num_tokens
            if token is None:
                continue
            events.append((seq, seq.append_token(token)))
            if seq.is_finished:
                self._release(seq)
                finished.append(seq)
        return StepOutcome(events=events, finished=finished)

    def abort(self, seq: Sequence) -> bool:
        """Drop `seq` wherever it is; True if it was running (the engine holds state for it)."""
        seq.abort()
        if seq in self.running:
            self._release(seq)
            return True
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass
        return False

    def fail_all_running(self) -> list[Sequence]:
        """After an engine failure: every running sequence is lost; return them for cleanup."""
        failed = list(self.running)
        for seq in failed:
            seq.abort()
            self._release(seq)
        return failed

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv_reserved -= seq.kv_tokens_needed


def _fair_order(prefilling: list[Sequence]) -> list[Sequence]:
    """Prompts in the order they get the step's prefill budget: by priority, then by their place
    in their own tenant's line over its weight (a tenant of weight 2 gets two prompts in for each
    one of a tenant of weight 1), then by admission."""
    if len(prefilling) < 2:  # most steps: nothing to order
        return prefilling
    place: dict[str, int] = {}
    keyed = []
    for order, seq in enumerate(prefilling):
        share = seq.share
        rank = place.get(share.group, 0)
        place[share.group] = rank + 1
        keyed.append((-share.priority, rank / share.weight, order, seq))
    return [seq for *_, seq in sorted(keyed, key=lambda item: item[:3])]
