"""OpenAI-compatible response bodies and stream chunks. No I/O."""

from __future__ import annotations

import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, model_serializer

from tokenmill.generation import FinishReason, PromptLogprobs, TokenLogprob, ToolCall, ToolCallDelta, Usage


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    @classmethod
    def of(cls, usage: Usage) -> UsageOut:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        )


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(BaseModel):
    """The chat form: one entry per token, each with its most likely alternatives."""

    content: list[TokenLogprobOut]
    refusal: None = None

    @classmethod
    def of(cls, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> ChatLogprobs:
        return cls(
            content=[
                TokenLogprobOut(
                    token=e.token,
                    logprob=e.logprob,
                    bytes=list(e.token_bytes),
                    top_logprobs=[
                        TopLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.token_bytes)) for t in e.top
                    ],
                )
                for e in entries
            ]
        )


class CompletionLogprobs(BaseModel):
    """The legacy completions form: parallel lists, alternatives as {token: logprob}, the chosen
    token's among them ("up to logprobs + 1 elements", as OpenAI documents). With `echo` the
    prompt's tokens come first, the very first with null (nothing precedes it to score it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @classmethod
    def of(
        cls,
        entries: tuple[TokenLogprob, ...] | list[TokenLogprob],
        offset: int = 0,
        prompt: PromptLogprobs | None = None,
        prompt_top: int = 0,
    ) -> CompletionLogprobs:
        """`offset`: where the entries' text starts in the choice's text. `prompt` (echo): the
        scored prompt goes first, from offset 0, with its `prompt_top` alternatives."""
        tokens: list[str] = []
        chosen: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        if prompt is not None:
            tokens.append(prompt.first.token)
            chosen.append(None)
            tops.append(None)
            offsets.append(0)
            at = len(prompt.first.token)
            for e in prompt.scored:
                tokens.append(e.token)
                chosen.append(e.logprob)
                tops.append(_alternatives(e, prompt_top))
                offsets.append(at)
                at += len(e.token)
        for e in entries:
            tokens.append(e.token)
            chosen.append(e.logprob)
            tops.append(_alternatives(e, len(e.top)))
            offsets.append(offset)
            offset += len(e.token)
        return cls(tokens=tokens, token_logprobs=chosen, top_logprobs=tops, text_offset=offsets)


def _alternatives(entry: TokenLogprob, k: int) -> dict[str, float]:
    alternatives = {t.token: t.logprob for t in entry.top[:k]}
    alternatives.setdefault(entry.token, entry.logprob)
    return alternatives


class PromptTokenLogprob(BaseModel):
    """vLLM's form of one token's entry in `prompt_logprobs`, keyed by token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str


def prompt_logprobs_of(prompt: PromptLogprobs, top: int) -> list[dict[str, PromptTokenLogprob] | None]:
    """vLLM's `prompt_logprobs`: null for the first token, then per token {id: entry}: the token
    itself with its rank, and the `top` most likely tokens at that position (rank 1, 2, ...)."""
    out: list[dict[str, PromptTokenLogprob] | None] = [None]
    for e in prompt.scored:
        entry = {str(e.token_id): PromptTokenLogprob(logprob=e.logprob, rank=e.rank, decoded_token=e.token)}
        for rank, t in enumerate(e.top[:top], start=1):
            entry.setdefault(str(t.token_id), PromptTokenLogprob(logprob=t.logprob, rank=rank, decoded_token=t.token))
        out.append(entry)
    return out


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut

    @classmethod
    def of(cls, call: ToolCall) -> ToolCallOut:
        return cls(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


class ToolCallDeltaOut(BaseModel):
    """A streamed part of a call: id, type and name come with the first part only."""

    index: int
    id: str | None = None
    function: dict[str, str]

    @model_serializer
    def _only_present(self) -> dict[str, object]:
        head = {"index": self.index} | ({"id": self.id, "type": "function"} if self.id is not None else {})
        return head | {"function": self.function}

    @classmethod
    def of(cls, delta: ToolCallDelta) -> ToolCallDeltaOut:
        function = {"name": delta.name} if delta.name is not None else {}
        return cls(index=delta.index, id=delta.id, function=function | {"arguments": delta.arguments})


class _ExtensionFields(BaseModel):
    """A body with fields beyond OpenAI's (`EXTENSIONS`): left out while None, not sent as null,
    so a reply without them is exactly OpenAI's shape."""

    EXTENSIONS: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _extensions_when_set(self, handler) -> dict[str, object]:
        body = handler(self)
        for name in self.EXTENSIONS:
            if getattr(self, name) is None:
                body.pop(name, None)
        return body


class AssistantMessage(_ExtensionFields):
    EXTENSIONS = ("reasoning_content",)

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None  # vLLM's, llama.cpp's and DeepSeek's name
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None

    @model_serializer
    def _only_present(self) -> dict[str, object]:
        # OpenAI omits absent delta fields rather than sending nulls.
        present = (
            ("role", self.role),
            ("content", self.content),
            ("reasoning_content", self.reasoning_content),
            ("tool_calls", self.tool_calls),
        )
        return {k: v for k, v in present if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageOut | None = None


class CompletionChoice(_ExtensionFields):
    EXTENSIONS = ("prompt_logprobs",)

    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = None  # vLLM's, when asked


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32s


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class GenerateResponse(BaseModel):
    text: str
    tokens: int


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenmill"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
