"""OpenAI-compatible request models, and the simple `/generate` body. No I/O.

Requests are strict, like OpenAI's own API: wrong JSON types are rejected rather than coerced, and
unknown arguments are refused by name. These models check shapes only; the ranges of sampling values
are checked once, by `SamplingParams`, which every entry point builds. Features tokenmill does not implement yet are accepted only
at their no-op values, so a client relying on them hears about it instead of silently getting
something else.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenmill.errors import InvalidRequest
from tokenmill.generation import ChatMessage
from tokenmill.sampling import SamplingParams, choices

MAX_PROMPT_CHARS = 1_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage in every chunk (guidellm sends it)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(max_length=MAX_PROMPT_CHARS)
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(_Strict):
    """Fields shared by chat and completions, and their translation to SamplingParams."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    timeout: float | None = Field(
        None, gt=0, description="Seconds; may shorten the server's total timeout, never extend it."
    )
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's documented sampling extensions
    repetition_penalty: float | None = None
    min_p: float | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def _logprobs(self) -> int | None:
        return None

    def _json_schema(self) -> str | None:
        return None

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        entries = []
        for key, bias in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise InvalidRequest(f"logit_bias keys must be token ids; got {key!r}", param="logit_bias") from None
            entries.append((token, bias))
        return tuple(entries)

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def choice_params(self) -> list[SamplingParams]:
        """One SamplingParams per choice (n of them)."""
        return choices(self.to_sampling_params(), self.n)

    def to_sampling_params(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self._max_tokens(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,  # vLLM's -1 also means "off"
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self._logit_bias(),
            logprobs=self._logprobs(),
            json_schema=self._json_schema(),
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _refuse_unsupported_chat(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported yet")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported")
        self._json_schema()  # a malformed response_format is refused here, with the request
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _json_schema(self) -> str | None:
        """OpenAI's response_format, as the JSON schema the output must match (None: free text)."""
        form = self.response_format
        kind = None if form is None else form.get("type")
        if form is None or kind == "text":
            return None
        if kind == "json_object":
            return '{"type": "object"}'
        if kind == "json_schema":
            spec = form.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs json_schema.schema, a JSON schema object")
            return json.dumps(schema)
        raise ValueError(f"response_format type {kind!r} is not supported: use text, json_object or json_schema")

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(ChatMessage(role=m.role, content=m.text(), name=m.name) for m in self.messages)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(max_length=MAX_PROMPT_CHARS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None  # the completions API's form: how many alternatives per token

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return prompt

    @model_validator(mode="after")
    def _refuse_unsupported_completion(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        return self

    def _logprobs(self) -> int | None:
        return self.logprobs

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class GenerateRequest(_Strict):
    """Body of the simple `POST /generate` route."""

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    max_tokens: int = 256
    temperature: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )


class TokenizeRequest(_Strict):
    """vLLM's `/tokenize`: a prompt, or chat messages rendered through the model's template."""

    model: str | None = None
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessageIn] | None = Field(None, min_length=1)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def chat_messages(self) -> tuple[ChatMessage, ...] | None:
        if self.messages is None:
            return None
        return tuple(ChatMessage(role=m.role, content=m.text(), name=m.name) for m in self.messages)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_PROMPT_CHARS)
