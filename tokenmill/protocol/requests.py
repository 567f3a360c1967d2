"""OpenAI-compatible request models, and the simple `/generate` body. No I/O.

Requests are strict, like OpenAI's own API: wrong JSON types are rejected rather than coerced, and
unknown arguments are refused by name (`protocol/strict.py` says which fields are accepted and ignored
instead, and what `--lenient-fields` changes). These models check shapes only; the ranges of sampling
values are checked once, by `SamplingParams`, which every entry point builds. Features that would
change the answer and are not built are refused by name, so a client relying on them hears about it
instead of silently getting something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tokenmill.errors import InvalidRequest
from tokenmill.generation import ChatMessage, ToolFunction
from tokenmill.protocol.chat import (
    MAX_PROMPT_CHARS,
    ChatMessageIn,
    NamedToolChoice,
    ResponseFormat,
    ToolIn,
)
from tokenmill.protocol.strict import StrictModel
from tokenmill.sampling import OutputGrammar, SamplingParams, choices
from tokenmill.tools import ToolCallFormat


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage in every chunk (guidellm sends it)


# The fields tokenmill acts on itself even when it relays to an upstream API: the model (the
# upstream's own), streaming (always streamed upstream), n (one upstream request per choice), the
# length and seed (per choice, within --max-tokens-limit), its own timeout, and echo.
_ACTED_ON = frozenset(
    {"model", "stream", "stream_options", "n", "timeout", "max_tokens", "max_completion_tokens", "seed", "priority"}
    | {"echo"}  # the prompt is sent back by this server
)


class _SamplingFields(StrictModel):
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
    priority: int | None = Field(
        None,
        ge=-1000,
        le=1000,
        description="Higher is admitted and scheduled first (default 0; the API key's max_priority caps it). "
        "The X-Priority header sets it too.",
    )
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's documented sampling extensions
    repetition_penalty: float | None = None
    min_p: float | None = None
    speculative_tokens: int | None = None  # guessed tokens checked a step (--speculative-tokens); same output

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

    def _prompt_logprobs(self) -> int | None:
        return None

    def relayed_fields(self) -> dict[str, Any]:
        """What an upstream API gets as the client sent it: every field given but those acted on here."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude=set(_ACTED_ON))

    def _grammar(self, tool_format: ToolCallFormat | None) -> OutputGrammar | None:
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

    def choice_params(self, tool_format: ToolCallFormat | None = None) -> list[SamplingParams]:
        """One SamplingParams per choice (n of them); `tool_format`: the model's, for a forced tool call."""
        return choices(self.to_sampling_params(tool_format), self.n)

    def to_sampling_params(self, tool_format: ToolCallFormat | None = None) -> SamplingParams:
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
            prompt_logprobs=self._prompt_logprobs(),
            grammar=self._grammar(tool_format),
            speculative_tokens=self.speculative_tokens,
        )


# Chat fields of OpenAI's that do not change what a model served here generates, and why.
CHAT_IGNORED_FIELDS = {
    "store": "no completion is stored (OpenAI's dashboard feature)",
    "metadata": "tags for OpenAI's stored completions",
    "service_tier": "one tier here",
    "prompt_cache_key": "the prefix cache finds shared prompt starts by itself",
    "safety_identifier": "like user, an end-user id for OpenAI's abuse monitoring",
    "reasoning_effort": "the models served here do not reason at a set effort",
    "verbosity": "a GPT-5 control; the models served here take no such setting",
    "prediction": "predicted output speeds OpenAI's answer up; it never changes the answer",
    "modalities": "only ['text'] is accepted, which is what every answer is",
}

# Chat fields of OpenAI's that would change the answer and are not built, with what to send instead.
_CHAT_REFUSED_FIELDS = {
    "functions": "functions is the deprecated form of tools: send tools (and tool_choice) instead",
    "function_call": "function_call is the deprecated form of tool_choice: send tools and tool_choice instead",
    "audio": "this model gives no audio: only text answers are supported",
    "web_search_options": "this server has no web search",
}


class ChatCompletionRequest(_SamplingFields):
    IGNORED = frozenset(CHAT_IGNORED_FIELDS)

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # a reasoning model's thinking (`--reasoning-parser`): sent as reasoning_content unless
    # include_reasoning is false (vLLM's field); reasoning_format "none" leaves it in the content
    # as written (llama.cpp's server's field)
    include_reasoning: bool = True
    reasoning_format: Literal["auto", "deepseek", "none"] | None = None
    # vLLM's: the last (assistant) message is the answer begun, and the model continues it (a prefill)
    continue_final_message: bool = False
    # accepted and ignored (CHAT_IGNORED_FIELDS)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    # refused by name, with what to send instead (_CHAT_REFUSED_FIELDS)
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    web_search_options: Any = None

    @model_validator(mode="after")
    def _refuse_unsupported_chat(self) -> ChatCompletionRequest:
        for name, why in _CHAT_REFUSED_FIELDS.items():
            if getattr(self, name) is not None:
                raise InvalidRequest(why, param=name)
        if self.modalities is not None and self.modalities != ["text"]:
            raise InvalidRequest("this model gives only text: modalities must be ['text']", param="modalities")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        if named is not None and named not in {t.function.name for t in self.tools or ()}:
            raise ValueError(f"tool_choice names {named!r}, which is not among the tools")
        if self._json_schema() is not None and self.forced_tools():
            raise ValueError("a forced tool call (tool_choice) cannot be combined with response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.continue_final_message:
            last = self.messages[-1]
            if last.role != "assistant" or last.tool_calls:
                raise ValueError("continue_final_message needs an assistant message last, with text and no tool_calls")
        return self

    @classmethod
    def translated(cls, fields: dict[str, Any]) -> ChatCompletionRequest:
        """Another API's request (Anthropic's, Responses), once written as chat fields; a
        combination that API's shapes allow and chat's do not is a 400 saying why."""
        try:
            return cls.model_validate(fields)
        except ValidationError as error:  # the most specific error, as server/errors reports one
            first = max(error.errors(), key=lambda e: len(e.get("loc", ())))
            raise InvalidRequest(str(first.get("msg", "invalid request")).removeprefix("Value error, ")) from None

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def offered_tools(self) -> tuple[ToolFunction, ...]:
        """The tools the model is told about (none when tool_choice is "none")."""
        if not self.tools or self.tool_choice == "none":
            return ()
        return tuple(tool.declared() for tool in self.tools)

    def forced_tools(self) -> tuple[ToolFunction, ...]:
        """The tools one of which must be called: all ("required"), the named one, or none ("auto")."""
        if self.tool_choice == "required":
            return self.offered_tools()
        if isinstance(self.tool_choice, NamedToolChoice):
            return tuple(t for t in self.offered_tools() if t.name == self.tool_choice.function.name)
        return ()

    def _grammar(self, tool_format: ToolCallFormat | None) -> OutputGrammar | None:
        forced = self.forced_tools()
        if forced and tool_format is not None:
            parallel = self.parallel_tool_calls is not False and len(forced) > 1
            return OutputGrammar("lark", tool_format.grammar(forced, parallel), param="tools")
        schema = self._json_schema()
        return None if schema is None else OutputGrammar("json_schema", schema)

    def _json_schema(self) -> str | None:
        """OpenAI's response_format, as the JSON schema the output must match (None: free text)."""
        return None if self.response_format is None else self.response_format.json_schema_text()

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(m.message() for m in self.messages)


@dataclass(frozen=True, slots=True)
class Echo:
    """What a completion sends back of its prompt: its text ahead of the answer's (`echo`), its
    tokens ahead of the answer's in the logprobs lists (`echo` with `logprobs`: that many
    alternatives each), and vLLM's `prompt_logprobs` list (that many alternatives each)."""

    text: str | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(max_length=MAX_PROMPT_CHARS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None  # the completions API's form: how many alternatives per token
    # vLLM's extension: each prompt token's log-probability, and this many alternatives
    prompt_logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return prompt

    @model_validator(mode="after")
    def _refuse_unsupported_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        if self.max_tokens == 0 and not (self.echo or self.prompt_logprobs is not None):
            raise ValueError(
                "max_tokens 0 generates nothing: it takes echo (or prompt_logprobs) to score the prompt instead"
            )
        return self

    def _logprobs(self) -> int | None:
        return self.logprobs

    def _prompt_logprobs(self) -> int | None:
        """How many alternatives the scored prompt needs (None: the prompt is not scored)."""
        asked = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        if asked:
            return max(asked)
        return 0 if self.echo and self.max_tokens == 0 else None  # the prompt alone, computed once

    def echo_of(self) -> Echo:
        return Echo(
            text=self.prompt_text() if self.echo else None,
            logprobs=self.logprobs if self.echo else None,
            prompt_logprobs=self.prompt_logprobs,
        )

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class GenerateRequest(StrictModel):
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


class TokenizeRequest(StrictModel):
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
        return tuple(m.message() for m in self.messages)


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_PROMPT_CHARS)
