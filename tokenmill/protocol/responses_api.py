"""OpenAI's Responses API (`POST /v1/responses`), stateless: shapes, and their translation into a
chat completion request, so the chat pipeline serves it.

Stateless as Ollama's and llama.cpp's server's: nothing is stored, so `previous_response_id`,
`conversation` and `item_reference` items are refused by name (a client keeps its own history, as
the openai-agents SDK does, and sends it back as input items). `store` is accepted and ignored.

`input` items become chat turns: messages (with `input_text` / `output_text` / `refusal` parts),
`function_call` items -> the assistant turn's tool calls, `function_call_output` -> `tool`
messages, `reasoning` items dropped (past thoughts are not fed back). No I/O.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenmill.errors import InvalidRequest
from tokenmill.protocol.chat import MAX_PROMPT_CHARS
from tokenmill.protocol.requests import ChatCompletionRequest
from tokenmill.protocol.strict import StrictModel

_UNREADABLE_PARTS = {"input_image": "images", "input_file": "files", "input_audio": "audio"}


class InputText(StrictModel):
    type: Literal["input_text", "output_text"]
    text: str
    # an output_text part sent back as the SDK gave it
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None

    IGNORED = frozenset({"annotations", "logprobs"})


class RefusalText(StrictModel):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[InputText | RefusalText, Field(discriminator="type")]


class MessageItem(StrictModel):
    IGNORED = frozenset({"id", "status", "phase"})

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part] = Field(max_length=MAX_PROMPT_CHARS)
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _readable_parts(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind in _UNREADABLE_PARTS:
                raise ValueError(
                    f"this model takes no {_UNREADABLE_PARTS[kind]}: parts of type {kind!r} are not supported"
                )
        return content

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, InputText) else p.refusal for p in self.content)


class FunctionCallItem(StrictModel):
    IGNORED = frozenset({"id", "status", "caller", "namespace", "async_", "async_alias"})

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None
    # what the SDK's own item carries when sent back with model_dump() (`async_`) or by alias (`async`)
    caller: dict[str, Any] | None = None
    namespace: str | None = None
    async_: bool | None = None
    async_alias: bool | None = Field(None, alias="async")


class FunctionCallOutputItem(StrictModel):
    IGNORED = frozenset({"id", "status"})

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class ReasoningItem(StrictModel):
    """A past turn's reasoning, sent back as the SDK gave it: not fed to the model again."""

    model_config = ConfigDict(extra="allow")

    type: Literal["reasoning"]


Item = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem, Field(discriminator="type")]


def _typed(item: Any) -> Any:
    """An item without `type` is a message (OpenAI's easy input form: `{"role", "content"}`)."""
    if isinstance(item, dict) and "type" not in item and "role" in item:
        return {"type": "message", **item}
    if isinstance(item, dict) and item.get("type") == "item_reference":
        raise ValueError("item_reference needs stored items, and this server stores none: send the item itself")
    return item


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise ValueError(
                f"tool type {kind!r} is not supported: this server runs only function tools, which the client runs"
            )
        return data


class NamedFunctionChoice(StrictModel):
    type: Literal["function"]
    name: str


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


class TextConfig(StrictModel):
    IGNORED = frozenset({"verbosity"})

    format: TextFormat | None = None
    verbosity: str | None = None


# accepted and ignored: they change nothing a stateless server with these models generates
_IGNORED = frozenset(
    {"store", "metadata", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier"}
    | {"reasoning", "include", "truncation", "stream_options", "prompt_cache_options", "moderation"}
)
# refused by name, with why
_REFUSED = {
    "previous_response_id": "this server stores no responses (stateless): send the conversation as input items",
    "conversation": "this server stores no conversations (stateless): send the conversation as input items",
    "background": "background responses need a store, and this server keeps none",
    "prompt": "stored prompt templates are not supported: send instructions and input",
    "max_tool_calls": "max_tool_calls is not supported",
    "top_logprobs": "top_logprobs is not supported on /v1/responses yet: use /v1/chat/completions",
    "context_management": "context management is not supported",
}


class ResponsesRequest(StrictModel):
    """The body of `POST /v1/responses`."""

    IGNORED = _IGNORED

    model: str | None = None
    input: str | list[Item] = Field(max_length=MAX_PROMPT_CHARS)
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: str | None = None
    stream_options: dict[str, Any] | None = None
    moderation: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    context_management: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _items_typed(cls, value: Any) -> Any:
        return [_typed(item) for item in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _refuse_unbuilt(self) -> ResponsesRequest:
        for name, why in _REFUSED.items():
            if getattr(self, name) not in (None, False, 0):  # their off values are what is built
                raise InvalidRequest(why, param=name)
        return self

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":  # calls join the turn they follow
                    last["tool_calls"] = [*(last.get("tool_calls") or ()), call]
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        return messages

    def to_chat(self) -> ChatCompletionRequest:
        fields: dict[str, Any] = {"messages": self._messages(), "stream": self.stream}
        given = {"model": self.model, "max_tokens": self.max_output_tokens, "temperature": self.temperature}
        given |= {"top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls, "user": self.user}
        fields |= {key: value for key, value in given.items() if value is not None}
        if self.tools:
            fields["tools"] = [
                {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                for tool in self.tools
            ]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            fields["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            fields["tool_choice"] = self.tool_choice
        form = self.text.format if self.text is not None else None
        if form is not None and form.type == "json_schema":
            schema = {"name": form.name or "output", "schema": form.schema_, "strict": form.strict}
            fields["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif form is not None:
            fields["response_format"] = {"type": form.type}
        return ChatCompletionRequest.translated(fields)


# -- the response object


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputReasoning(BaseModel):
    """A reasoning model's thinking (`--reasoning-parser`), as its text (no summary is written)."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = []
    content: list[ReasoningText]
    status: Literal["completed", "incomplete", "in_progress"] = "completed"


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["completed", "incomplete", "in_progress"] = "completed"


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[OutputMessage | OutputReasoning | OutputFunctionCall]
    incomplete_details: IncompleteDetails | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    previous_response_id: None = None
    store: bool = False
    text: dict[str, Any] = {"format": {"type": "text"}}
    truncation: str = "disabled"
    metadata: dict[str, str] = {}
    usage: ResponseUsage | None = None
