"""A chat generation as an OpenAI Responses API object, and its event stream.

Content and calls come out of the same `ChoiceText` as in chat completions: a run of text becomes a
`message` output item, each call a `function_call` item. The stream uses OpenAI's event names, each
with its `sequence_number`: `response.created`, `response.in_progress`, per item
`response.output_item.added` (and for text `response.content_part.added`, `response.output_text.delta`
..., `response.output_text.done`, `response.content_part.done`; for a call
`response.function_call_arguments.delta` and `.done`), `response.output_item.done`, then
`response.completed` (or `response.incomplete` when cut by `max_output_tokens`) carrying the whole
response, the same object the plain call returns. A failure mid-stream is an `error` event. A
reasoning model's thinking is a `reasoning` item first (`response.reasoning_text.delta` ...,
`response.reasoning_text.done`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from tokenmill.generation import Finished
from tokenmill.protocol.responses_api import (
    IncompleteDetails,
    InputTokensDetails,
    OutputFunctionCall,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from tokenmill.reasoning import Reasoning
from tokenmill.server.choice_text import ChoiceText, Piece, pieces_of
from tokenmill.server.serving import Generation
from tokenmill.server.sse import json_event
from tokenmill.server.streams import collect, guarded, stream_error

ItemStatus = Literal["completed", "incomplete", "in_progress"]


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _echoed_choice(asked: ResponsesRequest) -> str | dict[str, Any]:
    choice = asked.tool_choice
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    return choice.model_dump()


def _frame(asked: ResponsesRequest, response_id: str, created: int, model: str) -> ResponseObject:
    """The response as it starts: the request's settings echoed, no output yet."""
    chat_tools = [{"type": "function", **t.model_dump(exclude={"type"}, exclude_none=True)} for t in asked.tools or ()]
    return ResponseObject(
        id=response_id,
        created_at=created,
        status="in_progress",
        model=model,
        output=[],
        instructions=asked.instructions,
        tools=chat_tools,
        tool_choice=_echoed_choice(asked),
        parallel_tool_calls=asked.parallel_tool_calls is not False,
        temperature=asked.temperature,
        top_p=asked.top_p,
        max_output_tokens=asked.max_output_tokens,
        text=asked.text.model_dump(by_alias=True, exclude_none=True) if asked.text else {"format": {"type": "text"}},
        metadata=asked.metadata or {},
    )


def _finish(response: ResponseObject, finished: Finished) -> ResponseObject:
    usage = finished.usage
    cut = finished.reason == "length"
    return response.model_copy(
        update={
            "status": "incomplete" if cut else "completed",
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if cut else None,
            "usage": ResponseUsage(
                input_tokens=usage.prompt_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
                output_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            ),
        }
    )


Item = OutputMessage | OutputReasoning | OutputFunctionCall


def _items(pieces: Sequence[Piece], status: ItemStatus) -> list[Item]:
    items: list[Item] = []
    for piece in pieces:
        if isinstance(piece, str):
            if items and isinstance(items[-1], OutputMessage):
                items[-1].content[0].text += piece
            else:
                items.append(OutputMessage(id=_item_id("msg"), status=status, content=[OutputText(text=piece)]))
        elif isinstance(piece, Reasoning):
            if items and isinstance(items[-1], OutputReasoning):
                items[-1].content[0].text += piece.text
            else:
                items.append(OutputReasoning(id=_item_id("rs"), content=[ReasoningText(text=piece.text)]))
        else:
            call_id = piece.id or _item_id("call")
            items.append(
                OutputFunctionCall(id=_item_id("fc"), call_id=call_id, name=piece.name or "", arguments=piece.arguments)
            )
    return items


async def response_body(
    generations: Sequence[Generation],
    response_id: str,
    created: int,
    model: str,
    new_output: Callable[[], ChoiceText] = ChoiceText,
    *,
    asked: ResponsesRequest,
) -> ResponseObject:
    (generation,) = generations
    result = await collect(generation)
    output = new_output()
    pieces = [*output.feed(result.text, result.tool_calls), *output.finish(result.finished.reason)]
    status: ItemStatus = "incomplete" if result.finished.reason == "length" else "completed"
    frame = _frame(asked, response_id, created, model).model_copy(update={"output": _items(pieces, status)})
    return _finish(frame, result.finished)


class _Events:
    """Numbered events, and the output item being written."""

    def __init__(self) -> None:
        self._number = 0
        self.items: list[Item] = []
        self._text: OutputMessage | None = None
        self._thought: OutputReasoning | None = None

    def event(self, kind: str, **payload: Any) -> bytes:
        body = {"type": kind, "sequence_number": self._number, **payload}
        self._number += 1
        return json_event(body, event=kind)

    def piece(self, piece: Piece) -> list[bytes]:
        if isinstance(piece, Reasoning):
            return self._reasoning(piece.text)
        if isinstance(piece, str):
            out: list[bytes] = self.close_thought()
            if self._text is None:
                self._text, opened = self._open_text()
                out += opened
            message = self._text
            message.content[0].text += piece
            where = {"item_id": message.id, "output_index": self.items.index(message), "content_index": 0}
            return [*out, self.event("response.output_text.delta", **where, delta=piece, logprobs=[])]
        out = [*self.close_thought(), *self.close_text()]
        call = OutputFunctionCall(
            id=_item_id("fc"),
            call_id=piece.id or _item_id("call"),
            name=piece.name or "",
            arguments="",
            status="in_progress",
        )
        self.items.append(call)
        index = len(self.items) - 1
        out.append(self.event("response.output_item.added", output_index=index, item=call.model_dump()))
        where = {"item_id": call.id, "output_index": index}
        out.append(self.event("response.function_call_arguments.delta", **where, delta=piece.arguments))
        call.arguments, call.status = piece.arguments, "completed"
        out.append(
            self.event("response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments)
        )
        out.append(self.event("response.output_item.done", output_index=index, item=call.model_dump()))
        return out

    def _reasoning(self, text: str) -> list[bytes]:
        out = self.close_text()
        if self._thought is None:
            self._thought = OutputReasoning(id=_item_id("rs"), content=[], status="in_progress")
            self.items.append(self._thought)
            item = self._thought.model_dump()
            out.append(self.event("response.output_item.added", output_index=len(self.items) - 1, item=item))
            self._thought.content.append(ReasoningText(text=""))
        thought = self._thought
        thought.content[0].text += text
        where = {"item_id": thought.id, "output_index": self.items.index(thought), "content_index": 0}
        return [*out, self.event("response.reasoning_text.delta", **where, delta=text)]

    def close_thought(self) -> list[bytes]:
        if self._thought is None:
            return []
        thought, self._thought = self._thought, None
        thought.status = "completed"
        index = self.items.index(thought)
        where = {"item_id": thought.id, "output_index": index, "content_index": 0}
        return [
            self.event("response.reasoning_text.done", **where, text=thought.content[0].text),
            self.event("response.output_item.done", output_index=index, item=thought.model_dump()),
        ]

    def _open_text(self) -> tuple[OutputMessage, list[bytes]]:
        message = OutputMessage(id=_item_id("msg"), status="in_progress", content=[OutputText(text="")])
        self.items.append(message)
        index = len(self.items) - 1
        empty = OutputText(text="").model_dump()
        return message, [
            self.event("response.output_item.added", output_index=index, item=message.model_dump() | {"content": []}),
            self.event(
                "response.content_part.added", item_id=message.id, output_index=index, content_index=0, part=empty
            ),
        ]

    def close_text(self, status: ItemStatus = "completed") -> list[bytes]:
        if self._text is None:
            return []
        message, self._text = self._text, None
        message.status = status
        index = self.items.index(message)
        where = {"item_id": message.id, "output_index": index, "content_index": 0}
        part = message.content[0]
        return [
            self.event("response.output_text.done", **where, text=part.text, logprobs=[]),
            self.event("response.content_part.done", **where, part=part.model_dump()),
            self.event("response.output_item.done", output_index=index, item=message.model_dump()),
        ]


def response_stream(
    generations: Sequence[Generation],
    response_id: str,
    created: int,
    model: str,
    include_usage: bool,
    continuous_usage: bool = False,
    new_output: Callable[[], ChoiceText] = ChoiceText,
    *,
    asked: ResponsesRequest,
) -> AsyncIterator[bytes]:
    (generation,) = generations
    frame = _frame(asked, response_id, created, model)
    events = _Events()

    async def body() -> AsyncIterator[bytes]:
        yield events.event("response.created", response=frame.model_dump())
        yield events.event("response.in_progress", response=frame.model_dump())
        async for item in pieces_of(generation.events(), new_output()):
            if not isinstance(item, Finished):
                for chunk in events.piece(item):
                    yield chunk
                continue
            event = item
            for chunk in [
                *events.close_thought(),
                *events.close_text("incomplete" if event.reason == "length" else "completed"),
            ]:
                yield chunk
            done = _finish(frame.model_copy(update={"output": events.items}), event)
            kind = "response.incomplete" if done.status == "incomplete" else "response.completed"
            yield events.event(kind, response=done.model_dump())
            return

    return guarded(response_id, body, lambda request_id, error: error_event(events, request_id, error))


def error_event(events: _Events | None, response_id: str, error: Exception) -> bytes:
    error = stream_error(response_id, error)
    numbered = events or _Events()
    return numbered.event("error", code=error.code or error.error_type, message=error.message, param=error.param)


def refusal_event(response_id: str, error: Exception) -> bytes:
    """A stream refused after its headers went out (queued, then a timeout or a drain)."""
    return error_event(None, response_id, error)
