"""Turn a request's event stream into wire formats: OpenAI JSON bodies and SSE chunk streams.

Every stream ends with `data: [DONE]`; a failure mid-stream (deadline, drain, engine) is sent as an
error event first, so a client can always tell a finished answer from a broken one. Closing the
generation is not done here: `responses.GenerationResponse` owns that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from tokenmill.errors import EngineFailure, TokenmillError
from tokenmill.generation import Finished, PromptLogprobs, TextDelta, TokenEvent, TokenLogprob, ToolCallDelta, Usage
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
    ToolCallDeltaOut,
    ToolCallOut,
    UsageOut,
)
from tokenmill.protocol.requests import Echo
from tokenmill.protocol.responses import prompt_logprobs_of
from tokenmill.reasoning import Reasoning
from tokenmill.server.choice_text import ChoiceText, Piece, reasoning_of, whole
from tokenmill.server.errors import error_body
from tokenmill.server.serving import Generation
from tokenmill.server.sse import DONE, data_event, json_event

log = logging.getLogger(__name__)
NO_ECHO = Echo()

# (generations, completion id, created, model, include_usage, continuous_usage) -> SSE bytes
StreamRenderer = Callable[[Sequence[Generation], str, int, str, bool, bool], AsyncIterator[bytes]]
# (generations, completion id, created, model) -> the JSON body
BodyRenderer = Callable[[Sequence[Generation], str, int, str], Awaitable[ChatCompletion | Completion]]


@dataclass(frozen=True, slots=True)
class Collected:
    """A whole choice: its text, how it finished, its tokens' logprobs, and an upstream's tool calls."""

    text: str
    finished: Finished
    logprobs: list[TokenLogprob]
    tool_calls: list[ToolCallDelta]
    prompt: PromptLogprobs | None = None  # when the request had the prompt scored


async def collect(generation: Generation) -> Collected:
    """Run a request to the end."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    calls: list[ToolCallDelta] = []
    prompt: PromptLogprobs | None = None
    async for event in generation.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
            logprobs.extend(event.logprobs)
            calls.extend(event.tool_calls)
            prompt = event.prompt_logprobs or prompt
        else:
            return Collected("".join(parts), event, logprobs, calls, prompt)
    raise EngineFailure("the generation ended without a finish event")


def _asked_logprobs(generation: Generation) -> bool:
    return generation.params.logprobs is not None


def _total_usage(ends: Sequence[Finished]) -> UsageOut:
    """The request's usage over its n choices: the prompt once (it is shared), every completion."""
    first = ends[0].usage
    return UsageOut.of(
        Usage(first.prompt_tokens, sum(end.usage.completion_tokens for end in ends), first.cached_tokens)
    )


async def chat_completion(
    generations: Sequence[Generation],
    completion_id: str,
    created: int,
    model: str,
    new_output: Callable[[], ChoiceText] = ChoiceText,
) -> ChatCompletion:
    results = await asyncio.gather(*(collect(g) for g in generations))
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=[
            _chat_choice(index, result, new_output(), _asked_logprobs(generation))
            for index, (generation, result) in enumerate(zip(generations, results, strict=True))
        ],
        usage=_total_usage([result.finished for result in results]),
    )


def _chat_choice(index: int, result: Collected, output: ChoiceText, logprobs: bool) -> ChatChoice:
    pieces = [*output.feed(result.text, result.tool_calls), *output.finish(result.finished.reason)]
    content, calls = whole(pieces)
    return ChatChoice(
        index=index,
        message=AssistantMessage(
            content=content if content or not calls else None,
            reasoning_content=reasoning_of(pieces),
            tool_calls=[ToolCallOut.of(call) for call in calls] or None,
        ),
        finish_reason=output.finish_reason(result.finished.reason),
        logprobs=ChatLogprobs.of(result.logprobs) if logprobs else None,
    )


async def text_completion(
    generations: Sequence[Generation], completion_id: str, created: int, model: str, echo: Echo = NO_ECHO
) -> Completion:
    results = await asyncio.gather(*(collect(g) for g in generations))
    return Completion(
        id=completion_id,
        created=created,
        model=model,
        choices=[
            _completion_choice(index, result, echo, _asked_logprobs(generation))
            for index, (generation, result) in enumerate(zip(generations, results, strict=True))
        ],
        usage=_total_usage([result.finished for result in results]),
    )


def _completion_choice(index: int, result: Collected, echo: Echo, logprobs: bool) -> CompletionChoice:
    return CompletionChoice(
        index=index,
        text=(echo.text or "") + result.text,
        finish_reason=result.finished.reason,
        logprobs=_echoed_logprobs(result.logprobs, echo, result.prompt) if logprobs else None,
        prompt_logprobs=_vllm_prompt_logprobs(echo, result.prompt),
    )


def _echoed_logprobs(
    entries: Sequence[TokenLogprob], echo: Echo, prompt: PromptLogprobs | None, offset: int = 0
) -> CompletionLogprobs:
    if echo.logprobs is None:
        return CompletionLogprobs.of(list(entries), offset)
    return CompletionLogprobs.of(list(entries), offset + len(echo.text or ""), prompt, echo.logprobs)


def _vllm_prompt_logprobs(echo: Echo, prompt: PromptLogprobs | None) -> list | None:
    if echo.prompt_logprobs is None or prompt is None:
        return None
    return prompt_logprobs_of(prompt, echo.prompt_logprobs)


async def interleave(generations: Sequence[Generation]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Every choice's events as they come, tagged with the choice's index; ends when all have
    finished. A failure of any choice ends the whole stream (the caller sends the error event)."""
    if len(generations) == 1:  # the usual case, on the per-token path: no task per token
        async for event in generations[0].events():
            yield 0, event
        return
    streams = [g.events() for g in generations]
    pending = {asyncio.ensure_future(anext(stream)): index for index, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                event = task.result()  # raises the choice's failure
                yield index, event
                if not isinstance(event, Finished):
                    pending[asyncio.ensure_future(anext(streams[index]))] = index
    finally:
        for task in pending:
            task.cancel()


class _Usage:
    """Usage as a stream goes: vLLM's continuous usage counts every choice's tokens so far."""

    def __init__(self, generations: Sequence[Generation]):
        self._prompt = generations[0].handle.prompt_tokens or 0
        self._generated = [0] * len(generations)
        self.ends: list[Finished] = []

    def running(self, index: int, delta: TextDelta) -> UsageOut:
        self._generated[index] = delta.generated
        return UsageOut.of(Usage(self._prompt, sum(self._generated)))


async def guarded(
    request_id: str,
    body: Callable[[], AsyncIterator[bytes]],
    failure: Callable[[str, Exception], bytes],
    end: bytes = b"",
) -> AsyncIterator[bytes]:
    """The frame of every stream, in any wire format: `failure`'s event when the body fails (never
    a silent end), then `end`."""
    try:
        async for chunk in body():
            yield chunk
    except Exception as error:  # noqa: BLE001 -- the client reads why, and stream_error logs it
        yield failure(request_id, error)
    if end:
        yield end


def _guarded(request_id: str, body: Callable[[], AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """OpenAI's frame: an error event on failure, [DONE] last."""
    return guarded(request_id, body, failure_event, DONE)


def stream_error(request_id: str, error: Exception) -> TokenmillError:
    """What a failed stream tells its client: the error itself, or (an unexpected one, logged) an
    engine failure."""
    if isinstance(error, TokenmillError):
        return error
    log.error("stream %s failed", request_id, exc_info=error)
    return EngineFailure(f"generation failed: {type(error).__name__}")


def failure_event(request_id: str, error: Exception) -> bytes:
    """The error event that ends a failed OpenAI-format stream."""
    return json_event(error_body(stream_error(request_id, error)))


def chat_stream(
    generations: Sequence[Generation],
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    continuous_usage: bool = False,
    new_output: Callable[[], ChoiceText] = ChoiceText,
) -> AsyncIterator[bytes]:
    with_usage = include_usage or continuous_usage

    def chunk(index: int, delta: ChatDelta, finish=None, usage=None, choices=True, logprobs=None) -> bytes:
        body = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model,
            choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)]
            if choices
            else [],
            usage=usage,
        )
        return data_event(body.model_dump_json(exclude=None if with_usage else {"usage"}))

    async def body() -> AsyncIterator[bytes]:
        usage = _Usage(generations)
        outputs = [new_output() for _ in generations]
        for index in range(len(generations)):
            yield chunk(index, ChatDelta(role="assistant", content=""))
        async for index, event in interleave(generations):
            if isinstance(event, TextDelta):
                running = usage.running(index, event) if continuous_usage else None
                logprobs = ChatLogprobs.of(event.logprobs) if event.logprobs else None
                pieces = outputs[index].feed(event.text, event.tool_calls)
                for piece in pieces:
                    yield chunk(index, _chat_delta(piece), usage=running, logprobs=logprobs)
                    logprobs = None
                if logprobs is not None or (not pieces and running is not None):  # held-back text
                    yield chunk(index, ChatDelta(), usage=running, logprobs=logprobs)
            else:
                for piece in outputs[index].finish(event.reason):
                    yield chunk(index, _chat_delta(piece))
                usage.ends.append(event)
                total = _total_usage(usage.ends) if continuous_usage else None
                yield chunk(index, ChatDelta(), finish=outputs[index].finish_reason(event.reason), usage=total)
        if include_usage:
            yield chunk(0, ChatDelta(), usage=_total_usage(usage.ends), choices=False)

    return _guarded(completion_id, body)


def _chat_delta(piece: Piece) -> ChatDelta:
    if isinstance(piece, str):
        return ChatDelta(content=piece)
    if isinstance(piece, Reasoning):
        return ChatDelta(reasoning_content=piece.text)
    return ChatDelta(tool_calls=[ToolCallDeltaOut.of(piece)])


def completion_stream(
    generations: Sequence[Generation],
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    continuous_usage: bool = False,
    echo: Echo = NO_ECHO,
) -> AsyncIterator[bytes]:
    with_usage = include_usage or continuous_usage
    offsets = [0] * len(generations)  # the completions form gives each token's offset in its text

    def chunk(index: int, text: str, finish=None, usage=None, choices=True, logprobs=None, prompt=None) -> bytes:
        body = Completion(
            id=completion_id,
            created=created,
            model=model,
            choices=[
                CompletionChoice(
                    index=index, text=text, finish_reason=finish, logprobs=logprobs, prompt_logprobs=prompt
                )
            ]
            if choices
            else [],
            usage=usage,
        )
        return data_event(body.model_dump_json(exclude=None if with_usage else {"usage"}))

    def echoed(index: int, event: TextDelta) -> bytes:
        """The first chunk of a scored prompt's choice: the prompt's text and its logprobs."""
        assert event.prompt_logprobs is not None
        logprobs = None
        if echo.logprobs is not None and _asked_logprobs(generations[index]):
            logprobs = _echoed_logprobs((), echo, event.prompt_logprobs)
        offsets[index] = len(echo.text or "")  # the answer's text follows the prompt's
        prompt = _vllm_prompt_logprobs(echo, event.prompt_logprobs)
        return chunk(index, echo.text or "", logprobs=logprobs, prompt=prompt)

    async def body() -> AsyncIterator[bytes]:
        usage = _Usage(generations)
        if echo.text is not None and generations[0].params.prompt_logprobs is None:
            for index in range(len(generations)):  # nothing to wait for: the prompt's text goes first
                yield chunk(index, echo.text)
                offsets[index] = len(echo.text)
        async for index, event in interleave(generations):
            if isinstance(event, TextDelta):
                if event.prompt_logprobs is not None:
                    yield echoed(index, event)
                    if not event.text and not event.logprobs:
                        continue
                logprobs = CompletionLogprobs.of(event.logprobs, offsets[index]) if event.logprobs else None
                offsets[index] += sum(len(entry.token) for entry in event.logprobs)
                running = usage.running(index, event) if continuous_usage else None
                yield chunk(index, event.text, usage=running, logprobs=logprobs)
            else:
                usage.ends.append(event)
                total = _total_usage(usage.ends) if continuous_usage else None
                yield chunk(index, "", finish=event.reason, usage=total)
        if include_usage:
            yield chunk(0, "", usage=_total_usage(usage.ends), choices=False)

    return _guarded(completion_id, body)


def token_stream(generation: Generation) -> AsyncIterator[bytes]:
    """The simple `/stream` format: `data: <token text>` per token."""

    async def body() -> AsyncIterator[bytes]:
        async for event in generation.events():
            if isinstance(event, TextDelta):
                yield data_event(event.text)

    return _guarded(generation.handle.request_id, body)
