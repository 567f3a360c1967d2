"""Continuous-batching scheduler: pure bookkeeping, no I/O, no model calls, no asyncio.

Each step: admit waiting sequences (FIFO) while the batch has room and their *whole* KV need
(prompt + max_tokens) fits the budget, so the cache can never overflow mid-generation; then plan
one decode row for every sequence that is generating, and spend what is left of the step's token
budget on prefill chunks. Decode rows go first, so a long prompt joining the batch delays the
others' next token by one (bounded) chunk, never by its whole prefill.

Between tenants (generation.Share), where a step costs about as much as the tokens it carries, a
light tenant (running at most half its weighted part of the batch, or nothing but within the last
RECENT_S seconds) beside tenants over their part would wait for, and then share, steps as heavy as
the flood around it. So while one is about:
- a step that brings in its newcomer carries the light tenants' newcomers alone, so a first token
  costs its own prefill (one row when the prompt was cached). Every other row waits that one
  step, never two in a row;
- the other steps carry at most `over_share_rows` of the over-share tenants' decode rows, taking
  turns, and as many of their prompt tokens, so its wait for the step in flight stays short too.
Tenants near their parts (both saturating) and a tenant alone are scheduled as above, unchanged.

Cache-aware admission: a newcomer whose prompt starts like one still in prefill (admitted before it,
or in the same step), for at least SHARED_PREFILL_MIN tokens more than the prefix cache holds, waits
for that prefill; when it is done, the prompt is cached and the newcomer prefills only the rest.
Sixteen requests of one new app arriving together compute its system prompt once, not sixteen
times. The others behind it in the queue are not held up.

Speculative decoding (engines/speculative.py): with `speculative` set, decode rows carry the
`Speculator`'s guesses while the batch is small and no light tenant is about; `postprocess` takes
the guesses the engine kept as computed tokens (`Speculator.take`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.engines.base import Chunk, DraftCosts
from tokenmill.engines.prefix_cache import shared_length
from tokenmill.engines.sequence import Sequence, SequenceStatus
from tokenmill.engines.speculative import SpeculativeConfig, Speculator, take_sampled
from tokenmill.generation import TokenEvent

RECENT_S = 10.0  # a tenant that ran this lately is still light: the flood keeps out of its way
SHARED_PREFILL_MIN = 32  # uncached prompt tokens shared with a prompt in prefill that make a newcomer wait for it


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch: int  # sequences running at once
    kv_tokens: int  # KV cells shared by all running sequences
    max_step_tokens: int  # tokens one step may feed to the model
    over_share_rows: int = 0  # beside a light tenant, over-share tenants' decode rows per step (0: no limit)
    speculative: SpeculativeConfig | None = None  # drafts for decode rows (engines/speculative.py)

    def __post_init__(self) -> None:
        if self.max_step_tokens < self.max_batch:
            raise ValueError("max_step_tokens must be at least max_batch (one decode row per sequence)")


@dataclass(frozen=True, slots=True)
class StepOutcome:
    events: list[tuple[Sequence, list[TokenEvent]]]
    finished: list[Sequence]  # the engine must remove_sequence() these


class Scheduler:
    def __init__(self, config: SchedulerConfig, draft_costs: DraftCosts | None = None):
        """`draft_costs`: the engine's (StepEngine), for speculative decoding."""
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_reserved = 0
        self._yielded_last_step = False  # the last plan left the over-share tenants out
        self._rotation = 0  # where the over-share decode rows' turns go on from
        # tenant group -> (when it last ran, its weight, whether its requests then got places at once)
        self._recent: dict[str, tuple[float, float, bool]] = {}
        self.speculator = Speculator(config.speculative, draft_costs or DraftCosts()) if config.speculative else None

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

    def admit(self, cached_length: Callable[[list[int]], int | None] | None = None) -> list[Sequence]:
        """Move waiting sequences into the batch while they fit. The engine must add_sequence()
        each one before `plan()`: it may find part of a prompt already cached. `cached_length`:
        the engine's `cached_prefix_length`, for cache-aware admission (see the module docstring)."""
        admitted, held = [], []
        while self.waiting and self.can_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            if cached_length is not None and self._waits_for_a_prefill(seq, cached_length):
                held.append(seq)
                continue
            seq.status = SequenceStatus.RUNNING
            self.kv_reserved += seq.kv_tokens_needed
            self.running.append(seq)
            admitted.append(seq)
        self.waiting.extendleft(reversed(held))  # first again next step, in their order
        return admitted

    def _waits_for_a_prefill(self, seq: Sequence, cached_length: Callable[[list[int]], int | None]) -> bool:
        """Whether `seq` shares SHARED_PREFILL_MIN more leading tokens with a prompt in prefill
        than the cache holds (a scored prompt takes nothing from the cache, and gives nothing)."""
        if seq.params.prompt_logprobs is not None:
            return False
        prompt = seq.token_ids[: seq.num_prompt_tokens]
        shared = max(
            (
                min(shared_length(prompt, other.token_ids), other.num_prompt_tokens)
                for other in self.running
                if other.num_generated == 0 and other.params.prompt_logprobs is None
            ),
            default=0,
        )
        if shared < SHARED_PREFILL_MIN:
            return False
        cached = cached_length(prompt)
        return cached is not None and shared - cached >= SHARED_PREFILL_MIN

    def plan(self, now: float = 0.0) -> list[Chunk]:
        """This step's work: a decode row per generating sequence, then prefill chunks (beside a
        light tenant, over-share tenants feed less: see the module's docstring). `now`: seconds on
        any steady clock, to tell which tenants ran lately."""
        decoding = [seq for seq in self.running if seq.num_pending == 1]
        prefilling = [seq for seq in self.running if seq.num_pending > 1]
        light, over = self._light_and_over(now)
        beside_light = bool(light and over)
        # a light newcomer: its prompt still to feed, or only its last token (the rest was cached)
        newcomers = [seq for seq in self.running if seq.num_generated == 0 and seq.share.group in light]
        yielding = beside_light and not self._yielded_last_step and bool(newcomers)
        self._yielded_last_step = yielding
        if yielding:  # the light tenants' newcomers alone: every other row waits this one step
            decoding = [seq for seq in newcomers if seq.num_pending == 1]
            prefilling = [seq for seq in newcomers if seq.num_pending > 1]
        # what the over-share tenants may feed: decode rows, and as many prompt tokens
        capped = beside_light and self.config.over_share_rows > 0
        rows = prefill = self.config.over_share_rows if capped else self.config.max_step_tokens
        chunks = [Chunk(seq, 1) for seq in decoding if seq.share.group not in over]
        chunks += [Chunk(seq, 1) for seq in self._in_turn([seq for seq in decoding if seq.share.group in over], rows)]
        budget = self.config.max_step_tokens - len(chunks)
        guessed = 0
        if self.speculator is not None and not beside_light:
            # while prompts wait for prefill, drafts take at most half the budget (a guess must
            # not hold a first token up)
            chunks, guessed = self.speculator.with_drafts(chunks, budget // 2 if prefilling else budget)
            budget -= guessed
        for seq in _fair_order(prefilling):
            take = min(seq.num_pending, budget, prefill if seq.share.group in over else budget)
            if take <= 0:
                continue
            chunks.append(Chunk(seq, take))
            budget -= take
            if seq.share.group in over:
                prefill -= take
        # only a step that carries guesses has any to cut (most steps carry none)
        return self.speculator.fit(chunks) if guessed and self.speculator is not None else chunks

    def _light_and_over(self, now: float) -> tuple[set[str], set[str]]:
        """The light tenants, running at most half their weighted part of the batch with requests
        that got their places at once (one whose requests queued wants more than it runs: it waits
        for places, which a capped flood would free all the slower), and those running more than
        their part. A tenant that ran within RECENT_S seconds counts, running nothing: between its
        requests the flood stays out of the way of its next one."""
        counts: dict[str, int] = {}
        weights: dict[str, float] = {}
        queued: set[str] = set()  # tenants with a request that waited for its place: not light
        for seq in self.running:
            share = seq.share
            counts[share.group] = counts.get(share.group, 0) + 1
            weights[share.group] = share.weight
            if not share.at_once:
                queued.add(share.group)
        for group, weight in weights.items():
            self._recent[group] = (now, weight, group not in queued)
        for group, (seen, *_) in list(self._recent.items()):
            if now - seen > RECENT_S:
                del self._recent[group]
        if len(self._recent) < 2:
            return set(), set()
        per_weight = len(self.running) / sum(weight for _, weight, _ in self._recent.values())
        light = {g for g, (_, w, at_once) in self._recent.items() if at_once and counts.get(g, 0) <= w * per_weight / 2}
        over = {g for g, count in counts.items() if count > self._recent[g][1] * per_weight}
        return light, over

    def _in_turn(self, sequences: list[Sequence], rows: int) -> list[Sequence]:
        """`rows` of `sequences`, taking turns from step to step (all of them if they fit)."""
        if len(sequences) <= rows:
            return sequences
        start = self._rotation % len(sequences)
        self._rotation = start + rows
        return (sequences + sequences)[start : start + rows]

    def postprocess(self, chunks: list[Chunk], sampled: list[list[int]]) -> StepOutcome:
        events: list[tuple[Sequence, list[TokenEvent]]] = []
        finished: list[Sequence] = []
        for chunk, tokens in zip(chunks, sampled, strict=True):
            seq = chunk.seq
            if self.speculator is not None:
                seq_events = self.speculator.take(chunk, tokens)
            else:
                seq_events = take_sampled(seq, chunk.num_tokens, tokens)
            if not tokens:
                continue
            events.append((seq, seq_events))
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
        if self.speculator is not None:
            self.speculator.forget(seq)


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
