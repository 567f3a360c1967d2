"""Log-probabilities of sampled tokens: the model's log-softmax over the raw logits, before any
sampling filter (temperature, top-k/p, penalties, bias), as OpenAI documents them.

Engines compute `SampledLogprobs` (token ids and floats) on the step that samples the token; the
sequence turns them into client-facing text (`generation.TokenLogprob`).

Prompt log-probabilities (`SamplingParams.prompt_logprobs`, completions' `echo` with `logprobs`)
score the prompt's own tokens: the logits at position p give token p + 1's. An engine asks
`scored_positions` which positions of a chunk those are, keeps their logits, and scores them all at
once (`score_rows` here, or the torch engine's own on its tensors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tokenmill.engines.base import SampledLogprobs

if TYPE_CHECKING:
    from tokenmill.engines.sequence import Sequence


def from_logits(logits: np.ndarray, chosen: int, k: int) -> SampledLogprobs:
    """`logits`: one row [vocab] of raw float logits."""
    row = logits.astype(np.float64, copy=False)
    peak = row.max()
    log_total = peak + np.log(np.exp(row - peak).sum())
    top: tuple[tuple[int, float], ...] = ()
    if k:
        ids = np.sort(np.argpartition(-row, k - 1)[:k])  # ties: the lower id first, as argmax picks
        ids = ids[np.argsort(-row[ids], kind="stable")]
        top = tuple((int(i), float(row[i] - log_total)) for i in ids)
    return SampledLogprobs(chosen, float(row[chosen] - log_total), top)


def scored_positions(seq: Sequence, start: int, tokens: int) -> range:
    """The positions among `start .. start + tokens - 1` whose logits score a prompt token: all
    but the prompt's last (its logits pick the first generated token). Empty unless `seq` asks."""
    if seq.params.prompt_logprobs is None:
        return range(0)
    return range(start, min(start + tokens, seq.num_prompt_tokens - 1))


def score_rows(logits: np.ndarray, targets: list[int], k: int) -> list[SampledLogprobs]:
    """`logits`: [rows, vocab] raw logits; row i scores `targets[i]`, with its rank and top `k`."""
    rows = logits.astype(np.float64, copy=False)
    peak = rows.max(axis=1, keepdims=True)
    log_total = peak + np.log(np.exp(rows - peak).sum(axis=1, keepdims=True))
    index = np.arange(len(targets))
    target_logits = rows[index, targets]
    ranks = (rows > target_logits[:, None]).sum(axis=1) + 1
    chosen = target_logits - log_total[:, 0]
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(targets)
    if k:
        ids = np.argpartition(-rows, k - 1, axis=1)[:, :k]
        ids.sort(axis=1)  # ties: the lower id first, as from_logits
        order = np.argsort(-np.take_along_axis(rows, ids, axis=1), axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        values = np.take_along_axis(rows, ids, axis=1) - log_total
        tops = [tuple(zip(r.tolist(), v.tolist(), strict=True)) for r, v in zip(ids, values, strict=True)]
    return [
        SampledLogprobs(target, float(value), top, int(rank))
        for target, value, top, rank in zip(targets, chosen, tops, ranks, strict=True)
    ]
