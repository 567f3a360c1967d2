"""Next-token choice for a whole step at once, on the logits tensor.

Greedy rows take the argmax. Sampled rows apply temperature, then top-k, then top-p (vLLM's and
OpenAI's order), all as masked tensor operations over the rows together. The draw inverts each
row's cumulative distribution at one uniform number taken from that sequence's own seeded
generator: one random number per row (drawing a noise vector per row instead, as the
exponential-race trick does, cost 1.1 ms per row here, 35 ms a step at 32 sequences), and the
arithmetic stays batched.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from tokenmill.sampling import SamplingParams


class BatchSampler:
    def __init__(self, end_of_generation_ids: Seq[int], device: torch.device):
        self._eog = torch.tensor(list(end_of_generation_ids), dtype=torch.long, device=device)
        self._device = device
        self._generators: dict[int, torch.Generator] = {}

    def add(self, seq_id: int, params: SamplingParams) -> None:
        if params.greedy:
            return
        generator = torch.Generator(device=self._device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)
        self._generators[seq_id] = generator

    def remove(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def sample(
        self, logits: torch.Tensor, seq_ids: Seq[int], params: Seq[SamplingParams], forbid_end: Seq[bool]
    ) -> list[int]:
        """One token per row of `logits` ([rows, vocab], fp32; modified in place)."""
        if any(forbid_end):
            rows = torch.tensor([i for i, f in enumerate(forbid_end) if f], device=self._device)
            logits[rows[:, None], self._eog[None, :]] = -torch.inf
        chosen = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=self._device)
            picked = self._draw(logits[rows], [params[i] for i in sampled], [seq_ids[i] for i in sampled])
            chosen[rows] = picked
        return chosen.tolist()

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams], seq_ids: list[int]) -> torch.Tensor:
        device = self._device
        temperature = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temperature[:, None]
        top_k = [p.top_k if p.top_k > 0 else logits.shape[-1] for p in params]
        if min(top_k) < logits.shape[-1]:
            k = torch.tensor(top_k, device=device)
            kth = logits.topk(max(top_k), dim=-1).values.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, -torch.inf)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        if bool((top_p < 1.0).any()):
            ordered, order = logits.sort(dim=-1, descending=True)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the ones before it already reach top_p (the first always stays)
            drop = (cumulative - ordered.softmax(dim=-1)) >= top_p[:, None]
            logits = logits.scatter(1, order, ordered.masked_fill(drop, -torch.inf))
        cumulative = logits.softmax(dim=-1).cumsum_(dim=-1)
        uniform = torch.cat([torch.rand(1, generator=self._generators[s], device=device) for s in seq_ids])
        # scale by the row's total so rounding in the cumulative sum can never push the draw past it
        picked = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)[:, 0]
        return picked.clamp_(max=logits.shape[-1] - 1)
