"""Prompt-lookup drafts and their bookkeeping (engines/speculative.py): pure, no model."""

from __future__ import annotations

from tokenmill.engines.base import Chunk, DraftCosts
from tokenmill.engines.sequence import Sequence
from tokenmill.engines.simulated import SimulatedTokenizer
from tokenmill.engines.speculative import (
    PAUSE_TOKENS,
    DraftStats,
    NgramIndex,
    SpeculativeConfig,
    Speculator,
    best_length,
    eligible,
    take_sampled,
    verify,
)
from tokenmill.sampling import OutputGrammar, SamplingParams


def _seq(prompt: list[int], max_new: int = 50, **params) -> Sequence:
    seq = Sequence("r", prompt, SamplingParams(**params), max_new, SimulatedTokenizer(4096))
    seq.num_computed = len(prompt) - 1  # as after prefill: the last token is the decode row's
    return seq


def test_the_guess_is_what_followed_the_latest_earlier_occurrence_of_the_ending():
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    # "2 3" occurred at 1-2 (then 4 5) and 6-7 (then 7 8); "1 2 3" only at 0-2: the longer wins
    assert NgramIndex(tokens).propose(3) == (4, 5, 9)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]
    assert NgramIndex(tokens).propose(2) == (7, 8)  # only "2 3" recurs; its latest occurrence


def test_nothing_is_guessed_without_an_ending_that_recurs():
    assert NgramIndex([1, 2, 3, 4, 5, 6]).propose(4) == ()
    assert NgramIndex([5, 6, 7, 5]).propose(4) == ()  # one matching token is not enough
    assert NgramIndex([1, 2]).propose(4) == ()


def test_the_index_grows_with_the_list_and_never_finds_the_ending_itself():
    tokens = [1, 2, 3]
    index = NgramIndex(tokens)
    assert index.propose(4) == ()
    tokens += [4, 1, 2]
    assert index.propose(4) == (3, 4, 1, 2)  # the guess stops where the list does
    tokens += [3]
    assert index.propose(2) == (4, 1)
    tokens += [9, 9, 9]
    assert index.propose(2) == (9,)  # "9 9" ended at position 8; only one token follows it


def test_a_draft_never_reaches_past_the_answers_length():
    speculator = Speculator(SpeculativeConfig(max_draft=8, max_batch=4), DraftCosts(0.05, 32))
    seq = _seq([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], max_new=3)
    # a draft kept whole, and the token after it, must fit the 3 tokens the answer may still have
    assert speculator.drafts([seq], budget=100) == {seq.seq_id: (4, 5)}
    assert speculator.drafts([seq], budget=1) == {seq.seq_id: (4,)}


def test_the_request_sets_its_own_length_and_big_batches_draft_nothing():
    speculator = Speculator(SpeculativeConfig(max_draft=0, max_batch=2), DraftCosts(0.05, 32))
    prompt = [1, 2, 3, 4, 5, 6, 1, 2, 3]
    off, on = _seq(prompt), _seq(prompt, speculative_tokens=2)
    assert speculator.drafts([off, on], budget=100) == {on.seq_id: (4, 5)}
    crowd = [on, _seq(prompt, speculative_tokens=2), _seq(prompt, speculative_tokens=2)]
    assert speculator.drafts(crowd, budget=100) == {}


def test_sequences_whose_sampling_follows_each_token_are_not_drafted():
    prompt = [1, 2, 3, 1, 2]
    assert eligible(_seq(prompt))
    assert eligible(_seq(prompt, temperature=0.7, top_p=0.9, seed=3, logit_bias=((5, 2.0),)))
    assert not eligible(_seq(prompt, logprobs=0))
    assert not eligible(_seq(prompt, frequency_penalty=0.5))
    assert not eligible(_seq(prompt, repetition_penalty=1.1))
    assert not eligible(_seq(prompt, grammar=OutputGrammar("json_schema", "{}")))
    assert not eligible(_seq(prompt, min_tokens=1))  # the end token is still forbidden


def test_the_draft_is_as_long_as_pays_for_the_rows_it_costs():
    assert best_length(0.95, row_cost=0.6, limit=16) == 4  # llama.cpp's rows: a few guesses at most
    assert best_length(0.95, row_cost=0.05, limit=16) == 16  # nearly free rows: all of them
    assert best_length(0.8, row_cost=0.6, limit=16) == 1
    assert best_length(0.5, row_cost=0.6, limit=16) == 0  # guesses that fail: plain steps
    assert best_length(0.99, row_cost=1.0, limit=16) == 0  # a row as dear as a step never pays


def test_a_sequence_whose_guesses_keep_failing_pauses_and_pauses_longer_each_time():
    speculator = Speculator(SpeculativeConfig(max_draft=4, max_batch=4), DraftCosts(0.6, 32))
    seq = _seq([1, 2, 3, 1, 2], max_new=1000)
    assert speculator.drafts([seq], 100) == {seq.seq_id: (3,)}  # a new sequence's rate: one guess pays
    speculator.note(seq, drafted=1, kept=0)
    assert speculator.drafts([seq], 100) == {}  # its rate fell below what a row costs: paused
    take_sampled(seq, 1, [7] * PAUSE_TOKENS)
    seq.token_ids[-3:] = [1, 2, 3]  # an ending that recurs
    assert speculator.drafts([seq], 100)  # tried again after the pause, from the prior
    for _ in range(4):  # kept: the rate climbs and so does the length
        speculator.note(seq, drafted=1, kept=1)
    assert speculator.draft_length(seq) == 4
    while speculator.draft_length(seq):  # a success resets the pause: this one is 16 tokens again
        speculator.note(seq, drafted=4, kept=0)
    take_sampled(seq, 1, [7] * PAUSE_TOKENS)
    assert speculator.draft_length(seq) == 1
    speculator.note(seq, drafted=1, kept=0)  # failed again, with no success between: twice as long
    take_sampled(seq, 1, [7] * PAUSE_TOKENS)
    assert speculator.draft_length(seq) == 0
    take_sampled(seq, 1, [7] * PAUSE_TOKENS)
    assert speculator.draft_length(seq) == 1
    assert speculator.accepted == 4


def test_kept_guesses_count_as_computed_and_nothing_is_kept_after_the_end():
    seq = _seq([1, 2, 3, 4], max_new=10)
    take_sampled(seq, 1, [5, 6, 7])  # guesses 5 and 6 kept, then 7 sampled
    assert seq.token_ids[-3:] == [5, 6, 7]
    assert seq.num_computed == 6 and seq.num_pending == 1
    short = _seq([1, 2, 3, 4], max_new=2)
    events = take_sampled(short, 1, [5, 6, 7])
    assert short.is_finished and short.token_ids[-2:] == [5, 6] and short.num_generated == 2
    assert events[-1].reason == "length"


def test_verification_keeps_guesses_while_they_are_sampled_then_the_sample_after_them():
    def sampler(samples: list[int]):
        asked: list[int] = []

        def sample(i: int) -> int:
            asked.append(i)
            return samples[i]

        return sample, asked

    sample, asked = sampler([5, 6, 9, 8])
    assert verify((5, 6, 7), sample, lambda token: False) == [5, 6, 9]  # 7 missed: 9 sampled there
    assert asked == [0, 1, 2]  # rows after a miss are never sampled
    sample, asked = sampler([5, 6, 7, 8])
    assert verify((5, 6, 7), sample, lambda token: False) == [5, 6, 7, 8]  # all kept, and one more
    sample, asked = sampler([5, 0, 7, 8])
    assert verify((5, 0, 7), sample, lambda token: token == 0) == [5, 0]  # an end token ends it
    assert asked == [0, 1]


def test_drafts_keep_a_step_within_the_engines_row_limit():
    few_rows = DraftCosts(0.05, 3, max_step_rows=4)
    speculator = Speculator(SpeculativeConfig(max_draft=8, max_batch=4), few_rows)
    one, two = _seq([1, 2, 3, 4, 5, 1, 2, 3]), _seq([1, 2, 3, 4, 5, 1, 2, 3])
    assert speculator.drafts([one], 100) == {one.seq_id: (4, 5, 1)}  # the engine's 3 guesses
    drafts = speculator.drafts([one, two], 100)
    assert sum(len(d) for d in drafts.values()) == 2  # 2 rows + 2 guesses: the limit of 4
    # a prompt chunk planned after the drafts: the step's guesses are cut to fit beside it
    prompt = _seq(list(range(10)))
    prompt.num_computed = 8
    step = [Chunk(one, 1, (4, 5)), Chunk(prompt, 2)]
    assert [c.draft for c in speculator.fit(step)] == [(4,), ()]
    wide = [Chunk(one, 1, (4, 5)), Chunk(prompt, 2), Chunk(two, 2)]
    assert speculator.fit(wide) == wide  # past the limit without guesses: nothing to keep within


def test_the_tally_counts_the_guesses_sent_and_those_kept():
    speculator = Speculator(SpeculativeConfig(max_draft=4, max_batch=4), DraftCosts(0.05, 32))
    seq = _seq([1, 2, 3, 4, 5, 1, 2, 3])
    (chunk,), guessed = speculator.with_drafts([Chunk(seq, 1)], 100)
    assert chunk.draft == (4, 5, 1, 2) and guessed == 4
    speculator.take(chunk, [4, 5, 9])  # two kept, then 9
    assert speculator.stats() == DraftStats(drafts=1, draft_tokens=4, accepted_tokens=2)
    assert seq.token_ids[-3:] == [4, 5, 9] and seq.num_computed == len(seq.token_ids) - 1
