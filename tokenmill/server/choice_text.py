"""One chat choice's output on its way to the client: its reasoning, its content, and the tool calls in it.

With tools offered, a local model's calls are written in its text (`tokenmill.tools` parses them);
an upstream API sends them ready-made, as deltas. Either way they leave here as OpenAI's tool-call
deltas, numbered per choice, and the non-streamed body is assembled from the very same deltas, so a
streamed answer and a whole one carry identical calls. A model that thinks in tags has its
reasoning split off first (`tokenmill.reasoning`): only the answer is searched for calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

from tokenmill.generation import Finished, FinishReason, TextDelta, TokenEvent, ToolCall, ToolCallDelta
from tokenmill.reasoning import Reasoning, ThinkParser
from tokenmill.tools import ToolCallParser

Piece = str | ToolCallDelta | Reasoning


class ChoiceText:
    """`reasoning`: the choice's reasoning parser (None: the text is not split); `keep_reasoning`
    False drops the reasoning (the client asked for the answer only)."""

    def __init__(
        self,
        parser: Callable[[], ToolCallParser] | None = None,
        reasoning: Callable[[], ThinkParser] | None = None,
        keep_reasoning: bool = True,
    ):
        self._parser = parser() if parser is not None else None
        self._reasoning = reasoning() if reasoning is not None else None
        self._keep_reasoning = keep_reasoning
        self._calls = 0

    def feed(self, text: str, upstream_calls: Sequence[ToolCallDelta] = ()) -> list[Piece]:
        pieces: list[Piece] = []
        if self._reasoning is None:
            pieces.extend(self._answer(text))
        else:
            for part in self._reasoning.feed(text):
                pieces.extend(self._answer(part) if isinstance(part, str) else self._thought(part))
        for delta in upstream_calls:
            self._calls = max(self._calls, delta.index + 1)
            pieces.append(delta)
        return pieces

    def finish(self, reason: FinishReason) -> list[Piece]:
        """The rest of the choice, once it has ended for `reason`."""
        pieces: list[Piece] = []
        if self._reasoning is not None:
            for part in self._reasoning.finish():
                pieces.extend(self._answer(part) if isinstance(part, str) else self._thought(part))
        if self._parser is not None:
            pieces.extend(self._numbered(self._parser.finish(cut=reason == "length")))
        return pieces

    def _answer(self, text: str) -> list[Piece]:
        if self._parser is None:
            return [text] if text else []
        return self._numbered(self._parser.feed(text))

    def _thought(self, reasoning: Reasoning) -> list[Piece]:
        return [reasoning] if self._keep_reasoning else []

    def finish_reason(self, reason: FinishReason) -> FinishReason:
        return "tool_calls" if self._calls and reason == "stop" else reason

    def _numbered(self, parsed: Sequence[str | ToolCall]) -> list[Piece]:
        pieces: list[Piece] = []
        for item in parsed:
            if isinstance(item, str):
                pieces.append(item)
            else:
                pieces.append(ToolCallDelta(self._calls, item.arguments, item.id, item.name))
                self._calls += 1
        return pieces


async def pieces_of(events: AsyncIterator[TokenEvent], output: ChoiceText) -> AsyncIterator[Piece | Finished]:
    """A choice's content and calls as they can be told apart, then its Finished event: what a
    renderer in any wire format walks."""
    async for event in events:
        if isinstance(event, TextDelta):
            for piece in output.feed(event.text, event.tool_calls):
                yield piece
            continue
        for piece in output.finish(event.reason):
            yield piece
        yield event
        return


def reasoning_of(pieces: Sequence[Piece]) -> str | None:
    """A finished choice's reasoning (None: there was none)."""
    thought = "".join(piece.text for piece in pieces if isinstance(piece, Reasoning))
    return thought or None


def whole(pieces: Sequence[Piece]) -> tuple[str, list[ToolCall]]:
    """A finished choice's content, and its calls assembled from their deltas."""
    content = "".join(piece for piece in pieces if isinstance(piece, str))
    calls: dict[int, list[ToolCallDelta]] = {}
    for piece in pieces:
        if isinstance(piece, ToolCallDelta):
            calls.setdefault(piece.index, []).append(piece)
    assembled = [
        ToolCall(
            id=next((d.id for d in parts if d.id), ""),
            name=next((d.name for d in parts if d.name), ""),
            arguments="".join(d.arguments for d in parts),
        )
        for _, parts in sorted(calls.items())
    ]
    return content, assembled
