"""The model's chat template gets what the client sent, `name` included."""

from __future__ import annotations

from tokenmill.engines.chat_template import ChatTemplate
from tokenmill.generation import ChatMessage
from tokenmill.protocol import ChatCompletionRequest

NAMED = "{% for m in messages %}[{{ m['role'] }}{% if m['name'] %}:{{ m['name'] }}{% endif %}] {{ m['content'] }}\n{% endfor %}"


def test_a_message_name_reaches_a_template_that_renders_it():
    # Before: `messages[].name` was accepted and then dropped on the way to the template.
    body = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi", "name": "ada"}, {"role": "user", "content": "yo"}]
    )
    text = ChatTemplate(NAMED, bos_token="", eos_token="").render(body.chat_messages())
    assert text == "[user:ada] hi\n[user] yo\n"


def test_templates_that_ignore_names_render_the_same_with_or_without_one():
    template = ChatTemplate(None, bos_token="", eos_token="")
    assert template.render([ChatMessage("user", "hi", name="ada")]) == template.render([ChatMessage("user", "hi")])
