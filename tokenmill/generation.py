"""The plain data that flows from the protocol layer down to engines and back.

A `GenerationRequest` goes in; an async stream of `TokenEvent`s comes out. These types hold no
behaviour beyond trivial derived values, so every layer can share them without importing another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tokenmill.sampling import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None  # the participant's name, for templates that render it


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: either a raw `prompt` or chat `messages` (rendered by the model's template)."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt or messages must be given")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cells came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    token_bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability, and the most likely alternatives at its position."""

    token: str
    token_bytes: tuple[int, ...]
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text for the client; never a broken UTF-8 character, never part of a stop string.
    `logprobs`: one entry per token generated since the last delta, when the request asked.
    `generated`: the tokens generated so far, this delta's included (0 where unknown)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    generated: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    usage: Usage


TokenEvent = TextDelta | Finished
