"""A chat generation in Anthropic's Messages wire format: the message body, and its event stream.

The generation is the chat path's own (`routes.serve_chat`); only the rendering differs. Content
and tool calls come out of the same `ChoiceText` as in chat completions, so a streamed message and
a whole one carry the very same blocks: text runs become `text` blocks, each call a `tool_use`
block. The stream is Anthropic's: `message_start`, per block `content_block_start`, deltas
(`text_delta`, `input_json_delta`) and `content_block_stop`, then `message_delta` (stop reason,
output tokens) and `message_stop`; a failure mid-stream is an `error` event, and the stream ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence

from tokenmill.generation import Finished, ToolCallDelta
from tokenmill.protocol.anthropic import (
    AnthropicMessageOut,
    AnthropicUsage,
    StopReason,
    TextBlockOut,
    ThinkingBlockOut,
    ToolUseBlockOut,
)
from tokenmill.reasoning import Reasoning
from tokenmill.server.choice_text import ChoiceText, Piece, pieces_of
from tokenmill.server.errors import anthropic_error_body
from tokenmill.server.serving import Generation
from tokenmill.server.sse import json_event
from tokenmill.server.streams import collect, guarded, stream_error


def stop_reason(finished: Finished, called: bool) -> StopReason:
    if finished.reason == "length":
        return "max_tokens"
    if called:
        return "tool_use"
    return "stop_sequence" if finished.stop_string is not None else "end_turn"


def _usage(finished: Finished) -> AnthropicUsage:
    usage = finished.usage
    return AnthropicUsage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        cache_read_input_tokens=usage.cached_tokens,
    )


def _tool_input(call: ToolCallDelta) -> dict:
    value = json.loads(call.arguments or "{}")
    return value if isinstance(value, dict) else {}


async def message_body(
    generations: Sequence[Generation],
    message_id: str,
    created: int,
    model: str,
    new_output: Callable[[], ChoiceText] = ChoiceText,
) -> AnthropicMessageOut:
    (generation,) = generations  # the Messages API has no n
    result = await collect(generation)
    output = new_output()
    pieces = [*output.feed(result.text, result.tool_calls), *output.finish(result.finished.reason)]
    blocks: list[TextBlockOut | ThinkingBlockOut | ToolUseBlockOut] = []
    for piece in pieces:
        if isinstance(piece, str):
            if blocks and isinstance(blocks[-1], TextBlockOut):
                blocks[-1].text += piece
            else:
                blocks.append(TextBlockOut(text=piece))
        elif isinstance(piece, Reasoning):
            if blocks and isinstance(blocks[-1], ThinkingBlockOut):
                blocks[-1].thinking += piece.text
            else:
                blocks.append(ThinkingBlockOut(thinking=piece.text))
        else:
            blocks.append(ToolUseBlockOut(id=piece.id or "", name=piece.name or "", input=_tool_input(piece)))
    called = any(isinstance(block, ToolUseBlockOut) for block in blocks)
    return AnthropicMessageOut(
        id=message_id,
        model=model,
        content=blocks,
        stop_reason=stop_reason(result.finished, called),
        stop_sequence=result.finished.stop_string,
        usage=_usage(result.finished),
    )


def _event(kind: str, payload: dict) -> bytes:
    return json_event({"type": kind, **payload}, event=kind)


def error_event(request_id: str, error: Exception) -> bytes:
    """A failure, as the stream's last event."""
    return _event("error", {"error": anthropic_error_body(stream_error(request_id, error))["error"]})


class _Blocks:
    """The open content block, and the events that open, fill and close blocks."""

    def __init__(self) -> None:
        self.count = 0
        self._open: str | None = None  # "text" while a text block is open
        self.called = False

    def piece(self, piece: Piece) -> list[bytes]:
        if isinstance(piece, str):
            events = [] if self._open == "text" else [*self.close(), self._start({"type": "text", "text": ""})]
            self._open = "text"
            return [*events, self._delta({"type": "text_delta", "text": piece})]
        if isinstance(piece, Reasoning):
            events = []
            if self._open != "thinking":
                events = [*self.close(), self._start({"type": "thinking", "thinking": "", "signature": ""})]
            self._open = "thinking"
            return [*events, self._delta({"type": "thinking_delta", "thinking": piece.text})]
        self.called = True
        events = self.close()  # first: the tool block's index follows the closed one's
        events.append(self._start({"type": "tool_use", "id": piece.id or "", "name": piece.name or "", "input": {}}))
        events.append(self._delta({"type": "input_json_delta", "partial_json": piece.arguments}))
        self._open = "tool_use"
        return [*events, *self.close()]

    def close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        self.count += 1
        return [_event("content_block_stop", {"index": self.count - 1})]

    def _start(self, block: dict) -> bytes:
        return _event("content_block_start", {"index": self.count, "content_block": block})

    def _delta(self, delta: dict) -> bytes:
        return _event("content_block_delta", {"index": self.count, "delta": delta})


def message_stream(
    generations: Sequence[Generation],
    message_id: str,
    created: int,
    model: str,
    include_usage: bool,
    continuous_usage: bool = False,
    new_output: Callable[[], ChoiceText] = ChoiceText,
) -> AsyncIterator[bytes]:
    (generation,) = generations

    async def body() -> AsyncIterator[bytes]:
        prompt_tokens = generation.handle.prompt_tokens or 0
        start: dict[str, object] = {"id": message_id, "type": "message", "role": "assistant", "model": model}
        start |= {"content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = {"input_tokens": prompt_tokens, "output_tokens": 0}
        yield _event("message_start", {"message": start})
        blocks = _Blocks()
        async for item in pieces_of(generation.events(), new_output()):
            if not isinstance(item, Finished):
                for chunk in blocks.piece(item):
                    yield chunk
                continue
            event = item
            for chunk in blocks.close():
                yield chunk
            delta = {"stop_reason": stop_reason(event, blocks.called), "stop_sequence": event.stop_string}
            usage = _usage(event).model_dump()
            yield _event("message_delta", {"delta": delta, "usage": usage})
            yield _event("message_stop", {})
            return

    return guarded(message_id, body, error_event)
