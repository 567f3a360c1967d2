"""The engine core of `batch` mode: one scheduler and one engine, stepped together. No I/O.

    core.add(seq) / core.abort(seq_id)      requests in, as plain calls
    report = core.step()                    admit -> plan -> engine.step -> postprocess -> free
    report.events, report.settled           every sequence's new events, and who is done, per step

The same core runs on a thread of the server (`--no-engine-process`) or alone in a supervised
engine process (the default); the loop around it owns the transport. Any exception from `step()`
means the engine's state can no longer be trusted: the owner fails every request it holds and
starts a fresh engine, so nothing waits for events that will never come.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenmill.engines.base import StepEngine
from tokenmill.engines.prefix_cache import PrefixCacheStats
from tokenmill.engines.sequence import Sequence
from tokenmill.engines.speculative import DraftStats
from tokenmill.generation import TokenEvent
from tokenmill.runners.scheduler import Scheduler, SchedulerConfig


@dataclass(frozen=True, slots=True)
class CoreStats:
    running: int = 0
    waiting: int = 0
    kv_tokens_used: int = 0
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    speculative: DraftStats = field(default_factory=DraftStats)


@dataclass(frozen=True, slots=True)
class StepReport:
    """One step's outcome for every sequence: one message per step, however many sequences."""

    events: list[tuple[int, list[TokenEvent]]]  # seq_id -> its new events, in order
    settled: list[int]  # seq_ids that have finished or left: the engine holds nothing of them
    stats: CoreStats

    @property
    def empty(self) -> bool:
        return not self.events and not self.settled


class EngineCore:
    def __init__(self, engine: StepEngine, config: SchedulerConfig):
        self.engine = engine
        self.scheduler = Scheduler(config, engine.draft_costs)
        self._sequences: dict[int, Sequence] = {}
        self._settled: list[int] = []  # left since the last report (aborts between steps)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def sequence_ids(self) -> list[int]:
        return list(self._sequences)

    def add(self, seq: Sequence) -> None:
        self._sequences[seq.seq_id] = seq
        self.scheduler.add(seq)

    def abort(self, seq_id: int) -> None:
        seq = self._sequences.pop(seq_id, None)
        if seq is None:  # finished meanwhile: its end is already on its way
            return
        if self.scheduler.abort(seq):
            self.engine.remove_sequence(seq)
        self._settled.append(seq_id)

    def stats(self) -> CoreStats:
        scheduler = self.scheduler
        drafts = scheduler.speculator.stats() if scheduler.speculator is not None else DraftStats()
        return CoreStats(
            len(scheduler.running),
            len(scheduler.waiting),
            scheduler.kv_reserved,
            self.engine.prefix_cache_stats(),
            drafts,
        )

    def step(self) -> StepReport:
        """One engine step over every running sequence. Raises if the engine or the bookkeeping fails."""
        for seq in self.scheduler.admit(self.engine.cached_prefix_length):
            self.engine.add_sequence(seq)
        chunks = self.scheduler.plan(time.monotonic())
        events: list[tuple[int, list[TokenEvent]]] = []
        if chunks:
            tokens = self.engine.step(chunks)
            outcome = self.scheduler.postprocess(chunks, tokens)
            for seq in outcome.finished:
                self.engine.remove_sequence(seq)
                self._sequences.pop(seq.seq_id, None)
                self._settled.append(seq.seq_id)
            events = [(seq.seq_id, seq_events) for seq, seq_events in outcome.events if seq_events]
        return self.report(events)

    def report(self, events: list[tuple[int, list[TokenEvent]]] | None = None) -> StepReport:
        settled, self._settled = self._settled, []
        return StepReport(events or [], settled, self.stats())

    def close(self) -> None:
        self.engine.close()
