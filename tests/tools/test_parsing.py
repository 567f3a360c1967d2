"""Tool calls parsed out of streamed text: the same calls and content however the text is cut."""

from __future__ import annotations

import json

import pytest

from tokenmill.generation import ToolCall
from tokenmill.tools.parsing import HermesParser, Llama3JsonParser

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def parse(parser, pieces: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    out = [item for piece in pieces for item in parser.feed(piece)] + parser.finish()
    content = "".join(item for item in out if isinstance(item, str))
    calls = [(item.name, json.loads(item.arguments)) for item in out if isinstance(item, ToolCall)]
    return content, calls


def every_cut(text: str) -> list[list[str]]:
    """The text whole, one character at a time, and cut in two at every place."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (CALL, "", [("get_weather", {"city": "Paris"})]),
        (f"Let me check.\n{CALL}\n{CALL}\n", "Let me check.", [("get_weather", {"city": "Paris"})] * 2),
        ("It is sunny <b>today</b>.", "It is sunny <b>today</b>.", []),
        ("a < b and <tool", "a < b and <tool", []),  # a tag's beginning, never finished: content after all
        ('<tool_call>{"name": "f", "arguments": {}}', "", [("f", {})]),  # cut off before the closing tag
        ("<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", []),
        ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', "", [("f", {"x": 1})]),
    ],
)
def test_hermes_calls_and_content_do_not_depend_on_how_the_text_streams(text, content, calls):
    for pieces in every_cut(text):
        assert parse(HermesParser(), pieces) == (content, calls), pieces


def test_hermes_holds_back_a_possible_tag_and_nothing_else():
    parser = HermesParser()
    assert parser.feed("The answer <tool") == ["The answer"]  # " <tool" may open a call
    assert parser.feed("kit> is here") == [" <toolkit> is here"]
    assert parser.finish() == []


def test_hermes_counts_its_calls():
    parser = HermesParser()
    parse(parser, [CALL, CALL])
    assert parser.calls == 2


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
        (
            '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"k": 2}}',
            "",
            [("a", {}), ("b", {"k": 2})],
        ),
        ("The weather is fine.", "The weather is fine.", []),
        ('{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
        ('  {"name": "f", "parameters": {}', '  {"name": "f", "parameters": {}', []),  # cut off: not a call
    ],
)
def test_llama3_json_calls_and_content_do_not_depend_on_how_the_text_streams(text, content, calls):
    for pieces in every_cut(text):
        assert parse(Llama3JsonParser(), pieces) == (content, calls), pieces


def test_llama3_json_streams_plain_content_as_it_comes():
    parser = Llama3JsonParser()
    assert parser.feed("Hello") == ["Hello"]
    assert parser.feed(" there") == [" there"]


@pytest.mark.parametrize("parser_type", [HermesParser, Llama3JsonParser])
@pytest.mark.parametrize("cut_at", [11, 14, 40])
def test_a_call_cut_short_by_max_tokens_is_dropped_not_sent_as_content(parser_type, cut_at):
    """A call the model had no room to finish is no content: the client sees finish_reason length and
    no tag text. Without the cut (the model stopped there), the text is content as before."""
    whole = CALL if parser_type is HermesParser else '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    text = "Checking.\n" + whole[:cut_at] if parser_type is HermesParser else whole[:cut_at]
    for pieces in every_cut(text):
        parser = parser_type()
        out = [item for piece in pieces for item in parser.feed(piece)] + parser.finish(cut=True)
        content = "".join(item for item in out if isinstance(item, str))
        assert content == ("Checking." if parser_type is HermesParser else ""), pieces
        assert not any(isinstance(item, ToolCall) for item in out)
    assert parse(parser_type(), [text])[0].rstrip() == text.rstrip()
