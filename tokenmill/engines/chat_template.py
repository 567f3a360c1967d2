"""Render chat messages with the model's own Jinja chat template (from its GGUF metadata)."""

from __future__ import annotations

from collections.abc import Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import InvalidRequest
from tokenmill.generation import ChatMessage

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

    def render(self, messages: Sequence[ChatMessage]) -> str:
        # `name` goes to the template as OpenAI sends it; a template that does not use it ignores it
        turns = [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in messages]
        try:
            return self._template.render(messages=turns, add_generation_prompt=True, **self._special)
        except InvalidRequest:
            raise
        except TemplateError as error:
            raise InvalidRequest(
                f"the messages do not fit the model's chat template: {error}", param="messages"
            ) from error


def _raise_from_template(message: str) -> None:
    # Templates call raise_exception() for conversations they cannot express (e.g. roles out of order).
    raise InvalidRequest(f"the model's chat template refused the messages: {message}", param="messages")
