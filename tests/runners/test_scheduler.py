"""The continuous-batching scheduler as plain objects: admission, budgets, chunking, release."""

from __future__ import annotations

import pytest

from tokenmill.engines.base import DraftCosts
from tokenmill.engines.sequence import Sequence, SequenceStatus
from tokenmill.engines.speculative import SpeculativeConfig
from tokenmill.generation import Finished, Share
from tokenmill.runners.scheduler import RECENT_S, Scheduler, SchedulerConfig
from tokenmill.sampling import SamplingParams


class OneByteTokens:
    context_window = 10_000

    def token_bytes(self, token_id):
        return b"x"

    def is_end_of_generation(self, token_id):
        return token_id == 0


def seq(prompt_len: int = 4, max_new: int = 4) -> Sequence:
    return Sequence("r", [1] * prompt_len, SamplingParams(max_tokens=max_new), max_new, OneByteTokens())


class Plan:
    def __init__(self, admitted, chunks):
        self.admitted, self.chunks = admitted, chunks


def schedule(scheduler: Scheduler) -> Plan:
    return Plan(scheduler.admit(), scheduler.plan())


def run_step(scheduler: Scheduler, token: int = 7):
    plan = schedule(scheduler)
    tokens = [[token] if c.completes_sequence_input else [] for c in plan.chunks]
    return plan, scheduler.postprocess(plan.chunks, tokens)


def test_admits_up_to_max_batch_and_the_rest_waits():
    s = Scheduler(SchedulerConfig(max_batch=2, kv_tokens=1000, max_step_tokens=64))
    a, b, c = seq(), seq(), seq()
    for x in (a, b, c):
        s.add(x)
    plan = schedule(s)
    assert plan.admitted == [a, b]
    assert list(s.waiting) == [c] and c.status is SequenceStatus.WAITING


def test_admission_reserves_prompt_plus_max_tokens_of_kv():
    s = Scheduler(SchedulerConfig(max_batch=8, kv_tokens=20, max_step_tokens=64))
    a, b = seq(prompt_len=6, max_new=6), seq(prompt_len=6, max_new=6)  # 12 each
    s.add(a)
    s.add(b)
    assert schedule(s).admitted == [a]
    assert s.kv_reserved == 12
    assert list(s.waiting) == [b]


def test_a_sequence_that_can_never_fit_is_refused():
    s = Scheduler(SchedulerConfig(max_batch=8, kv_tokens=10, max_step_tokens=64))
    big = seq(prompt_len=8, max_new=8)
    assert not s.fits_at_all(big)
    with pytest.raises(ValueError):
        s.add(big)


def test_decode_rows_come_first_and_long_prompts_are_chunked():
    s = Scheduler(SchedulerConfig(max_batch=4, kv_tokens=10_000, max_step_tokens=16))
    short = seq(prompt_len=4, max_new=10)
    s.add(short)
    run_step(s)  # short prefilled, sampled its first token
    long = seq(prompt_len=40, max_new=4)
    s.add(long)
    plan, _ = run_step(s)
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(short, 1), (long, 15)]
    plan, _ = run_step(s)
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(short, 1), (long, 15)]
    plan, _outcome = run_step(s)
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(short, 1), (long, 10)]
    assert long.num_generated == 1  # its prefill completed this step and sampled a token


def test_finished_sequences_leave_the_batch_the_same_step_and_free_kv():
    s = Scheduler(SchedulerConfig(max_batch=1, kv_tokens=100, max_step_tokens=64))
    a, b = seq(max_new=2), seq(max_new=2)
    s.add(a)
    s.add(b)
    run_step(s)
    _, outcome = run_step(s)
    assert outcome.finished == [a]
    assert isinstance(outcome.events[-1][1][-1], Finished)
    assert s.running == [] and s.kv_reserved == 0
    plan, _ = run_step(s)
    assert plan.admitted == [b]  # the freed place is used at the very next step


def test_abort_of_running_and_waiting_sequences():
    s = Scheduler(SchedulerConfig(max_batch=1, kv_tokens=100, max_step_tokens=64))
    a, b = seq(), seq()
    s.add(a)
    s.add(b)
    schedule(s)
    assert s.abort(a) is True and s.kv_reserved == 0 and a.status is SequenceStatus.ABORTED
    assert s.abort(b) is False and not s.waiting
    assert not s.has_work


def test_engine_failure_releases_every_running_sequence():
    s = Scheduler(SchedulerConfig(max_batch=4, kv_tokens=100, max_step_tokens=64))
    for _ in range(3):
        s.add(seq())
    schedule(s)
    failed = s.fail_all_running()
    assert len(failed) == 3 and s.kv_reserved == 0 and not s.running


def test_step_budget_must_cover_one_decode_row_per_sequence():
    with pytest.raises(ValueError):
        SchedulerConfig(max_batch=8, kv_tokens=100, max_step_tokens=4)


def tenant_seq(group: str, weight: float = 1.0, priority: int = 0, prompt_len: int = 32) -> Sequence:
    share = Share(group, weight, priority)
    return Sequence("r", [1] * prompt_len, SamplingParams(max_tokens=64), 64, OneByteTokens(), share=share)


def test_prefill_is_shared_between_tenants_by_weight_and_priority():
    """A burst of one tenant's prompts must not hold another tenant's newcomer back for steps: the
    step's prefill budget goes to the tenants in turn (by weight), higher priority first."""
    s = Scheduler(SchedulerConfig(max_batch=16, kv_tokens=10_000, max_step_tokens=64))
    burst = [tenant_seq("a") for _ in range(2)]
    newcomer = tenant_seq("b")
    for x in [*burst, newcomer]:
        s.add(x)
    chunks = schedule(s).chunks
    assert [c.seq for c in chunks] == [burst[0], newcomer]  # b's newcomer is second, not third
    weighted = Scheduler(SchedulerConfig(max_batch=16, kv_tokens=10_000, max_step_tokens=4 * 32))
    heavy = [tenant_seq("h", weight=3) for _ in range(4)]
    light = [tenant_seq("l") for _ in range(4)]
    for x in [*light, *heavy]:
        weighted.add(x)
    order = [c.seq for c in schedule(weighted).chunks]
    assert order == [light[0], heavy[0], heavy[1], heavy[2]]  # three of h's for one of l's
    urgent = Scheduler(SchedulerConfig(max_batch=16, kv_tokens=10_000, max_step_tokens=32))
    first, late = tenant_seq("a"), tenant_seq("a", priority=5)
    for x in (first, late):
        urgent.add(x)
    assert [c.seq for c in schedule(urgent).chunks] == [late]


def test_a_light_tenants_newcomer_is_prefilled_in_a_step_of_its_own_beside_a_flood():
    """Beside a tenant running far over its part of the batch, a light tenant's first token must
    cost its own prefill, not a step carrying the whole flood: the flood's decodes and prompts sit
    out that step, and only that one (never two steps in a row)."""
    s = Scheduler(SchedulerConfig(max_batch=16, kv_tokens=100_000, max_step_tokens=64))
    flood = [tenant_seq("flood", prompt_len=1) for _ in range(10)]
    for x in flood:
        s.add(x)
    run_step(s)  # every flood prompt is one token: all of them decode from now on
    light = tenant_seq("light", prompt_len=100)  # two chunks of the 64-token step budget
    s.add(light)
    late_flood = tenant_seq("flood")
    s.add(late_flood)
    first, _ = run_step(s)
    assert [(c.seq, c.num_tokens) for c in first.chunks] == [(light, 64)]
    following, _ = run_step(s)  # the flood is back, though light's prompt is not in yet
    assert {c.seq for c in following.chunks} == {*flood, late_flood, light}
    assert light.num_pending == 1  # its prompt is in, its first token sampled


def test_a_light_newcomer_whose_prompt_was_cached_also_gets_a_step_of_its_own():
    """A prefix-cache hit leaves a newcomer one prompt token to feed, a row like a decode: its first
    token still comes from a step of its own (the light tenant's other rows wait too), not from
    one that carries the flood."""
    s = Scheduler(SchedulerConfig(max_batch=16, kv_tokens=100_000, max_step_tokens=64, over_share_rows=2))
    flood = [tenant_seq("flood", prompt_len=1) for _ in range(10)]
    earlier = tenant_seq("light", prompt_len=1)
    for x in [*flood, earlier]:
        s.add(x)
    run_step(s)  # earlier's own first step
    run_step(s)
    light = tenant_seq("light", prompt_len=40)
    s.add(light)
    assert s.admit() == [light]
    light.num_computed = light.num_cached = 39  # what an engine's prefix cache does on add_sequence
    first = s.plan()
    assert [(c.seq, c.num_tokens) for c in first] == [(light, 1)]
    s.postprocess(first, [[7]])
    following = s.plan()  # the others are back: two flood rows in turn, and both light sequences
    assert {earlier, light} <= {c.seq for c in following} and len(following) == 4


def test_tenants_near_their_parts_share_steps_as_usual():
    """Two tenants both saturating (each near its part) never make the other sit out a step, and
    neither does a tenant alone: only a light tenant beside a heavy one does."""
    for groups, newcomer_group in [(("a", "b") * 4, "b"), (("a",) * 8, "a")]:
        s = Scheduler(SchedulerConfig(max_batch=16, kv_tokens=100_000, max_step_tokens=64))
        running = [tenant_seq(group, prompt_len=1) for group in groups]
        for x in running:
            s.add(x)
        run_step(s)
        newcomer = tenant_seq(newcomer_group)
        s.add(newcomer)
        assert {c.seq for c in schedule(s).chunks} == {*running, newcomer}


def test_beside_a_light_tenant_the_flood_takes_turns_in_a_few_rows_per_step():
    """With over_share_rows set, a light tenant waits only for steps of a few flood rows (and its
    own), the flood's sequences taking turns so none is starved, also between its requests; once
    it has been gone for a while, the flood fills the step again."""
    s = Scheduler(SchedulerConfig(max_batch=16, kv_tokens=100_000, max_step_tokens=64, over_share_rows=2))
    flood = [tenant_seq("flood", prompt_len=1) for _ in range(10)]
    light = tenant_seq("light", prompt_len=1)
    for x in [*flood, light]:
        s.add(x)
    run_step(s)  # nobody prefills: the first step already takes turns
    turns: dict[Sequence, int] = dict.fromkeys(flood, 0)
    for _ in range(5):
        plan, _ = run_step(s)
        rows = [c.seq for c in plan.chunks]
        assert light in rows and len(rows) == 3
        for x in rows:
            if x is not light:
                turns[x] += 1
    assert set(turns.values()) == {1}  # five steps of two rows: each flood sequence once
    s.abort(light)
    assert len(s.plan(now=1.0)) == 2  # between the light tenant's requests, the flood keeps out of its way
    assert len(s.plan(now=1.0 + RECENT_S + 0.1)) == 10  # once it has been gone a while, the flood fills the step


def test_a_tenant_whose_requests_queued_for_places_is_not_light():
    """A tenant running little because it waited for places (two saturating keys, one arrived
    first) wants more than it runs: capping the other would only free places slower for it."""
    s = Scheduler(SchedulerConfig(max_batch=16, kv_tokens=100_000, max_step_tokens=64, over_share_rows=2))
    heavy = [tenant_seq("heavy", prompt_len=1) for _ in range(10)]
    late = Sequence(
        "r", [1] * 32, SamplingParams(max_tokens=64), 64, OneByteTokens(), share=Share("late", at_once=False)
    )
    for x in [*heavy, late]:
        s.add(x)
    plan, _ = run_step(s)
    assert {c.seq for c in plan.chunks} == {*heavy, late}  # no step of its own, no cap on the others


def prompted(tokens: list[int], max_new: int = 4) -> Sequence:
    return Sequence("r", tokens, SamplingParams(max_tokens=max_new), max_new, OneByteTokens())


def test_newcomers_sharing_an_uncached_prompt_start_wait_for_its_prefill_and_others_do_not():
    # three requests of one new app (a 200-token system prompt nobody has cached) and one other
    s = Scheduler(SchedulerConfig(max_batch=8, kv_tokens=10_000, max_step_tokens=512))
    system = list(range(100, 300))
    app = [prompted(system + [1, 2, 3]) for _ in range(3)]
    other = prompted(list(range(1000, 1050)))
    for seq in [*app, other]:
        s.add(seq)
    cached: dict[str, int] = {"held": 0}
    admitted = s.admit(lambda tokens: cached["held"])
    assert admitted == [app[0], other]  # the app's first request computes the shared start; others wait
    assert list(s.waiting) == app[1:]
    s.postprocess(s.plan(), [[7], [7]])  # both prefilled whole in one step (app[0]'s first token out)
    cached["held"] = len(system) + 3  # its prompt is cached now
    assert s.admit(lambda tokens: cached["held"]) == app[1:]  # and the rest take it from the cache


def test_a_newcomer_does_not_wait_for_a_start_the_cache_already_holds():
    s = Scheduler(SchedulerConfig(max_batch=8, kv_tokens=10_000, max_step_tokens=512))
    system = list(range(100, 300))
    first, second = prompted(system + [1]), prompted(system + [2])
    s.add(first)
    s.add(second)
    assert s.admit(lambda tokens: len(system)) == [first, second]  # only a token of each is new


def test_without_a_prefix_cache_nobody_waits():
    s = Scheduler(SchedulerConfig(max_batch=8, kv_tokens=10_000, max_step_tokens=512))
    same = [prompted(list(range(200))) for _ in range(3)]
    for seq in same:
        s.add(seq)
    assert s.admit(lambda tokens: None) == same
    assert Scheduler(SchedulerConfig(max_batch=8, kv_tokens=10_000, max_step_tokens=512)).admit() == []


def _quoting(max_new: int = 64, **params) -> Sequence:
    """A prompt whose ending recurs in it: prompt lookup has a guess (4 5 6 ...)."""
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    return Sequence("r", prompt, SamplingParams(max_tokens=max_new, **params), max_new, OneByteTokens())


def _speculating(max_batch: int = 8, max_step_tokens: int = 64, drafts_up_to: int = 2) -> Scheduler:
    speculative = SpeculativeConfig(max_draft=4, max_batch=drafts_up_to)
    return Scheduler(SchedulerConfig(max_batch, 10_000, max_step_tokens, speculative=speculative), DraftCosts(0.05, 32))


def test_decode_rows_carry_drafts_and_kept_guesses_count_as_computed():
    s = _speculating()
    a = _quoting()
    s.add(a)
    run_step(s)  # prefill; 7 sampled: "3 7" never occurred before, so no guess yet
    a.token_ids[-3:] = [1, 2, 3]  # as if the answer had written "1 2 3": its prompt went on "4 5 6 7"
    plan = schedule(s)
    assert [c.draft for c in plan.chunks] == [(4, 5, 6, 7)]
    outcome = s.postprocess(plan.chunks, [[4, 5, 9]])  # two guesses kept, then the model's 9
    assert a.token_ids[-3:] == [4, 5, 9] and a.num_pending == 1
    assert a.num_computed == len(a.token_ids) - 1
    assert (s.speculator.drafted, s.speculator.accepted) == (4, 2)
    assert [len(events) for _, events in outcome.events] == [3]


def test_no_drafts_in_a_batch_too_big_for_them_nor_past_half_the_budget_while_prompts_wait():
    s = _speculating(drafts_up_to=2)
    crowd = [_quoting() for _ in range(3)]
    for x in crowd:
        s.add(x)
    run_step(s)
    for x in crowd:
        x.token_ids[-3:] = [1, 2, 3]
    assert all(not c.draft for c in schedule(s).chunks)  # three decode rows: over drafts_up_to
    s = _speculating(max_batch=2, max_step_tokens=6)
    a, waiting = _quoting(), seq(prompt_len=30)
    s.add(a)
    while a.num_generated == 0:
        run_step(s)  # the prompt, 6 tokens a step
    a.token_ids[-3:] = [1, 2, 3]
    s.add(waiting)
    plan = schedule(s)
    # 6 tokens: one decode row, then half of the other 5 for the guesses, the rest for the prompt
    assert [(c.num_tokens, c.draft) for c in plan.chunks] == [(1, (4, 5)), (3, ())]


def test_a_finished_or_aborted_sequence_leaves_no_drafting_state_behind():
    s = _speculating()
    a, b = _quoting(max_new=2), _quoting()
    s.add(a)
    s.add(b)
    run_step(s)
    a.token_ids[-3:] = [1, 2, 3]
    run_step(s)  # a's second token: finished
    s.abort(b)
    assert s.speculator._states == {}
