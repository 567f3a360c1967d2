"""Upstream mode (`--engine upstream`): the model runs elsewhere, behind an OpenAI-compatible API.

The work here is network I/O, so this runner is one event-loop task per request relaying the remote
stream through one shared, pooled `tokenmill.client.LLMClient`; no threads, no engine. Everything
in front of it (admission, deadlines, drain, metrics, auth, SSE) is the same as for a local model.
The upstream's failures become tokenmill's own errors, so clients see 502/503/504 with the
upstream's message rather than a generic 500.
"""

from __future__ import annotations

import asyncio
import json
import logging

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
from tokenmill.generation import Finished, FinishReason, GenerationRequest, TextDelta, Usage
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

    def stats(self) -> RunnerStats:
        return RunnerStats(running=len(self._tasks), waiting=0, kv_tokens_used=0, kv_tokens_capacity=0)

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        if request.params.logprobs is not None:  # refused, not silently dropped
            raise InvalidRequest("logprobs are not relayed in upstream mode yet", param="logprobs")
        limit = self.limits.max_tokens
        if limit is not None and (request.params.max_tokens or 0) > limit:
            raise InvalidRequest(f"max_tokens may be at most {limit} on this server.", param="max_tokens")
        handle = RequestHandle(request.request_id, on_abort=lambda: task.cancel())
        task = asyncio.create_task(self._relay(request, handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    async def _relay(self, request: GenerationRequest, handle: RequestHandle) -> None:
        client = self.client
        params = _upstream_params(request)
        if self.limits.max_tokens is not None and "max_tokens" not in params:
            params["max_tokens"] = self.limits.max_tokens  # --max-tokens-limit caps the default length too
        if request.messages is not None:
            turns = [{"role": m.role, "content": m.content} for m in request.messages]
            events = client.stream_chat_events(turns, **params)
        else:
            events = client.stream_complete_events(request.prompt or "", **params)
        pieces = 0
        try:
            async for event in events:
                if isinstance(event, TextChunk):
                    pieces += 1
                    handle.put(TextDelta(event.text, generated=pieces))
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


def _upstream_params(request: GenerationRequest) -> dict:
    p = request.params
    params: dict = {"temperature": p.temperature, "top_p": p.top_p}
    if p.max_tokens is not None:
        params["max_tokens"] = p.max_tokens
    if p.seed is not None:
        params["seed"] = p.seed
    if p.stop:
        params["stop"] = list(p.stop)
    # extensions (vLLM, TGI, tokenmill): sent only when used, so plain OpenAI endpoints still accept the call
    if p.top_k:
        params["top_k"] = p.top_k
    if p.ignore_eos:
        params["ignore_eos"] = True
    if p.min_tokens:
        params["min_tokens"] = p.min_tokens
    if p.min_p:
        params["min_p"] = p.min_p
    if p.repetition_penalty != 1.0:
        params["repetition_penalty"] = p.repetition_penalty
    # OpenAI's own fields
    if p.presence_penalty:
        params["presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        params["frequency_penalty"] = p.frequency_penalty
    if p.logit_bias:
        params["logit_bias"] = {str(token): bias for token, bias in p.logit_bias}
    if p.json_schema is not None:
        schema = json.loads(p.json_schema)
        params["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    return params


def _finished(end: StreamEnd, pieces: int) -> Finished:
    reason: FinishReason = "length" if end.finish_reason == "length" else "stop"
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
