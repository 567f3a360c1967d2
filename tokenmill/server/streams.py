"""Turn a request's event stream into wire formats: OpenAI JSON bodies and SSE chunk streams.

Every stream ends with `data: [DONE]`; a failure mid-stream (deadline, drain, engine) is sent as an
error event first, so a client can always tell a finished answer from a broken one. Closing the
generation is not done here: `responses.GenerationResponse` owns that.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from tokenmill.errors import EngineFailure, TokenmillError
from tokenmill.generation import Finished, TextDelta
from tokenmill.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    UsageOut,
)
from tokenmill.server.errors import error_body
from tokenmill.server.serving import Generation
from tokenmill.server.sse import DONE, data_event, json_event

log = logging.getLogger(__name__)


async def collect(generation: Generation) -> tuple[str, Finished]:
    """Run a request to the end; returns its whole text and how it finished."""
    parts: list[str] = []
    async for event in generation.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise EngineFailure("the generation ended without a finish event")


async def chat_completion(generation: Generation, completion_id: str, created: int, model: str) -> ChatCompletion:
    text, finished = await collect(generation)
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=finished.reason)],
        usage=UsageOut.of(finished.usage),
    )


async def text_completion(generation: Generation, completion_id: str, created: int, model: str) -> Completion:
    text, finished = await collect(generation)
    return Completion(
        id=completion_id,
        created=created,
        model=model,
        choices=[CompletionChoice(text=text, finish_reason=finished.reason)],
        usage=UsageOut.of(finished.usage),
    )


async def _guarded(generation: Generation, body: Callable[[], AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """Shared frame of every stream: an error event on failure, [DONE] last."""
    try:
        async for chunk in body():
            yield chunk
    except TokenmillError as error:
        yield json_event(error_body(error))
    except Exception as error:  # never let a stream end silently
        log.exception("stream %s failed", generation.handle.request_id)
        yield json_event(error_body(EngineFailure(f"generation failed: {type(error).__name__}")))
    yield DONE


def chat_stream(
    generation: Generation, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(delta: ChatDelta, finish=None, usage=None, choices=True) -> bytes:
        body = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)] if choices else [],
            usage=usage,
        )
        return data_event(body.model_dump_json(exclude=None if include_usage else {"usage"}))

    async def body() -> AsyncIterator[bytes]:
        yield chunk(ChatDelta(role="assistant", content=""))
        async for event in generation.events():
            if isinstance(event, TextDelta):
                yield chunk(ChatDelta(content=event.text))
            else:
                yield chunk(ChatDelta(), finish=event.reason)
                if include_usage:
                    yield chunk(ChatDelta(), usage=UsageOut.of(event.usage), choices=False)

    return _guarded(generation, body)


def completion_stream(
    generation: Generation, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(text: str, finish=None, usage=None, choices=True) -> bytes:
        body = Completion(
            id=completion_id,
            created=created,
            model=model,
            choices=[CompletionChoice(text=text, finish_reason=finish)] if choices else [],
            usage=usage,
        )
        return data_event(body.model_dump_json(exclude=None if include_usage else {"usage"}))

    async def body() -> AsyncIterator[bytes]:
        async for event in generation.events():
            if isinstance(event, TextDelta):
                yield chunk(event.text)
            else:
                yield chunk("", finish=event.reason)
                if include_usage:
                    yield chunk("", usage=UsageOut.of(event.usage), choices=False)

    return _guarded(generation, body)


def token_stream(generation: Generation) -> AsyncIterator[bytes]:
    """The simple `/stream` format: `data: <token text>` per token."""

    async def body() -> AsyncIterator[bytes]:
        async for event in generation.events():
            if isinstance(event, TextDelta):
                yield data_event(event.text)

    return _guarded(generation, body)
