"""How one model family writes tool calls: in its prompt, in its output, and as a grammar.

A format knows three things about a family's tool-call syntax:
- how to show the tools and past calls to a model whose chat template cannot (`instructions`,
  `render_calls`): only then does tokenmill write the prompt's tool section itself;
- the Lark grammar that forces a call (`tool_choice` "required" or a named function), with each
  call's arguments held to its function's JSON schema by llguidance's `%json`;
- a parser for its output (`parser`), fed text as it streams.

The default model's template (SmolLM2's ChatML) has no tool section, so tokenmill writes one in the
Hermes form, the one most open models are trained on; that keeps the parser and the grammar the
same for every model whose template is silent about tools.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from tokenmill.generation import ToolCall, ToolFunction
from tokenmill.json_schema import closed_objects
from tokenmill.tools.parsing import HermesParser, Llama3JsonParser, ToolCallParser

# Calls are written the way the model saw them in its prompt and training (Python's json.dumps
# spacing), with no free whitespace: fewer ways to wander (llguidance's schema extension).
_SPACING = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ToolCallFormat(Protocol):
    name: str

    def instructions(self, tools: Sequence[ToolFunction]) -> str:
        """The system-prompt section that declares the tools, for templates without one."""

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        """An assistant turn's calls as the model would have written them."""

    def render_result(self, content: str) -> str:
        """A tool's answer, as the user turn that carries it back."""

    def grammar(self, tools: Sequence[ToolFunction], parallel: bool) -> str:
        """Lark: the output is one call (or, when `parallel`, one or more) to one of `tools`."""

    def parser(self) -> ToolCallParser: ...


def declaration(tool: ToolFunction) -> dict:
    """A tool in OpenAI's request form: what chat templates and prompts show the model."""
    function = {"name": tool.name, "description": tool.description, "parameters": json.loads(tool.parameters)}
    return {"type": "function", "function": function}


def _call_schema(tool: ToolFunction, arguments_key: str, definitions: dict[str, Any]) -> dict:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            arguments_key: _hoisted(closed_objects(json.loads(tool.parameters)), f"{tool.name}.", definitions),
        },
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def _hoisted(schema: dict[str, Any], prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """A parameters schema nested inside the call's: its `$defs` move to the top (where its `$ref`s
    point), renamed per tool so that two tools' definitions never collide."""
    local = {**schema.pop("definitions", {}), **schema.pop("$defs", {})}
    if not local:
        return schema

    def renamed(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            for old in ("#/$defs/", "#/definitions/"):
                if isinstance(ref, str) and ref.startswith(old):
                    node = {**node, "$ref": "#/$defs/" + prefix + ref.removeprefix(old)}
            return {key: renamed(value) for key, value in node.items()}
        if isinstance(node, list):
            return [renamed(value) for value in node]
        return node

    definitions.update({prefix + name: renamed(value) for name, value in local.items()})
    return renamed(schema)


def _json_rule(tools: Sequence[ToolFunction], arguments_key: str) -> str:
    definitions: dict[str, Any] = {}
    schemas = [_call_schema(tool, arguments_key, definitions) for tool in tools]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if definitions:
        schema["$defs"] = definitions
    return "%json " + json.dumps({**schema, "x-guidance": _SPACING})


class HermesFormat:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`: Hermes, Qwen 2/2.5/3, and the fallback."""

    name = "hermes"

    def instructions(self, tools: Sequence[ToolFunction]) -> str:
        listed = "\n".join(json.dumps(declaration(tool)) for tool in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        return "\n".join(
            f'<tool_call>\n{{"name": {json.dumps(call.name)}, "arguments": {call.arguments}}}\n</tool_call>'
            for call in calls
        )

    def render_result(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def grammar(self, tools: Sequence[ToolFunction], parallel: bool) -> str:
        calls = 'call ("\\n" call)*' if parallel else "call"
        return (
            f'start: {calls}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: {_json_rule(tools, "arguments")}\n'
        )

    def parser(self) -> ToolCallParser:
        return HermesParser()


class Llama3JsonFormat:
    """Llama 3.1-3.3's JSON form: the whole answer is `{"name": ..., "parameters": {...}}`."""

    name = "llama3_json"

    def instructions(self, tools: Sequence[ToolFunction]) -> str:
        listed = "\n\n".join(json.dumps(declaration(tool)) for tool in tools)
        return (
            "Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
            f"value}}. Do not use variables.\n\n{listed}"
        )

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        return "; ".join(f'{{"name": {json.dumps(call.name)}, "parameters": {call.arguments}}}' for call in calls)

    def render_result(self, content: str) -> str:
        return content

    def grammar(self, tools: Sequence[ToolFunction], parallel: bool) -> str:
        calls = 'call ("; " call)*' if parallel else "call"
        return f"start: {calls}\ncall: {_json_rule(tools, 'parameters')}\n"

    def parser(self) -> ToolCallParser:
        return Llama3JsonParser()


FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (HermesFormat(), Llama3JsonFormat())}


def format_for_template(source: str | None) -> ToolCallFormat:
    """The format a chat template's model was trained on, read off the template's own text."""
    text = source or ""
    if "<|python_tag|>" in text or "ipython" in text:
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]  # Hermes/Qwen templates, and the section tokenmill writes for the rest


def template_renders_tools(source: str | None) -> bool:
    """Whether a chat template has a tool section of its own (it reads the `tools` variable)."""
    return source is not None and "tools" in source
