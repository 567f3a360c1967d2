"""The model's chat template gets what the client sent, `name` included."""

from __future__ import annotations

from tokenmill.engines.chat_template import ChatTemplate
from tokenmill.generation import ChatMessage, ToolCall, ToolFunction
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


WEATHER = ToolFunction(
    "get_weather", "Weather in a city", '{"type": "object", "properties": {"city": {"type": "string"}}}'
)
ROUND_TRIP = [
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
    ChatMessage("tool", "18 C", tool_call_id="call_1"),
]
# the shape of Qwen 2.5's tool section, cut down: it reads `tools`, `tool_calls` and the tool role itself
NATIVE = (
    "{% if tools %}TOOLS{% for t in tools %} {{ t.function.name }}:{{ t.function.parameters.properties | list | join(',') }}"
    "{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}{% if m.tool_calls %}[{{ m.role }}]{% for c in m.tool_calls %} CALL {{ c.function.name }}"
    " {{ c.function.arguments.city }}{% endfor %}{{ '\\n' }}{% elif m.role == 'tool' %}[tool {{ m.tool_call_id }}] "
    "{{ m.content }}{{ '\\n' }}{% else %}[{{ m.role }}] {{ m.content }}{{ '\\n' }}{% endif %}{% endfor %}"
)


def test_a_template_with_a_tool_section_gets_the_tools_and_calls_as_hugging_face_passes_them():
    text = ChatTemplate(NATIVE, bos_token="", eos_token="").render(ROUND_TRIP, [WEATHER])
    assert (
        text
        == "TOOLS get_weather:city\n[user] Weather in Paris?\n[assistant] CALL get_weather Paris\n[tool call_1] 18 C\n"
    )


def test_a_template_without_one_gets_the_tools_written_into_the_conversation():
    text = ChatTemplate(None, bos_token="", eos_token="").render(ROUND_TRIP, [WEATHER])
    system, user, call, result, opened = text.split("<|im_end|>\n")
    assert system.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in system
    assert "<tool_call>" in system  # how to call, in the form the parser reads
    assert user == "<|im_start|>user\nWeather in Paris?"
    assert (
        call
        == '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert result == "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>"
    assert opened == "<|im_start|>assistant\n"


def test_the_tool_section_joins_the_clients_own_system_message():
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi")]
    text = ChatTemplate(None, bos_token="", eos_token="").render(messages, [WEATHER])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and text.count("<|im_start|>system") == 1


def test_without_tools_the_prompt_is_unchanged():
    template = ChatTemplate(None, bos_token="", eos_token="")
    assert template.render([ChatMessage("user", "hi")], ()) == template.render([ChatMessage("user", "hi")])
