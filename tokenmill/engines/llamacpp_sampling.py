"""How the llama.cpp engine picks each sampled row's next token.

Rows whose request sets a temperature alone (or nothing: greedy) are drawn together in numpy
(`draws.py`, where the measurement is); the others -- logit bias, penalties, top-k, top-p, min-p
-- go through a llama.cpp sampler chain of their own, seeded per request. Either way, tokens that
may not come next (an end token under ignore_eos or min_tokens, a grammar's forbidden ones) are
set to -inf in llama.cpp's logits first, and log-probabilities come from the row as the model
gave it.
"""

from __future__ import annotations

import llama_cpp
import numpy as np

from tokenmill.engines import draws, logprobs
from tokenmill.engines.sequence import Sequence
from tokenmill.engines.structured import Constrained


class RowSampler:
    def __init__(self, n_vocab: int, window: int, eog_ids: list[int]):
        self._n_vocab = n_vocab
        self._window = window
        self._eog_ids = np.array(eog_ids, dtype=np.int64)
        self._chains: dict[int, llama_cpp.llama_sampler_p] = {}  # seq id -> its llama.cpp chain
        self._draws: dict[int, np.random.Generator] = {}  # seq id -> its generator, for plain rows

    def add(self, seq: Sequence) -> None:
        if draws.is_plain(seq.params):
            self._draws[seq.seq_id] = draws.generator(seq.params)
        else:
            self._chains[seq.seq_id] = sampler_chain(seq, self._n_vocab, self._window)

    def remove(self, seq_id: int) -> None:
        self._draws.pop(seq_id, None)
        chain = self._chains.pop(seq_id, None)
        if chain is not None:
            llama_cpp.llama_sampler_free(chain)

    def sample(
        self,
        ctx: llama_cpp.llama_context_p,
        sampled: list[tuple[Sequence, int]],
        masks: np.ndarray | None,
        constrained: Constrained | None,
    ) -> list[int]:
        """A token for each (sequence, batch row) of the step just decoded in `ctx`. `masks`: the
        grammar's, one row per entry of `sampled` (True: the token may follow), if any sequence
        is constrained; `constrained` learns the tokens chosen."""
        tokens, raws = [0] * len(sampled), []
        plain: list[tuple[int, np.ndarray]] = []
        for i, (seq, row) in enumerate(sampled):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(self._n_vocab,))
            raws.append(logits.copy() if seq.params.logprobs is not None else None)  # before any change
            if seq.params.ignore_eos or seq.num_generated < seq.params.min_tokens:
                logits[self._eog_ids] = -np.inf
            if masks is not None and constrained is not None and constrained.constrains(seq):
                logits[~masks[i]] = -np.inf
            if seq.seq_id in self._draws:
                plain.append((i, logits))
            else:
                tokens[i] = llama_cpp.llama_sampler_sample(self._chains[seq.seq_id], ctx, row)
        if plain:
            seqs = [sampled[i][0] for i, _ in plain]
            chosen = draws.draw(
                [logits for _, logits in plain], [seq.params for seq in seqs], [self._draws[seq.seq_id] for seq in seqs]
            )
            for (i, _), token in zip(plain, chosen, strict=True):
                tokens[i] = token
        for (seq, _), token, raw in zip(sampled, tokens, raws, strict=True):
            if constrained is not None:
                constrained.accept(seq, token)
            if raw is not None:
                seq.note_logprobs(logprobs.from_logits(raw, token, seq.params.logprobs or 0))
        return tokens

    def close(self) -> None:
        for chain in self._chains.values():
            llama_cpp.llama_sampler_free(chain)
        self._chains.clear()
        self._draws.clear()


def sampler_chain(seq: Sequence, n_vocab: int, window: int) -> llama_cpp.llama_sampler_p:
    """llama.cpp's sampler chain for one sequence, in vLLM's order: logit bias, penalties, then
    greedy, or top-k, top-p, min-p, temperature and the seeded draw."""
    params = seq.params
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    bias = params.logit_bias  # ids checked against the vocabulary when the request was prepared
    if bias:
        entries = (llama_cpp.llama_logit_bias * len(bias))(*(llama_cpp.llama_logit_bias(t, v) for t, v in bias))
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), entries))
    if params.presence_penalty or params.frequency_penalty:  # OpenAI's: over the generated tokens
        add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, window, 1.0, params.frequency_penalty, params.presence_penalty
            )
        )
    if params.repetition_penalty != 1.0:  # vLLM's and HF's: over prompt and generated tokens
        repeat = llama_cpp.llama_sampler_init_penalties(n_vocab, window, params.repetition_penalty, 0.0, 0.0)
        for token in seq.token_ids:
            llama_cpp.llama_sampler_accept(repeat, token)
        add(repeat)
    if params.greedy:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
    add(llama_cpp.llama_sampler_init_dist(seed))
    return chain
