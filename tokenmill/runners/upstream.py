"""Upstream mode (`--engine upstream`): the model runs elsewhere, behind an OpenAI-compatible API.

The work here is network I/O, so this runner is one event-loop task per request relaying the remote
stream through one shared, pooled `tokenmill.client.LLMClient`; no threads, no engine. Everything
in front of it (admission, deadlines, drain, metrics, auth, SSE) is the same as for a local model.
The upstream's failures become tokenmill's own errors, so clients see 502/503/504 with the
upstream's message rather than a generic 500.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tokenmill.client import (
    APIStatusError,
    ClientError,
    ConnectionFailed,
    LLMClient,
    RetryPolicy,
    StreamEnd,
    TextChunk,
    TimedOut,
    Timeouts,
)
from tokenmill.config import Settings
from tokenmill.errors import (
    DeadlineExceeded,
    EngineFailure,
    InvalidRequest,
    Overloaded,
    TokenmillError,
    UpstreamFailure,
)
from tokenmill.generation import (
    Finished,
    FinishReason,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from tokenmill.reasoning import ReasoningFormat
from tokenmill.runners.base import RequestHandle, Runner, RunnerStats

log = logging.getLogger(__name__)


class UpstreamRunner(Runner):
    def __init__(self, settings: Settings, model_name: str | None):
        if not settings.upstream_url:
            raise ValueError("--engine upstream needs --upstream-url")
        super().__init__()
        self._settings = settings
        self.model_name = model_name or ""
        self._client: LLMClient | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        s = self._settings
        self._client = LLMClient(
            s.upstream_url or "",
            api_key=s.upstream_api_key,
            model=s.upstream_model,
            pool_size=s.upstream_pool,
            timeouts=Timeouts(
                connect=s.upstream_connect_timeout,
                first_token=s.first_token_timeout,
                between_tokens=s.inter_token_timeout,
                total=s.request_timeout,
            ),
            retry=RetryPolicy(max_attempts=s.upstream_attempts),
        )
        if s.upstream_model is None:
            try:
                models = await self._client.models()
            except ClientError as error:
                raise EngineFailure(
                    f"cannot ask {s.upstream_url} which model it serves ({error.message}); pass --upstream-model"
                ) from error
            if not models:
                raise EngineFailure(f"{s.upstream_url} lists no model; pass --upstream-model")
            self._client.model = models[0]
        self.model_name = self.model_name or self._client.model or "upstream"
        log.info(
            "relaying to %s (model %s, pool of %d connections)", s.upstream_url, self._client.model, s.upstream_pool
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    @property
    def in_flight(self) -> int:
        # its relay tasks, counted directly: a task cancelled before it first ran never reaches
        # the code that would settle it
        return len(self._tasks)

    @property
    def client(self) -> LLMClient:
        assert self._client is not None, "start() first"
        return self._client

    relays = True

    def tool_call_format(self) -> None:
        return None  # the upstream API renders the tools and parses its model's calls itself

    def reasoning(self, named: ReasoningFormat | None = None) -> None:
        return None  # the upstream API splits its model's reasoning itself

    def stats(self) -> RunnerStats:
        return RunnerStats(running=len(self._tasks), waiting=0, kv_tokens_used=0, kv_tokens_capacity=0)

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        limit = self.limits.max_tokens
        if limit is not None and (request.params.max_tokens or 0) > limit:
            raise InvalidRequest(f"max_tokens may be at most {limit} on this server.", param="max_tokens")
        if request.params.prompt_logprobs is not None:
            raise InvalidRequest(
                "prompt log-probabilities (echo with logprobs, prompt_logprobs, max_tokens 0) are computed by a "
                "local engine; an upstream API does not report them through this server",
                param="prompt_logprobs",
            )
        handle = RequestHandle(request.request_id, on_abort=lambda: task.cancel())
        task = asyncio.create_task(self._relay(request, handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    async def _relay(self, request: GenerationRequest, handle: RequestHandle) -> None:
        client = self.client
        params = self._upstream_params(request)
        if request.messages is not None:
            turns = params.pop("messages", None) or [{"role": m.role, "content": m.content} for m in request.messages]
            events = client.stream_chat_events(turns, **params)
        else:
            params.pop("prompt", None)
            events = client.stream_complete_events(request.prompt or "", **params)
        pieces = 0
        try:
            async for event in events:
                if isinstance(event, TextChunk):
                    pieces += 1
                    handle.put(_delta(event, pieces, chat=request.messages is not None))
                elif isinstance(event, StreamEnd):
                    handle.put(_finished(event, pieces))
        except asyncio.CancelledError:
            self._aborted += 1  # client gone, deadline or shutdown: closing the stream tells the upstream
        except ClientError as error:
            handle.fail(_translate(error))
        except Exception as error:  # every admitted request ends with an event, whatever failed
            log.exception("relaying %s failed", request.request_id)
            handle.fail(error)
        finally:
            await events.aclose()

    def _upstream_params(self, request: GenerationRequest) -> dict[str, Any]:
        """The client's own fields as sent (tools, response_format, logprobs...: whatever it gave),
        with what this server acts on set by it: this choice's seed and the length, within
        --max-tokens-limit. A request from a route without a client body carries the basics."""
        p = request.params
        if request.relay is not None:
            params = dict(request.relay)
        else:
            params = {"temperature": p.temperature, "top_p": p.top_p}
            if p.stop:
                params["stop"] = list(p.stop)
        if p.seed is not None:
            params["seed"] = p.seed
        max_tokens = p.max_tokens if p.max_tokens is not None else self.limits.max_tokens
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        return params


def _delta(chunk: TextChunk, generated: int, chat: bool) -> TextDelta:
    """An upstream chunk as this server's event: its text, tool-call parts and logprobs kept."""
    choice = chunk.choice
    calls = tuple(
        ToolCallDelta(
            index=part.get("index", 0),
            arguments=(part.get("function") or {}).get("arguments") or "",
            id=part.get("id"),
            name=(part.get("function") or {}).get("name"),
        )
        for part in (choice.get("delta") or {}).get("tool_calls") or ()
    )
    logprobs = choice.get("logprobs") or {}
    entries = _chat_logprobs(logprobs) if chat else _completion_logprobs(logprobs)
    return TextDelta(chunk.text, logprobs=entries, generated=generated, tool_calls=calls)


def _chat_logprobs(logprobs: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    def alternative(entry: dict[str, Any]) -> TopLogprob:
        return TopLogprob(entry["token"], tuple(entry.get("bytes") or ()), entry["logprob"])

    return tuple(
        TokenLogprob(
            e["token"], tuple(e.get("bytes") or ()), e["logprob"], tuple(map(alternative, e.get("top_logprobs") or ()))
        )
        for e in logprobs.get("content") or ()
    )


def _completion_logprobs(logprobs: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    tops = logprobs.get("top_logprobs") or []
    return tuple(
        TokenLogprob(
            token,
            tuple(token.encode()),
            logprob,
            tuple(TopLogprob(t, tuple(t.encode()), lp) for t, lp in (tops[i] if i < len(tops) else {}).items()),
        )
        for i, (token, logprob) in enumerate(zip(logprobs.get("tokens") or (), logprobs.get("token_logprobs") or ()))
    )


_FINISH_REASONS: dict[str, FinishReason] = {"length": "length", "tool_calls": "tool_calls"}


def _finished(end: StreamEnd, pieces: int) -> Finished:
    reason: FinishReason = _FINISH_REASONS.get(end.finish_reason or "", "stop")
    if end.usage is not None:
        return Finished(reason=reason, usage=Usage(end.usage.prompt_tokens, end.usage.completion_tokens))
    return Finished(reason=reason, usage=Usage(0, pieces))  # an upstream without usage: count the chunks


def _translate(error: ClientError) -> TokenmillError:
    """The upstream's failure, as the error our own client should see (502/503/504, its message kept)."""
    if isinstance(error, APIStatusError):
        said = error.server_message
        if error.status in (429, 503):
            return Overloaded(
                f"the upstream model server is overloaded: {said}",
                retry_after=error.retry_after or 1.0,
                code="upstream_overloaded",
            )
        if error.status in (401, 403):
            return UpstreamFailure(
                f"the upstream model server refused this server's credentials: {said}", code="upstream_auth"
            )
        if 400 <= error.status < 500:
            return InvalidRequest(f"the upstream model server refused the request: {said}", code=error.code)
        return UpstreamFailure(f"the upstream model server failed ({error.status}): {said}")
    if isinstance(error, TimedOut):
        code = {
            "connect": "upstream_connect_timeout",
            "first_token": "first_token_timeout",
            "between_tokens": "inter_token_timeout",
        }
        return DeadlineExceeded(f"upstream: {error.message}", code=code.get(error.phase, "request_timeout"))
    if isinstance(error, ConnectionFailed):
        return UpstreamFailure(
            f"the upstream model server is unreachable or hung up: {error.message}", code="upstream_unreachable"
        )
    return UpstreamFailure(
        f"the upstream model server sent something unusable: {error.message}", code="upstream_bad_response"
    )
