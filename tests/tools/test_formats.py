"""Each tool-call format's grammar admits exactly the calls its parser reads, with valid arguments."""

from __future__ import annotations

import json

import llguidance
import pytest

from tokenmill.engines.llamacpp import load_tokenizer
from tokenmill.engines.model_files import default_model_path
from tokenmill.engines.structured import grammar_for
from tokenmill.generation import ToolCall, ToolFunction
from tokenmill.sampling import OutputGrammar
from tokenmill.tools import FORMATS, format_for_template

WEATHER = ToolFunction(
    "get_weather",
    parameters=json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        }
    ),
)
TIME = ToolFunction("get_time")


@pytest.fixture(scope="module")
def tokenizer():
    model = load_tokenizer(default_model_path(), 2048)
    return model, model.structured_tokenizer()


def admits(tokenizer, grammar: str, text: str) -> bool:
    model, ll = tokenizer
    matcher = llguidance.LLMatcher(ll, grammar_for(OutputGrammar("lark", grammar, "tools")), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    for token in model.encode(text, add_special=False):
        if not matcher.consume_token(token):
            return False
    return matcher.is_accepting()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_forced_call_must_name_a_tool_and_give_arguments_valid_for_its_schema(tokenizer, name):
    form = FORMATS[name]
    grammar = form.grammar([WEATHER, TIME], parallel=False)

    def call(tool: str, arguments: dict) -> str:
        return form.render_calls([ToolCall("x", tool, json.dumps(arguments))])

    assert admits(tokenizer, grammar, call("get_weather", {"city": "Oslo", "unit": "c"}))
    assert admits(tokenizer, grammar, call("get_time", {}))
    assert not admits(tokenizer, grammar, call("get_stock", {}))  # no such tool
    assert not admits(tokenizer, grammar, call("get_weather", {"city": "Oslo"}))  # a required argument missing
    assert not admits(tokenizer, grammar, call("get_weather", {"city": "Oslo", "unit": "k"}))  # outside the enum
    assert not admits(tokenizer, grammar, "It is sunny.")  # no call at all


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_parallel_calls_only_when_allowed(tokenizer, name):
    form = FORMATS[name]
    two = form.render_calls([ToolCall("a", "get_time", "{}"), ToolCall("b", "get_time", "{}")])
    assert admits(tokenizer, form.grammar([TIME], parallel=True), two)
    assert not admits(tokenizer, form.grammar([TIME], parallel=False), two)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_parser_reads_the_calls_the_format_writes(name):
    form = FORMATS[name]
    calls = [ToolCall("a", "get_weather", '{"city": "Oslo", "unit": "c"}'), ToolCall("b", "get_time", "{}")]
    parser = form.parser()
    parsed = parser.feed(form.render_calls(calls)) + parser.finish()
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [(c.name, json.loads(c.arguments)) for c in calls]


def test_the_format_is_read_off_the_template():
    assert format_for_template(None).name == "hermes"  # the default model's ChatML says nothing about tools
    assert format_for_template("{{ '<tool_call>' }}{{ tools }}").name == "hermes"
    assert format_for_template("{{ '<|python_tag|>' }}{% if m.role == 'ipython' %}").name == "llama3_json"
