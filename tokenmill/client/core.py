"""An async client for any OpenAI-compatible server (tokenmill, vLLM, TGI, llama.cpp's server, OpenAI).

    async with LLMClient("http://127.0.0.1:8000", pool_size=100) as llm:
        reply = await llm.chat([{"role": "user", "content": "Hi"}], max_tokens=32)
        async for text in llm.stream_chat([{"role": "user", "content": "Hi"}]):
            print(text, end="")

One pooled httpx.AsyncClient per LLMClient: share it across tasks. Retries (connection errors,
429, 503; Retry-After honoured; a retry budget) happen only before a stream has delivered
anything: once a token has reached the caller, a failure is raised, never papered over by a
second, different answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import httpx

from tokenmill.client.errors import (
    APIStatusError,
    ClientError,
    ConnectionFailed,
    MalformedResponse,
    StreamError,
    TimedOut,
)
from tokenmill.client.policy import RetryBudget, RetryPolicy, Timeouts, parse_retry_after
from tokenmill.client.streaming import DONE, sse_event, wait_for_next


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class TextChunk:
    """Part of an answer: its text, and the choice as the server sent it (tool calls, logprobs...)."""

    text: str
    choice: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamEnd:
    finish_reason: str | None
    usage: Usage | None


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage | None


StreamEvent = TextChunk | StreamEnd


class LLMClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        pool_size: int = 100,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        budget: RetryBudget | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.model = model
        self.pool_size = pool_size
        self.timeouts = timeouts
        self.retry = retry
        self.budget = budget or RetryBudget()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            # Waiting for a free connection is queueing, bounded by the call's own deadlines.
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
            timeout=httpx.Timeout(connect=timeouts.connect, read=None, write=timeouts.connect, pool=None),
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the API
    async def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Completion:
        return _completion(await self._call("/v1/chat/completions", {"messages": list(messages), **params}), chat=True)

    async def complete(self, prompt: str, **params: Any) -> Completion:
        return _completion(await self._call("/v1/completions", {"prompt": prompt, **params}), chat=False)

    async def stream_chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> AsyncIterator[str]:
        async for event in self.stream_chat_events(messages, **params):
            if isinstance(event, TextChunk):
                yield event.text

    async def stream_complete(self, prompt: str, **params: Any) -> AsyncIterator[str]:
        async for event in self.stream_complete_events(prompt, **params):
            if isinstance(event, TextChunk):
                yield event.text

    def stream_chat_events(
        self, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> AsyncGenerator[StreamEvent, None]:
        return self._stream("/v1/chat/completions", {"messages": list(messages), **params}, chat=True)

    def stream_complete_events(self, prompt: str, **params: Any) -> AsyncGenerator[StreamEvent, None]:
        return self._stream("/v1/completions", {"prompt": prompt, **params}, chat=False)

    async def models(self) -> list[str]:
        response = await self._attempt_json("GET", "/v1/models", None, self.timeouts.non_streamed_total)
        return [m["id"] for m in response.get("data", [])]

    # -- non-streamed calls
    async def _call(self, path: str, body: dict) -> dict:
        body = self._with_model(body)
        deadline = time.monotonic() + (self.timeouts.total or self.timeouts.non_streamed_total)
        retry = 0
        self.budget.earn()
        while True:
            try:
                return await self._attempt_json("POST", path, body, deadline - time.monotonic())
            except ClientError as error:
                retry += 1
                await self._before_retry(error, retry, deadline)

    async def _attempt_json(self, method: str, path: str, body: dict | None, seconds: float) -> dict:
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                response = await self._http.request(method, path, json=body)
        except TimeoutError:
            raise TimedOut("total", self.timeouts.total or self.timeouts.non_streamed_total) from None
        except httpx.ConnectTimeout:
            raise TimedOut("connect", self.timeouts.connect) from None
        except httpx.TransportError as error:
            raise ConnectionFailed(f"{type(error).__name__}: {error}") from error
        if response.status_code >= 400:
            raise _status_error(response.status_code, response.content, response.headers)
        try:
            return response.json()
        except ValueError:
            raise MalformedResponse(f"the server's answer is not JSON: {response.text[:200]!r}") from None

    # -- streamed calls
    async def _stream(self, path: str, body: dict, chat: bool) -> AsyncGenerator[StreamEvent, None]:
        body = self._with_model({**body, "stream": True})
        body.setdefault("stream_options", {"include_usage": True})
        started = time.monotonic()
        deadline = started + self.timeouts.total if self.timeouts.total else None
        retry = 0
        self.budget.earn()
        while True:
            delivered = False
            try:
                async for event in self._stream_once(path, body, chat, started, deadline):
                    delivered = True
                    yield event
                return
            except ClientError as error:
                if delivered:
                    raise  # the caller has part of an answer: never replace it with another
                retry += 1
                await self._before_retry(error, retry, deadline)

    async def _stream_once(
        self, path: str, body: dict, chat: bool, started: float, deadline: float | None
    ) -> AsyncGenerator[StreamEvent, None]:
        t = self.timeouts
        try:
            async with contextlib.AsyncExitStack() as stack:
                # The first-token deadline covers the wait for the response headers too: a server
                # that accepts the connection and never answers must not hang the stream forever.
                phase, limit = "first_token", t.first_token - (time.monotonic() - started)
                if deadline is not None and deadline - time.monotonic() < limit:
                    phase, limit = "total", deadline - time.monotonic()
                try:
                    async with asyncio.timeout(max(0.0, limit)):
                        response = await stack.enter_async_context(self._http.stream("POST", path, json=body))
                except TimeoutError:
                    raise TimedOut(phase, t.first_token if phase == "first_token" else t.total or 0.0) from None
                if response.status_code >= 400:
                    raise _status_error(response.status_code, await response.aread(), response.headers)
                lines = response.aiter_lines()
                first = True
                finish: str | None = None
                usage: Usage | None = None
                total = None if deadline is None else deadline - started
                while True:
                    phase, limit = wait_for_next(
                        first,
                        time.monotonic() - started,
                        first_token=t.first_token,
                        between_tokens=t.between_tokens,
                        total=total,
                    )
                    try:
                        async with asyncio.timeout(limit):
                            line = await anext(lines)
                    except TimeoutError:
                        raise TimedOut(
                            phase,
                            {"first_token": t.first_token, "between_tokens": t.between_tokens}.get(
                                phase, t.total or 0.0
                            ),
                        ) from None
                    except StopAsyncIteration:
                        raise ConnectionFailed("the stream ended without [DONE]") from None
                    try:
                        chunk = sse_event(line)
                    except ValueError:
                        raise MalformedResponse(f"a stream event is not a JSON object: {line[:200]!r}") from None
                    if chunk == DONE:
                        yield StreamEnd(finish, usage)
                        return
                    if not isinstance(chunk, dict):
                        continue  # blank separators, comments, event names
                    if "error" in chunk:
                        error = chunk["error"] or {}
                        raise StreamError(str(error.get("message", "the server reported an error")), error.get("code"))
                    usage = _usage(chunk.get("usage")) or usage
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        text = delta.get("content") if chat else choice.get("text")
                        finish = choice.get("finish_reason") or finish
                        if text or delta.get("tool_calls") or choice.get("logprobs"):
                            first = False
                            yield TextChunk(text or "", choice)
        except httpx.ConnectTimeout:
            raise TimedOut("connect", t.connect) from None
        except httpx.TransportError as error:
            raise ConnectionFailed(f"{type(error).__name__}: {error}") from error

    # -- shared
    async def _before_retry(self, error: ClientError, retry: int, deadline: float | None) -> None:
        """Sleep before retry number `retry`, or re-raise `error` if it must not be retried."""
        retryable = (
            isinstance(error, ConnectionFailed)
            or (isinstance(error, APIStatusError) and error.status in self.retry.retry_statuses)
            or (isinstance(error, TimedOut) and error.phase == "connect")
        )
        if not retryable or retry >= self.retry.max_attempts:
            raise error
        retry_after = error.retry_after if isinstance(error, APIStatusError) else None
        if retry_after is not None and retry_after > self.retry.max_retry_after:
            raise error
        delay = self.retry.delay(retry, retry_after)
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise error
        if not self.budget.try_spend():
            raise error
        await asyncio.sleep(delay)

    def _with_model(self, body: dict) -> dict:
        if self.model is not None and "model" not in body:
            return {"model": self.model, **body}
        return dict(body)


def _status_error(status: int, content: bytes, headers: httpx.Headers) -> APIStatusError:
    message, code = content.decode("utf-8", "replace")[:500] or f"HTTP {status}", None
    try:
        error = json.loads(content).get("error")
        if isinstance(error, dict):
            message, code = str(error.get("message", message)), error.get("code")
        elif isinstance(error, str):
            message = error
    except (ValueError, AttributeError):
        pass
    return APIStatusError(status, message, code=code, retry_after=parse_retry_after(headers.get("retry-after")))


def _usage(raw: object) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    try:
        return Usage(int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0)))
    except (TypeError, ValueError):
        return None


def _completion(body: dict, chat: bool) -> Completion:
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
    except (KeyError, IndexError, TypeError):
        raise MalformedResponse(f"unexpected answer: {json.dumps(body)[:200]}") from None
    return Completion(text or "", choice.get("finish_reason"), _usage(body.get("usage")))
