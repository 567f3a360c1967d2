"""Reasoning split from the answer (`tokenmill.reasoning`): the parser alone, at every place a
stream can cut the text, and the setup a template or a prefill gives it."""

from __future__ import annotations

import pytest

from tokenmill.reasoning import REASONING_FORMATS, Reasoning, ReasoningSetup, ThinkParser, format_for_template

THINK = REASONING_FORMATS["think"]


def split(chunks: list[str], opened: bool = False) -> tuple[str, str]:
    parser = ThinkParser(THINK, opened)
    pieces = [piece for chunk in chunks for piece in parser.feed(chunk)] + parser.finish()
    reasoning = "".join(p.text for p in pieces if isinstance(p, Reasoning))
    content = "".join(p for p in pieces if isinstance(p, str))
    assert all((p.text if isinstance(p, Reasoning) else p) for p in pieces), pieces  # no empty pieces
    return reasoning, content


def every_cut(text: str) -> list[list[str]]:
    """The text in one piece, in single characters, and cut in two at every place."""
    return [[text], list(text), *([text[:i], text[i:]] for i in range(1, len(text)))]


@pytest.mark.parametrize(
    ("text", "opened", "reasoning", "content"),
    [
        ("<think>\nI add 2 and 2.\n</think>\n\nThe answer is 4.", False, "\nI add 2 and 2.\n", "The answer is 4."),
        ("\n  <think>x</think>y", False, "x", "y"),  # whitespace before the open tag is neither
        ("The answer is 4.", False, "", "The answer is 4."),  # no thinking: all content, as written
        ("Hello <think>x</think>", False, "", "Hello <think>x</think>"),  # tags after the answer began: content
        ("I add them.</think>4", True, "I add them.", "4"),  # the prompt opened the reasoning
        ("<think>never closed", False, "never closed", ""),  # an unclosed reasoning stays reasoning
        ("<thi", False, "", "<thi"),  # a tag's start that never became one is content
        ("<think>a < b and c </thin k></think>ok", False, "a < b and c </thin k>", "ok"),
        ("<think>a</think>b</think>c", False, "a", "b</think>c"),  # after the answer began: content
    ],
)
def test_the_split_is_the_same_wherever_the_stream_cuts_the_text(text, opened, reasoning, content):
    for chunks in every_cut(text):
        assert split(chunks, opened) == (reasoning, content), chunks


def test_the_format_comes_from_the_template_and_a_prompt_or_prefill_may_open_it():
    assert format_for_template("{{ '<think>\\n' }}...{{ '</think>' }}") is THINK
    assert format_for_template("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert format_for_template(None) is None
    assert THINK.opened_by("<|assistant|>\n<think>\n") and not THINK.opened_by("<think>a</think>b")
    setup = ReasoningSetup(THINK, opened=False)
    assert setup.after_prefill("<think>Let me see") == ReasoningSetup(THINK, True)
    assert setup.after_prefill("<think>done</think>So") == ReasoningSetup(THINK, False)
    opened = ReasoningSetup(THINK, opened=True)
    assert opened.after_prefill("First, ") is opened  # no tag in it: the template's prompt decides
