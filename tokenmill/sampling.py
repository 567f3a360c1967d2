"""SamplingParams: how one sequence picks its tokens and when it stops.

Validation lives here (not in the HTTP models) so every entry point -- OpenAI routes, the simple
`/generate` route, the bench, the Ray deployment -- gets the same rules and the same messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenmill.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the end of the context window
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means disabled
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        _check_finite(self.temperature, "temperature")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest("temperature must be between 0 and 2", param="temperature")
        _check_finite(self.top_p, "top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p must be greater than 0 and at most 1", param="top_p")
        if self.top_k < 0:
            raise InvalidRequest("top_k must be -1 or 0 (disabled), or a positive integer", param="top_k")
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_finite(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number", param=name)
