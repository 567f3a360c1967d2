"""Reasoning output: the thinking a model writes before its answer, split from the answer.

Models of the DeepSeek-R1, Qwen3, SmolLM3 and gpt-oss-like families think in `<think> ... </think>`
and then answer; clients read the thinking as `reasoning_content` (vLLM, SGLang, llama.cpp's
server, Ollama), Anthropic's `thinking` blocks or the Responses API's `reasoning` item. A parser
here is pluggable by family, like the tool-call parsers: `ReasoningFormat` names the tags and
`ReasoningFormat.parser()` makes the incremental splitter for one choice.

Some templates open the thinking in the prompt itself (DeepSeek-R1's end the generation prompt with
`<think>\\n`), and a client can open it in an assistant prefill: then the output starts inside the
reasoning, and `parser(opened=True)` says so.

A reasoning parser runs before the tool-call parser: only the answer is searched for tool calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.tools.parsing import open_prefix


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A piece of a choice's reasoning text (never part of its content)."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    name: str
    open_tag: str = "<think>"
    close_tag: str = "</think>"

    def parser(self, opened: bool = False) -> ThinkParser:
        return ThinkParser(self, opened)

    def opened_by(self, prompt: str) -> bool:
        """Whether a prompt (or an assistant prefill) ending this way leaves the reasoning open."""
        return prompt.rfind(self.open_tag) > prompt.rfind(self.close_tag)


REASONING_FORMATS = {"think": ReasoningFormat("think")}


@dataclass(frozen=True, slots=True)
class ReasoningSetup:
    """The served model's reasoning format, and whether its chat prompt opens the reasoning (the
    template ends the generation prompt inside the tags)."""

    format: ReasoningFormat
    opened: bool = False

    def parser(self) -> ThinkParser:
        return self.format.parser(self.opened)

    def after_prefill(self, prefill: str) -> ReasoningSetup:
        """The same, for an answer that continues `prefill` (an assistant message begun)."""
        if self.format.open_tag not in prefill and self.format.close_tag not in prefill:
            return self
        return ReasoningSetup(self.format, self.format.opened_by(prefill))


def format_for_template(source: str | None) -> ReasoningFormat | None:
    """The reasoning format of a chat template's model, read off the template's text (None: the
    model does not think in tags, as the default model does not)."""
    if source and "<think>" in source and "</think>" in source:
        return REASONING_FORMATS["think"]
    return None


class ThinkParser:
    """Splits streamed text into `Reasoning` and content: text inside the tags is reasoning, the
    text after the close tag (less the blank lines after it) is content. Output that does not begin
    with the open tag (whitespace aside) has no reasoning: all of it is content, as written. A tag
    split across deltas is held back until it is told apart; the tags are sent in neither."""

    def __init__(self, fmt: ReasoningFormat, opened: bool = False):
        self._format = fmt
        self._state = "reasoning" if opened else "start"  # start -> reasoning -> answer
        self._buffer = ""
        self._answer_begins = False  # just past the close tag: the blank lines after it are dropped

    def feed(self, text: str) -> list[str | Reasoning]:
        self._buffer += text
        out: list[str | Reasoning] = []
        while True:
            if self._state == "answer":
                if self._answer_begins:
                    self._buffer = self._buffer.lstrip()
                    self._answer_begins = not self._buffer
                if self._buffer:
                    out.append(self._buffer)
                    self._buffer = ""
                return out
            if self._state == "start":
                head = self._buffer.lstrip()
                if head.startswith(self._format.open_tag):
                    self._buffer, self._state = head[len(self._format.open_tag) :], "reasoning"
                elif self._format.open_tag.startswith(head):
                    return out  # whitespace, or the open tag's start: not told apart yet
                else:
                    self._state = "answer"
                continue
            found = self._buffer.find(self._format.close_tag)
            if found < 0:
                keep = open_prefix(self._buffer, self._format.close_tag)
                ready, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
                if ready:
                    out.append(Reasoning(ready))
                return out
            if found:
                out.append(Reasoning(self._buffer[:found]))
            self._buffer = self._buffer[found + len(self._format.close_tag) :]
            self._state, self._answer_begins = "answer", True

    def finish(self) -> list[str | Reasoning]:
        """What is held back when the choice ends: an unclosed reasoning stays reasoning."""
        rest, self._buffer = self._buffer, ""
        if not rest or (self._answer_begins and not rest.strip()):
            return []
        return [Reasoning(rest) if self._state == "reasoning" else rest]
