"""SamplingParams: how one sequence picks its tokens, what it reports about them, and when it stops.

Validation lives here (not in the HTTP models) so every entry point -- OpenAI routes, the simple
`/generate` route, the bench, the Ray deployment -- gets the same rules and the same messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from tokenmill.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit
MAX_CHOICES = 16
MAX_DRAFT_TOKENS = 32  # speculative decoding: guessed tokens verified in one step, at most


@dataclass(frozen=True, slots=True)
class OutputGrammar:
    """What the output must match, compiled to a token mask by `engines.structured`: a JSON schema
    (`response_format`) or a Lark grammar (forced tool calls). `param` names the request field that
    a problem with it is reported against."""

    kind: Literal["json_schema", "lark"]
    source: str
    param: str = "response_format"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the end of the context window
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means disabled
    min_p: float = 0.0  # 0 means disabled
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    # OpenAI's penalties count generated tokens; the repetition penalty (vLLM, HF) also the prompt's
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 means disabled
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # None: no log-probabilities; k >= 0: the chosen token's, and the k most likely alternatives
    logprobs: int | None = None
    # None: the prompt is not scored; k >= 0: each prompt token's log-probability (and the k most
    # likely alternatives at its position), the whole prompt computed (no prefix cache)
    prompt_logprobs: int | None = None
    grammar: OutputGrammar | None = None  # constrained decoding: the output must match it
    # speculative decoding: at most this many guessed tokens a step (0: none; None: the server's
    # default). The output is the same either way; only the speed differs.
    speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise InvalidRequest(
                "max_tokens must be at least 1 (0, to score a prompt and generate nothing, takes echo or prompt_logprobs on /v1/completions)",
                param="max_tokens",
            )
        _check_finite(self.temperature, "temperature")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest("temperature must be between 0 and 2", param="temperature")
        _check_finite(self.top_p, "top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p must be greater than 0 and at most 1", param="top_p")
        if self.top_k < 0:
            raise InvalidRequest("top_k must be -1 or 0 (disabled), or a positive integer", param="top_k")
        _check_finite(self.min_p, "min_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("min_p must be between 0 and 1", param="min_p")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidRequest("seed must fit in 64 bits", param="seed")
        if self.min_tokens < 0:
            raise InvalidRequest("min_tokens must not be negative", param="min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest("min_tokens must not exceed max_tokens", param="min_tokens")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
        for stop in self.stop:
            if not stop:
                raise InvalidRequest("stop strings must not be empty", param="stop")
            if len(stop) > MAX_STOP_LENGTH:
                raise InvalidRequest(f"stop strings must be at most {MAX_STOP_LENGTH} characters", param="stop")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_finite(value, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequest(f"{name} must be between -2 and 2", param=name)
        _check_finite(self.repetition_penalty, "repetition_penalty")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidRequest("repetition_penalty must be greater than 0 and at most 2", param="repetition_penalty")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequest(f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} tokens", param="logit_bias")
        for token, bias in self.logit_bias:
            if token < 0:
                raise InvalidRequest("logit_bias keys must be token ids (non-negative integers)", param="logit_bias")
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise InvalidRequest("logit_bias values must be between -100 and 100", param="logit_bias")
        if self.grammar is not None and self.ignore_eos:
            raise InvalidRequest(f"ignore_eos cannot be combined with {self.grammar.param}", param="ignore_eos")
        if self.speculative_tokens is not None and not 0 <= self.speculative_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidRequest(
                f"speculative_tokens must be between 0 and {MAX_DRAFT_TOKENS}", param="speculative_tokens"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="prompt_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def choices(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The parameters of each of a request's n choices: one sequence each, the seed (if any)
    advanced per choice, so that a seeded request repeats and its choices still differ."""
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be between 1 and {MAX_CHOICES}", param="n")
    if params.seed is None:
        return [params] * n
    return [replace(params, seed=(params.seed + i) % 2**64) for i in range(n)]


def _check_finite(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number", param=name)
