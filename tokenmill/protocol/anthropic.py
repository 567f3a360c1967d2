"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): shapes, and their
translation into a chat completion request, so one request pipeline serves both wire formats.

A request is checked in Anthropic's terms first (its fields, its blocks), then becomes a
`ChatCompletionRequest`: system -> a system message, `tool_use` blocks -> an assistant turn's
`tool_calls`, `tool_result` blocks -> `tool` messages, `tool_choice` any/tool -> required/named,
`stop_sequences` -> `stop`. Admission, tenants, quotas, deadlines, pings, drain and metrics are then
the chat path's own. No I/O.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenmill.errors import InvalidRequest
from tokenmill.protocol.chat import MAX_PROMPT_CHARS
from tokenmill.protocol.requests import ChatCompletionRequest
from tokenmill.protocol.strict import StrictModel

# block types of Anthropic's API that carry what a text model served here cannot read or run
_UNREADABLE_BLOCKS = {
    "image": "this model takes no images",
    "document": "this model takes no documents",
    "search_result": "search result blocks are not supported",
    "server_tool_use": "this server runs no server tools",
    "web_search_tool_result": "this server runs no server tools",
    "container_upload": "this server has no containers",
}


class TextBlock(StrictModel):
    IGNORED = frozenset({"cache_control", "citations"})

    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # prompt caching is automatic here (the prefix cache)
    citations: list[dict[str, Any]] | None = None


class ToolUseBlock(StrictModel):
    IGNORED = frozenset({"cache_control", "caller", "toolset_name"})

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None
    # what the SDK's own block carries when sent back with model_dump()
    caller: dict[str, Any] | None = None
    toolset_name: str | None = None


class ToolResultBlock(StrictModel):
    IGNORED = frozenset({"cache_control"})

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) or self.content is None else _joined(self.content)
        return f"Error: {body or ''}" if self.is_error else body or ""


class ThinkingBlock(StrictModel):
    """A past turn's thoughts, sent back as the SDK gave them: not fed to the model again."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


def _joined(blocks: list[TextBlock]) -> str:
    return "".join(block.text for block in blocks)


def _refuse_unreadable(blocks: Any) -> Any:
    for block in blocks if isinstance(blocks, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if isinstance(kind, str) and kind in _UNREADABLE_BLOCKS:
            raise ValueError(f"{_UNREADABLE_BLOCKS[kind]}: content blocks of type {kind!r} are not supported")
    return blocks


class AnthropicMessage(StrictModel):
    role: Literal["user", "assistant"]
    content: str | list[Block] = Field(max_length=MAX_PROMPT_CHARS)

    @field_validator("content", mode="before")
    @classmethod
    def _readable_blocks(cls, content: Any) -> Any:
        return _refuse_unreadable(content)

    def chat_messages(self) -> list[dict[str, Any]]:
        """This turn as OpenAI chat messages: tool results first (each a `tool` message), then text."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        text = "".join(block.text for block in self.content if isinstance(block, TextBlock))
        if self.role == "assistant":
            calls = [
                {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                for b in self.content
                if isinstance(b, ToolUseBlock)
            ]
            return [{"role": "assistant", "content": text or None, "tool_calls": calls or None}]
        if any(isinstance(block, ToolUseBlock) for block in self.content):
            raise InvalidRequest("tool_use blocks belong to assistant messages", param="messages")
        results = [
            {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
            for b in self.content
            if isinstance(b, ToolResultBlock)
        ]
        return results + ([{"role": "user", "content": text}] if text or not results else [])


class AnthropicTool(StrictModel):
    IGNORED = frozenset({"cache_control"})

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _custom_tools_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "custom":
            raise ValueError(
                f"tool type {kind!r} is not supported: this server runs only custom tools (name, description, "
                "input_schema), which the client runs"
            )
        return data


class AnthropicToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_for_tool(self) -> AnthropicToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice of type 'tool', and only it, names the tool")
        return self

    def chat_choice(self) -> str | dict[str, Any]:
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class Thinking(StrictModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class Metadata(StrictModel):
    user_id: str | None = None


class OutputFormat(StrictModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    model_config = ConfigDict(populate_by_name=True)


class OutputConfig(StrictModel):
    """`format`: structured output, held to the JSON schema; `effort`: accepted and ignored."""

    IGNORED = frozenset({"effort"})

    format: OutputFormat | None = None
    effort: str | None = None


class _Conversation(StrictModel):
    """What both endpoints read: the model, the turns, the system prompt and the tools."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: Thinking | None = None

    @property
    def thinking_asked(self) -> bool:
        """Extended thinking asked for: only a model that reasons can give it (the route checks)."""
        return self.thinking is not None and self.thinking.type != "disabled"

    def _chat_fields(self) -> dict[str, Any]:
        system = self.system if isinstance(self.system, str) or self.system is None else _joined(self.system)
        messages = [{"role": "system", "content": system}] if system else []
        for message in self.messages:
            messages += message.chat_messages()
        fields: dict[str, Any] = {"model": self.model, "messages": messages}
        if messages and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
            fields["continue_final_message"] = True  # Anthropic's prefill: the answer continues it
        if self.tools:
            fields["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
                }
                for t in self.tools
            ]
        if self.tool_choice is not None:
            fields["tool_choice"] = self.tool_choice.chat_choice()
            if self.tool_choice.disable_parallel_tool_use:
                fields["parallel_tool_calls"] = False
        return fields


class MessagesRequest(_Conversation):
    """The body of `POST /v1/messages`."""

    IGNORED = frozenset(
        {"metadata", "service_tier", "cache_control", "speed", "inference_geo", "diagnostics"}
        | {"user_profile_id", "workspace_id"}
    )

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    # sampling: the 2.x SDK no longer offers them as arguments, older ones and raw clients send them
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    output_config: OutputConfig | None = None
    # accepted and ignored: Anthropic's account, routing and cache controls (the prefix cache is automatic)
    metadata: Metadata | None = None  # user_id: an end-user id for Anthropic's abuse monitoring
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    speed: str | None = None
    inference_geo: str | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    # refused by name: would change the answer, not built here
    container: Any = None
    mcp_servers: Any = None

    @model_validator(mode="after")
    def _refuse_unbuilt(self) -> MessagesRequest:
        if self.container is not None:
            raise InvalidRequest("this server has no containers", param="container")
        if self.mcp_servers is not None:
            raise InvalidRequest("this server connects to no MCP servers", param="mcp_servers")
        return self

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion, one choice."""
        fields = self._chat_fields() | {"max_tokens": self.max_tokens, "stream": self.stream}
        # a reasoning model thinks whether asked or not; "disabled" leaves its thinking out
        fields["include_reasoning"] = self.thinking is None or self.thinking.type != "disabled"
        extra: dict[str, Any] = {"stop": self.stop_sequences, "temperature": self.temperature, "top_p": self.top_p}
        extra["top_k"] = self.top_k
        form = self.output_config.format if self.output_config is not None else None
        if form is not None:
            extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": form.schema_},
            }
        return ChatCompletionRequest.translated(
            fields | {key: value for key, value in extra.items() if value is not None}
        )


class CountTokensRequest(_Conversation):
    """The body of `POST /v1/messages/count_tokens`."""

    def to_chat(self) -> ChatCompletionRequest:
        return ChatCompletionRequest.translated(self._chat_fields())


# -- responses


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0  # prompt tokens served from the prefix cache
    cache_creation_input_tokens: int = 0


class TextBlockOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlockOut(BaseModel):
    """A reasoning model's thinking (`--reasoning-parser`); unsigned: nothing here checks it later."""

    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class ToolUseBlockOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class AnthropicMessageOut(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlockOut | ThinkingBlockOut | ToolUseBlockOut]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class TokenCount(BaseModel):
    input_tokens: int
