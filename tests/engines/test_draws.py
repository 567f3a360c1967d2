"""Plain rows' draws in numpy: the softmax of logits over temperature, seeded per sequence."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill.engines.draws import BLOCK, draw, generator, is_plain
from tokenmill.sampling import SamplingParams


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    weights = np.exp(scaled - scaled.max())
    return weights / weights.sum()


@pytest.mark.parametrize("vocab", [BLOCK * 3, BLOCK * 2 + 37])  # whole blocks, and a partial last one
def test_draws_follow_the_softmax_of_the_logits_over_the_temperature(vocab):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(vocab) * 2).astype(np.float32)
    logits[[5, BLOCK + 7, vocab - 1]] += 6.0  # a few likely tokens, in different blocks, the last one too
    params = SamplingParams(temperature=0.8)
    generators = [generator(SamplingParams(temperature=0.8, seed=s)) for s in range(8)]
    counts = np.zeros(vocab)
    for _ in range(2500):
        for token in draw([logits] * 8, [params] * 8, generators):
            counts[token] += 1
    expected = _softmax(logits, 0.8) * counts.sum()
    likely = expected > 50
    assert likely.sum() >= 3
    # each likely token within 5 standard deviations of its expected count; the rest together too
    assert np.all(np.abs(counts[likely] - expected[likely]) < 5 * np.sqrt(expected[likely]))
    rest, rest_expected = counts[~likely].sum(), expected[~likely].sum()
    assert abs(rest - rest_expected) < 5 * np.sqrt(rest_expected) + 5


def test_masked_tokens_are_never_drawn_and_a_lone_allowed_token_always_is():
    logits = np.zeros(BLOCK * 2, dtype=np.float32)
    logits[:BLOCK] = -np.inf  # the whole first block, as a grammar or ignore_eos masks
    logits[BLOCK + 3] = -np.inf
    gen = [generator(SamplingParams(seed=1))]
    drawn = {draw([logits], [SamplingParams(temperature=2.0)], gen)[0] for _ in range(3000)}
    assert all(token >= BLOCK and token != BLOCK + 3 for token in drawn) and len(drawn) > BLOCK / 2
    lone = np.full(BLOCK * 2, -np.inf, dtype=np.float32)
    lone[BLOCK * 2 - 1] = 0.0
    assert {draw([lone], [SamplingParams(temperature=1.0)], gen)[0] for _ in range(50)} == {BLOCK * 2 - 1}


def test_greedy_rows_take_the_first_highest_logit_and_leave_the_logits_alone():
    logits = np.zeros(BLOCK + 10, dtype=np.float32)
    logits[[7, 9]] = 3.0
    before = logits.copy()
    sampled = SamplingParams(temperature=1.0, seed=3)
    tokens = draw([logits, logits], [SamplingParams(temperature=0.0), sampled], [generator(sampled)] * 2)
    assert tokens[0] == 7
    assert np.array_equal(logits, before)


def test_the_same_seed_repeats_its_draws_and_another_seed_differs():
    logits = np.random.default_rng(2).standard_normal(BLOCK * 4).astype(np.float32)
    params = [SamplingParams(temperature=1.0, seed=42)] * 3 + [SamplingParams(temperature=1.0, seed=43)]

    def run() -> list[list[int]]:
        generators = [generator(p) for p in params]
        return [draw([logits] * 4, params, generators) for _ in range(20)]

    first, second = run(), run()
    assert first == second
    rows = list(zip(*first, strict=True))
    assert rows[0] == rows[1] == rows[2] and rows[0] != rows[3]


def test_only_temperature_alone_or_greedy_is_plain():
    assert is_plain(SamplingParams(temperature=0.7)) and is_plain(SamplingParams(temperature=0.0))
    for params in (
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=40),
        SamplingParams(min_p=0.05),
        SamplingParams(presence_penalty=0.5),
        SamplingParams(repetition_penalty=1.1),
        SamplingParams(logit_bias=((3, 1.0),)),
        SamplingParams(temperature=0.0, logit_bias=((3, 1.0),)),
    ):
        assert not is_plain(params), params


def test_rounding_at_either_end_of_the_cumulative_weights_still_lands_on_a_token_that_weighs():
    from tokenmill.engines.draws import _invert

    weights = np.zeros(BLOCK * 3, dtype=np.float32)
    weights[[3, BLOCK + 2, BLOCK + 5]] = [1.0, 2.0, 0.5]
    totals = np.cumsum(weights.reshape(3, BLOCK).sum(axis=1, dtype=np.float64))
    assert _invert(weights, totals, totals[-1] + 1e-9) == BLOCK + 5  # past the last total
    assert _invert(weights, totals, totals[0] - 1e-12) == 3
    # the second block's total a little above its tokens' own sum, the target in between
    assert _invert(weights, np.array([1.0, 3.5001, 3.5001]), 3.50005) == BLOCK + 5
