"""The path between a parsed request and its renderer: admission, submit, deadlines, metrics, drain.

generation = await serving.start(request, timeout)   # 503 if full, 400 if the model refuses it
async for event in generation.events(): ...          # deadlines and metrics applied
generation.close(client_gone=...)                    # once, by its response: frees the place

A generation's end has one owner: the response that carries it (`server.responses`) closes it
exactly once, however the exchange ended. The server may `interrupt` it earlier (drain timeout,
engine given up); the client then reads that error as the last event, and the response still closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import NoReturn

from tokenmill.errors import ClientGone, DeadlineExceeded, Overloaded
from tokenmill.generation import Finished, GenerationRequest, TextDelta, TokenEvent
from tokenmill.runners import RequestHandle, Runner
from tokenmill.runners.embeddings import Embeddings
from tokenmill.sampling import SamplingParams
from tokenmill.server.admission import Admission, Ticket
from tokenmill.server.deadlines import Deadlines, within_deadlines
from tokenmill.server.lifecycle import Lifecycle
from tokenmill.server.metrics import Metrics


class Serving:
    def __init__(
        self, runner: Runner, admission: Admission, lifecycle: Lifecycle, metrics: Metrics, deadlines: Deadlines
    ):
        self.runner = runner
        self.admission = admission
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.deadlines = deadlines

    async def start(
        self,
        request: GenerationRequest,
        timeout: float | None = None,
        client_gone: Callable[[], Awaitable[None]] | None = None,
    ) -> Generation:
        """`client_gone`: completes when the client disconnects; a request waiting in the queue
        then leaves it at once (ClientGone) instead of holding its place until admitted."""
        [generation] = await self.start_choices(request, [request.params], timeout, client_gone)
        return generation

    async def start_choices(
        self,
        request: GenerationRequest,
        choice_params: list[SamplingParams],
        timeout: float | None = None,
        client_gone: Callable[[], Awaitable[None]] | None = None,
    ) -> list[Generation]:
        """A request's n choices: n sequences of the same prompt, admitted together (n places, as
        they hold n places in the engine), then each released as its own response part ends."""
        arrived = time.monotonic()
        places = len(choice_params)
        if not self.runner.ready:  # an engine is being replaced: say so at once, do not queue
            self._refused(self.runner.restarting_error())
        tickets = (await self._admit(places, client_gone)).split()
        generations: list[Generation] = []
        try:
            for index, (params, choice_ticket) in enumerate(zip(choice_params, tickets, strict=True)):
                choice_id = request.request_id if places == 1 else f"{request.request_id}-{index}"
                handle = await self.runner.submit(replace(request, request_id=choice_id, params=params))
                deadlines = self.deadlines.shortened_to(timeout)
                generation = Generation(self, handle, choice_ticket, arrived, deadlines, params)
                self.lifecycle.track(generation)
                generations.append(generation)
        except BaseException as error:
            for generation in generations:
                generation.close()
            for unused in tickets[len(generations) :]:
                unused.release()
            if isinstance(error, Overloaded):  # the engine failed while this request was queued
                self._refused(error)
            raise
        return generations

    async def embed(
        self, inputs: Sequence[str] | Sequence[Sequence[int]], client_gone: Callable[[], Awaitable[None]] | None = None
    ) -> Embeddings:
        """Embeddings behind the same admission as generation (a batch holds one place while it is
        computed), within the total timeout, counted as prompt tokens."""
        arrived = time.monotonic()
        ticket = await self._admit(1, client_gone)
        try:
            left = self.deadlines.total_s - (time.monotonic() - arrived)
            try:
                async with asyncio.timeout(max(0.0, left)):
                    result = await self.runner.embed(inputs)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"the embeddings took longer than the {self.deadlines.total_s:g} s total timeout",
                    code="request_timeout",
                ) from None
        finally:
            ticket.release()
        self.metrics.prompt_tokens.inc(result.prompt_tokens)
        return result

    async def _admit(self, places: int, client_gone: Callable[[], Awaitable[None]] | None) -> Ticket:
        """`places` at once, waiting in the queue if need be (leaving it if the client goes);
        a refusal is counted by its reason."""
        try:
            if self.admission.has_place(places) or client_gone is None:
                return await self.admission.acquire(places)
            return await self._queue(client_gone, places)
        except Overloaded as error:
            self._refused(error)

    def _refused(self, error: Overloaded) -> NoReturn:
        self.metrics.rejections.labels(error.code or "overloaded").inc()
        raise error

    async def _queue(self, client_gone: Callable[[], Awaitable[None]], places: int) -> Ticket:
        waiting = asyncio.ensure_future(self.admission.acquire(places))
        gone = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiting.done():
            return waiting.result()
        waiting.cancel()  # leaves the queue; a place granted in the same instant is given back
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        self.metrics.aborts.labels("client_disconnect").inc()
        raise ClientGone("The client disconnected while the request waited in the queue.")


class Generation:
    def __init__(
        self,
        serving: Serving,
        handle: RequestHandle,
        ticket: Ticket,
        arrived: float,
        deadlines: Deadlines,
        params: SamplingParams,
    ):
        self.handle = handle
        self.params = params  # what the request asked for (renderers read logprobs from it)
        self._serving = serving
        self._ticket = ticket
        self._arrived = arrived
        self._deadlines = deadlines
        self._abort_reason: str | None = None
        self._closed = False

    async def events(self) -> AsyncIterator[TokenEvent]:
        metrics = self._serving.metrics
        last = None
        try:
            async for event in within_deadlines(self.handle, self._deadlines, self._arrived):
                now = time.monotonic()
                if isinstance(event, TextDelta):
                    (metrics.ttft if last is None else metrics.itl).observe(now - (last or self._arrived))
                    last = now
                elif isinstance(event, Finished):
                    metrics.e2e.observe(now - self._arrived)
                    metrics.prompt_tokens.inc(event.usage.prompt_tokens)
                    metrics.generation_tokens.inc(event.usage.completion_tokens)
                yield event
        except DeadlineExceeded:
            self._abort_reason = "deadline"
            raise
        except Overloaded:
            self._abort_reason = "shutdown"
            raise

    def interrupt(self, error: Overloaded) -> None:
        """End the request from the server side: the engine stops now, the client reads `error`."""
        if not self.handle.finished:
            self.handle.fail(error)
            self.handle.abort()

    def close(self, client_gone: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.handle.finished or self._abort_reason:
            reason = "client_disconnect" if client_gone else (self._abort_reason or "server")
            self._serving.metrics.aborts.labels(reason).inc()
        self.handle.abort()
        self._serving.lifecycle.untrack(self)
        self._ticket.release()
