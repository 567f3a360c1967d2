"""Tool calls out of a model's streamed text, one parser per format and per choice.

A parser is fed the answer's text as it streams and returns what can be told apart so far: plain
content (a `str`) and finished calls (`ToolCall`). Text that may still turn into a call is held
back, so no client ever sees half a `<tool_call>` tag as content. A call goes out whole, when its
closing tag arrives: the OpenAI chunk format allows the arguments in one delta, and streamed and
non-streamed answers then carry the very same calls.

Whitespace at the edges of a call (the newline between two calls, say) is not content: a parser
holds trailing whitespace back and drops it when a call follows. It does so however the text is cut
into deltas, so streaming never changes what the content is.
"""

from __future__ import annotations

import json
import uuid
from typing import Protocol

from tokenmill.generation import ToolCall

Parsed = str | ToolCall


class ToolCallParser(Protocol):
    @property
    def calls(self) -> int:
        """How many calls have been parsed so far."""

    def feed(self, text: str) -> list[Parsed]: ...

    def finish(self, cut: bool = False) -> list[Parsed]:
        """The rest, at the end of the answer (an unterminated call still counts if its JSON is whole).
        `cut`: the answer was cut short (max_tokens), so an unterminated call whose JSON is not whole
        was a call the model had no room to finish: it is dropped, never sent as content."""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_from_json(text: str) -> ToolCall | None:
    """`{"name": ..., "arguments" | "parameters": {...}}` as a call; None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return _call_from_object(value)


def _call_from_object(value: object) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=new_call_id(), name=value["name"], arguments=json.dumps(arguments, ensure_ascii=False))


class _Output:
    """Collects a parser's output, keeping trailing whitespace back until it knows what follows."""

    def __init__(self) -> None:
        self.calls = 0
        self._held = ""
        self._out: list[Parsed] = []

    def content(self, text: str) -> None:
        body = text.rstrip()
        if body:
            self._out.append(self._held + body)
            self._held = ""
        self._held += text[len(body) :]

    def call(self, call: ToolCall) -> None:
        self._held = ""
        self.calls += 1
        self._out.append(call)

    def drop_held(self) -> None:
        """What an unfinished call leaves: the whitespace before it is no content either."""
        self._held = ""

    def take(self, final: bool = False) -> list[Parsed]:
        if final and self._held and not self.calls:
            self._out.append(self._held)
        out, self._out = self._out, []
        return out


def open_prefix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that could be the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class HermesParser:
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._output = _Output()
        self._buffer = ""
        self._inside = False

    @property
    def calls(self) -> int:
        return self._output.calls

    def feed(self, text: str) -> list[Parsed]:
        self._buffer += text
        while True:
            if self._inside:
                end = self._buffer.find(self.END)
                if end < 0:
                    break
                self._close(self._buffer[:end], terminated=True)
                self._buffer = self._buffer[end + len(self.END) :]
                self._inside = False
            else:
                start = self._buffer.find(self.START)
                if start < 0:
                    keep = open_prefix(self._buffer, self.START)
                    self._output.content(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                self._output.content(self._buffer[:start])
                self._buffer = self._buffer[start + len(self.START) :]
                self._inside = True
        return self._output.take()

    def finish(self, cut: bool = False) -> list[Parsed]:
        if self._inside:
            self._close(self._buffer, terminated=False, cut=cut)
        else:
            self._output.content(self._buffer)
        self._buffer = ""
        return self._output.take(final=True)

    def _close(self, body: str, terminated: bool, cut: bool = False) -> None:
        call = call_from_json(body.strip())
        if call is not None:
            self._output.call(call)
        elif cut:  # an unfinished call, not content
            self._output.drop_held()
        else:  # not a call after all: the client gets the text as the model wrote it
            self._output.content(self.START + body + (self.END if terminated else ""))


class Llama3JsonParser:
    """The whole answer is the call (or calls, joined by `;`), maybe after `<|python_tag|>`;
    anything else is content, streamed as it comes."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self._output = _Output()
        self._buffer = ""
        self._mode: str | None = None  # None until the first non-blank text: "call" or "content"

    @property
    def calls(self) -> int:
        return self._output.calls

    def feed(self, text: str) -> list[Parsed]:
        if self._mode == "content":
            self._output.content(text)
            return self._output.take()
        self._buffer += text
        if self._mode is None:
            head = self._buffer.lstrip()
            if head.startswith(("{", self.TAG)):
                self._mode = "call"
            elif head and not self.TAG.startswith(head):
                self._mode = "content"
                self._output.content(self._buffer)
                self._buffer = ""
        return self._output.take()

    def finish(self, cut: bool = False) -> list[Parsed]:
        calls = self._calls(self._buffer.strip().removeprefix(self.TAG)) if self._mode == "call" else None
        if calls:
            for call in calls:
                self._output.call(call)
        elif self._mode == "call" and cut:  # an unfinished call, not content
            self._output.drop_held()
        else:
            self._output.content(self._buffer)
        self._buffer = ""
        return self._output.take(final=True)

    @staticmethod
    def _calls(text: str) -> list[ToolCall] | None:
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(text):
            try:
                value, at = decoder.raw_decode(text, at)
            except ValueError:
                return None
            call = _call_from_object(value)
            if call is None:
                return None
            calls.append(call)
            at = len(text) - len(text[at:].lstrip().removeprefix(";").lstrip())
        return calls
