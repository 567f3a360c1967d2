"""The plain data that flows from the protocol layer down to engines and back.

A `GenerationRequest` goes in; an async stream of `TokenEvent`s comes out. These types hold no
behaviour beyond trivial derived values, so every layer can share them without importing another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tokenmill.sampling import SamplingParams

FinishReason = Literal["stop", "length", "tool_calls"]  # tool_calls: only from an upstream API


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the assistant made (in a conversation's history, or parsed from its output)."""

    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's form)


@dataclass(frozen=True, slots=True)
class ToolFunction:
    """A function the model may call, as the client declared it."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'  # its arguments' JSON schema, as text


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None  # the participant's name, for templates that render it
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn's answer to that call


@dataclass(frozen=True, slots=True)
class Share:
    """Whose share of the server a request takes (its API key's tenant) and at what priority:
    the batch scheduler gives each tenant's prompts their weighted part of a step's prefill."""

    group: str = ""
    weight: float = 1.0
    priority: int = 0
    at_once: bool = True  # admitted without queueing: its tenant may be a light one (the scheduler)


DEFAULT_SHARE = Share()  # requests without a key: one group


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: either a raw `prompt` or chat `messages` (rendered by the model's template)."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    tools: tuple[ToolFunction, ...] = ()  # rendered into the chat template's prompt
    # the last message is the assistant's answer begun (a prefill): the model continues it
    continue_final: bool = False
    # upstream mode: the client's request fields this server does not act on, relayed as sent
    relay: Mapping[str, Any] | None = None
    share: Share = DEFAULT_SHARE

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt or messages must be given")
        if self.continue_final and not (self.messages and self.messages[-1].role == "assistant"):
            raise ValueError("continue_final needs an assistant message last")


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
    token_id: int | None = None  # None: from an upstream API, which reports no ids


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability, and the most likely alternatives at its position."""

    token: str
    token_bytes: tuple[int, ...]
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    rank: int | None = None  # 1 + how many tokens the model ranked higher (reported for prompt tokens)
    token_id: int | None = None  # None: from an upstream API, which reports no ids


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    """A scored prompt: its first token (nothing precedes it, so nothing scores it), then one entry
    per further prompt token, in order."""

    first: TopLogprob  # its logprob is 0.0 and means nothing: the wire formats send null
    scored: tuple[TokenLogprob, ...]


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """Part of a streamed tool call, in OpenAI's delta form: the first part of call `index` carries
    its id and name, every part some of its arguments' text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text for the client; never a broken UTF-8 character, never part of a stop string.
    `logprobs`: one entry per token generated since the last delta, when the request asked.
    `generated`: the tokens generated so far, this delta's included (0 where unknown).
    `tool_calls`: calls an upstream API streamed (local models' calls are parsed from the text).
    `prompt_logprobs`: when the request asked for them, the first delta (empty text, before any
    token) carries the prompt's."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    generated: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()
    prompt_logprobs: PromptLogprobs | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    usage: Usage
    stop_string: str | None = None  # which of the request's stop strings ended it (None: another reason)


TokenEvent = TextDelta | Finished
