"""Turn a request's event stream into wire formats: OpenAI JSON bodies and SSE chunk streams.

Every stream ends with `data: [DONE]`; a failure mid-stream (deadline, drain, engine) is sent as an
error event first, so a client can always tell a finished answer from a broken one. Closing the
generation is not done here: `responses.GenerationResponse` owns that.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from tokenmill.errors import EngineFailure, TokenmillError
from tokenmill.generation import Finished, TextDelta, TokenLogprob, Usage
from tokenmill.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    UsageOut,
)
from tokenmill.server.errors import error_body
from tokenmill.server.serving import Generation
from tokenmill.server.sse import DONE, data_event, json_event

log = logging.getLogger(__name__)


async def collect(generation: Generation) -> tuple[str, Finished, list[TokenLogprob]]:
    """Run a request to the end; returns its whole text, how it finished, and its tokens' logprobs."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async for event in generation.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
            logprobs.extend(event.logprobs)
        else:
            return "".join(parts), event, logprobs
    raise EngineFailure("the generation ended without a finish event")


def _asked_logprobs(generation: Generation) -> bool:
    return generation.params.logprobs is not None


async def chat_completion(generation: Generation, completion_id: str, created: int, model: str) -> ChatCompletion:
    text, finished, logprobs = await collect(generation)
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=text),
                finish_reason=finished.reason,
                logprobs=ChatLogprobs.of(logprobs) if _asked_logprobs(generation) else None,
            )
        ],
        usage=UsageOut.of(finished.usage),
    )


async def text_completion(generation: Generation, completion_id: str, created: int, model: str) -> Completion:
    text, finished, logprobs = await collect(generation)
    return Completion(
        id=completion_id,
        created=created,
        model=model,
        choices=[
            CompletionChoice(
                text=text,
                finish_reason=finished.reason,
                logprobs=CompletionLogprobs.of(logprobs) if _asked_logprobs(generation) else None,
            )
        ],
        usage=UsageOut.of(finished.usage),
    )


def _running_usage(generation: Generation, delta: TextDelta) -> UsageOut:
    """vLLM's continuous usage: the counts so far, in every chunk."""
    return UsageOut.of(Usage(generation.handle.prompt_tokens or 0, delta.generated))


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
    generation: Generation,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    continuous_usage: bool = False,
) -> AsyncIterator[bytes]:
    with_usage = include_usage or continuous_usage

    def chunk(delta: ChatDelta, finish=None, usage=None, choices=True, logprobs=None) -> bytes:
        body = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)] if choices else [],
            usage=usage,
        )
        return data_event(body.model_dump_json(exclude=None if with_usage else {"usage"}))

    async def body() -> AsyncIterator[bytes]:
        yield chunk(ChatDelta(role="assistant", content=""))
        async for event in generation.events():
            if isinstance(event, TextDelta):
                yield chunk(
                    ChatDelta(content=event.text),
                    usage=_running_usage(generation, event) if continuous_usage else None,
                    logprobs=ChatLogprobs.of(event.logprobs) if event.logprobs else None,
                )
            else:
                final = UsageOut.of(event.usage)
                yield chunk(ChatDelta(), finish=event.reason, usage=final if continuous_usage else None)
                if include_usage:
                    yield chunk(ChatDelta(), usage=final, choices=False)

    return _guarded(generation, body)


def completion_stream(
    generation: Generation,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    continuous_usage: bool = False,
) -> AsyncIterator[bytes]:
    with_usage = include_usage or continuous_usage
    offset = 0  # the completions form gives each token's offset in the whole text

    def chunk(text: str, finish=None, usage=None, choices=True, logprobs=None) -> bytes:
        body = Completion(
            id=completion_id,
            created=created,
            model=model,
            choices=[CompletionChoice(text=text, finish_reason=finish, logprobs=logprobs)] if choices else [],
            usage=usage,
        )
        return data_event(body.model_dump_json(exclude=None if with_usage else {"usage"}))

    async def body() -> AsyncIterator[bytes]:
        nonlocal offset
        async for event in generation.events():
            if isinstance(event, TextDelta):
                logprobs = CompletionLogprobs.of(event.logprobs, offset) if event.logprobs else None
                offset += sum(len(entry.token) for entry in event.logprobs)
                usage = _running_usage(generation, event) if continuous_usage else None
                yield chunk(event.text, usage=usage, logprobs=logprobs)
            else:
                final = UsageOut.of(event.usage)
                yield chunk("", finish=event.reason, usage=final if continuous_usage else None)
                if include_usage:
                    yield chunk("", usage=final, choices=False)

    return _guarded(generation, body)


def token_stream(generation: Generation) -> AsyncIterator[bytes]:
    """The simple `/stream` format: `data: <token text>` per token."""

    async def body() -> AsyncIterator[bytes]:
        async for event in generation.events():
            if isinstance(event, TextDelta):
                yield data_event(event.text)

    return _guarded(generation, body)
