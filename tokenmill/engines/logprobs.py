"""Log-probabilities of sampled tokens: the model's log-softmax over the raw logits, before any
sampling filter (temperature, top-k/p, penalties, bias), as OpenAI documents them.

Engines compute `SampledLogprobs` (token ids and floats) on the step that samples the token; the
sequence turns them into client-facing text (`generation.TokenLogprob`).
"""

from __future__ import annotations

import numpy as np

from tokenmill.engines.base import SampledLogprobs


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
