"""OpenAI-compatible response bodies and stream chunks. No I/O."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, model_serializer

from tokenmill.generation import FinishReason, TokenLogprob, ToolCall, ToolCallDelta, Usage


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
    """The legacy completions form: parallel lists, alternatives as {token: logprob}."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, entries: tuple[TokenLogprob, ...] | list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e.token)
        return cls(
            tokens=[e.token for e in entries],
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[{t.token: t.logprob for t in e.top} for e in entries],
            text_offset=offsets,
        )


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
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
    tool_calls: list[ToolCallDeltaOut] | None = None

    @model_serializer
    def _only_present(self) -> dict[str, object]:
        # OpenAI omits absent delta fields rather than sending nulls.
        present = (("role", self.role), ("content", self.content), ("tool_calls", self.tool_calls))
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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


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
