"""Render chat messages with the model's own Jinja chat template (from its GGUF metadata).

Tools go to a template that has a tool section of its own as the `tools` variable, the way
Hugging Face's `apply_chat_template` passes them. For a template without one (the default model's),
the conversation is rewritten first in the tool-call format of `tokenmill.tools`: the tools declared
in the system turn, past calls written out in the assistant turns, tool results as user turns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import InvalidRequest
from tokenmill.generation import ChatMessage, ToolFunction
from tokenmill.reasoning import ReasoningFormat
from tokenmill.reasoning import format_for_template as reasoning_format_for
from tokenmill.tools import ToolCallFormat, declaration, format_for_template, template_renders_tools

# Used only for models that carry no template of their own.
CHATML_FALLBACK = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str, eos_token: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_from_template
        self._template = env.from_string(source or CHATML_FALLBACK)
        self._special = {"bos_token": bos_token, "eos_token": eos_token}
        self._native_tools = template_renders_tools(source)
        self.tool_format: ToolCallFormat = format_for_template(source)
        self.reasoning_format: ReasoningFormat | None = reasoning_format_for(source)

    def render(self, messages: Sequence[ChatMessage], tools: Sequence[ToolFunction] = ()) -> str:
        extra: dict[str, Any] = {}
        if self._native_tools:
            turns = [_native_turn(m) for m in messages]
            if tools:
                extra["tools"] = [declaration(tool) for tool in tools]
        else:
            turns = [_plain_turn(m) for m in written_out(messages, tools, self.tool_format)]
        try:
            return self._template.render(messages=turns, add_generation_prompt=True, **self._special, **extra)
        except InvalidRequest:
            raise
        except TemplateError as error:
            raise InvalidRequest(
                f"the messages do not fit the model's chat template: {error}", param="messages"
            ) from error


def _raise_from_template(message: str) -> None:
    # Templates call raise_exception() for conversations they cannot express (e.g. roles out of order).
    raise InvalidRequest(f"the model's chat template refused the messages: {message}", param="messages")


def _plain_turn(message: ChatMessage) -> dict[str, Any]:
    # `name` goes to the template as OpenAI sends it; a template that does not use it ignores it
    return {"role": message.role, "content": message.content, **({"name": message.name} if message.name else {})}


def _native_turn(message: ChatMessage) -> dict[str, Any]:
    turn = _plain_turn(message)
    if message.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def written_out(
    messages: Sequence[ChatMessage], tools: Sequence[ToolFunction], form: ToolCallFormat
) -> list[ChatMessage]:
    """The conversation with its tools, calls and results as plain text turns."""
    out: list[ChatMessage] = []
    for position, message in enumerate(messages):
        if message.role == "tool":
            result = form.render_result(message.content)
            if position and messages[position - 1].role == "tool":  # parallel calls' results: one turn
                out[-1] = ChatMessage("user", f"{out[-1].content}\n{result}")
            else:
                out.append(ChatMessage("user", result))
        elif message.tool_calls:
            calls = form.render_calls(message.tool_calls)
            out.append(ChatMessage(message.role, f"{message.content}\n{calls}" if message.content else calls))
        else:
            out.append(message)
    if tools:
        section = form.instructions(tools)
        if out and out[0].role in ("system", "developer"):
            out[0] = ChatMessage(out[0].role, f"{out[0].content}\n\n{section}", out[0].name)
        else:
            out.insert(0, ChatMessage("system", section))
    return out
