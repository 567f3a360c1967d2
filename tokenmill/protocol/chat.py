"""Chat messages, content parts and tool declarations, as OpenAI's chat API shapes them.

A message an SDK hands back (`reply.choices[0].message.model_dump()`) is accepted as it comes:
its response-only fields (`refusal`, `annotations`, `audio`, a null `function_call`, reasoning text,
litellm's `provider_specific_fields`, a streamed tool call's `index`) are declared, accepted and
ignored. Content parts the model cannot read (images, audio, files) are refused by what they are.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from tokenmill.generation import ChatMessage, ToolCall, ToolFunction
from tokenmill.json_schema import closed_objects
from tokenmill.protocol.strict import StrictModel

MAX_PROMPT_CHARS = 1_000_000


class TextPart(StrictModel):
    # extra keys on a text part (cache_control, which litellm and Anthropic-minded code add) change
    # nothing here: kept, reported as ignored
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class RefusalPart(StrictModel):
    """An assistant turn's refusal, as OpenAI writes it in content parts: text of that turn."""

    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]

# content part types of OpenAI's API that carry what a text model cannot read
_UNREADABLE_PARTS = {
    "image_url": "images",
    "input_image": "images",
    "input_audio": "audio",
    "audio": "audio",
    "file": "files",
    "input_file": "files",
    "video_url": "video",
}


class FunctionCallIn(StrictModel):
    name: str
    arguments: str  # a JSON object, as text

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            value = json.loads(arguments)
        except ValueError:
            raise ValueError("a tool call's arguments must be a JSON object, as text") from None
        if not isinstance(value, dict):
            raise ValueError("a tool call's arguments must be a JSON object, as text")  # noqa: TRY004 (pydantic wants ValueError)
        return arguments


class ToolCallIn(StrictModel):
    IGNORED = frozenset({"index"})

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn
    index: int | None = None  # a streamed delta's position, left on calls assembled from a stream


class ChatMessageIn(StrictModel):
    IGNORED = frozenset({"annotations", "audio", "reasoning_content", "reasoning", "provider_specific_fields"})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(None, max_length=MAX_PROMPT_CHARS)
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn's answer to that call
    # what a reply carried, sent back with it
    refusal: str | None = None  # the turn's text when it has no content
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None
    function_call: FunctionCallIn | None = None  # the deprecated form of tool_calls: only null is accepted
    reasoning_content: str | None = None  # a reasoning model's thoughts: not fed back, as chat templates drop them
    reasoning: str | None = None
    provider_specific_fields: dict[str, Any] | None = None  # litellm's

    @field_validator("content", mode="before")
    @classmethod
    def _readable_parts(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind in _UNREADABLE_PARTS:
                raise ValueError(
                    f"this model takes no {_UNREADABLE_PARTS[kind]}: content parts of type {kind!r} are not "
                    "supported, only 'text'"
                )
        return content

    @model_validator(mode="after")
    def _fits_role(self) -> ChatMessageIn:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.function_call is not None:
            raise ValueError("function_call is the deprecated form of tool_calls: send the call in tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages, and only they, need tool_call_id")
        if self.refusal is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry a refusal")
        if self.content is None and self.refusal is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if isinstance(part, TextPart) else part.refusal for part in self.content)

    def message(self) -> ChatMessage:
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        return ChatMessage(self.role, self.text(), self.name, calls, self.tool_call_id)


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition

    def declared(self) -> ToolFunction:
        # no parameters: a function of no arguments (OpenAI's reading), not one of any arguments
        parameters = self.function.parameters or {"type": "object", "properties": {}, "additionalProperties": False}
        return ToolFunction(self.function.name, self.function.description or "", json.dumps(parameters))


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(StrictModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(StrictModel):
    """`text`, `json_object`, or `json_schema`; a `schema` beside `json_object` (older instructor's
    JSON_SCHEMA mode, and vLLM's reading) is honoured as the schema, never dropped."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _schema_fits_type(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format json_schema needs json_schema.schema, a JSON schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema belongs to response_format type 'json_schema', not {self.type!r}")
        if self.type != "json_object" and self.schema_ is not None:
            raise ValueError("a bare schema belongs to response_format type 'json_object'")
        return self

    def json_schema_text(self) -> str | None:
        """The JSON schema the output must match, as text (None: free text); objects that list
        their properties are closed (`tokenmill.json_schema`)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return json.dumps(closed_objects(self.schema_)) if self.schema_ is not None else '{"type": "object"}'
        return json.dumps(closed_objects(self.json_schema.schema_ if self.json_schema is not None else None))
