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
from dataclasses import dataclass, replace
from typing import NoReturn

from tokenmill.errors import ClientGone, DeadlineExceeded, Overloaded, QuotaExceeded, RetryLater
from tokenmill.generation import Finished, GenerationRequest, Share, TextDelta, TokenEvent
from tokenmill.reasoning import REASONING_FORMATS, ReasoningSetup
from tokenmill.runners import RequestHandle, Runner
from tokenmill.runners.embeddings import Embeddings
from tokenmill.sampling import SamplingParams
from tokenmill.server.admission import Admission, Ticket
from tokenmill.server.deadlines import Deadlines, within_deadlines
from tokenmill.server.lifecycle import Lifecycle
from tokenmill.server.metrics import Metrics
from tokenmill.tenants import ANONYMOUS_TENANT, Quotas, Tenant


class Serving:
    def __init__(
        self, runner: Runner, admission: Admission, lifecycle: Lifecycle, metrics: Metrics, deadlines: Deadlines
    ):
        self.runner = runner
        self.admission = admission
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.deadlines = deadlines
        self.quotas = Quotas()
        self.ping_interval = 0.0  # seconds of silence before a stream gets an SSE ping (0: never)
        self.reasoning: ReasoningSetup | None = None  # how answers are split from reasoning: set_reasoning()

    def set_reasoning(self, parser: str) -> None:
        """Read the served model's reasoning format once the runner has started (its tokenizer is
        known then); `parser` is --reasoning-parser: "auto" follows the chat template, "none" never
        splits, another name forces that format."""
        self.reasoning = None if parser == "none" else self.runner.reasoning(REASONING_FORMATS.get(parser))

    async def start(
        self,
        request: GenerationRequest,
        timeout: float | None = None,
        client_gone: Callable[[], Awaitable[None]] | None = None,
        tenant: Tenant = ANONYMOUS_TENANT,
        priority: int | None = None,
    ) -> Generation:
        """`client_gone`: completes when the client disconnects; a request waiting in the queue
        then leaves it at once (ClientGone) instead of holding its place until admitted."""
        [generation] = await self.start_choices(request, [request.params], timeout, client_gone, tenant, priority)
        return generation

    async def start_choices(
        self,
        request: GenerationRequest,
        choice_params: list[SamplingParams],
        timeout: float | None = None,
        client_gone: Callable[[], Awaitable[None]] | None = None,
        tenant: Tenant = ANONYMOUS_TENANT,
        priority: int | None = None,
    ) -> list[Generation]:
        """A request's n choices: n sequences of the same prompt, admitted together (n places, as
        they hold n places in the engine), then each released as its own response part ends.
        `tenant`: whose share and quota it takes; `priority`: asked for (capped by the tenant)."""
        arrived = time.monotonic()
        places = len(choice_params)
        deadlines = self.deadlines.shortened_to(timeout)
        if not self.runner.ready:  # an engine is being replaced: say so at once, do not queue
            self._refused(self.runner.restarting_error(), tenant)
        # what it can afford to wait for a place: its first token is due within the same deadlines
        max_wait = min(deadlines.first_token_s, deadlines.total_s)
        admit = _Admit(places, tenant, tenant.priority(priority), max_wait)
        tickets = (await self._admit(admit, client_gone)).split()
        generations: list[Generation] = []
        try:
            for index, (params, choice_ticket) in enumerate(zip(choice_params, tickets, strict=True)):
                choice_id = request.request_id if places == 1 else f"{request.request_id}-{index}"
                share = Share(tenant.group, tenant.weight, admit.priority, at_once=not choice_ticket.queued)
                handle = await self.runner.submit(replace(request, request_id=choice_id, params=params, share=share))
                generation = Generation(self, handle, choice_ticket, arrived, deadlines, params)
                self.lifecycle.track(generation)
                generations.append(generation)
        except BaseException as error:
            for generation in generations:
                generation.close()
            for unused in tickets[len(generations) :]:
                unused.release()
            if isinstance(error, Overloaded):  # the engine failed while this request was queued
                self._refused(error, tenant)
            raise
        return generations

    async def embed(
        self,
        inputs: Sequence[str] | Sequence[Sequence[int]],
        client_gone: Callable[[], Awaitable[None]] | None = None,
        tenant: Tenant = ANONYMOUS_TENANT,
    ) -> Embeddings:
        """Embeddings behind the same admission as generation (a batch holds one place while it is
        computed), within the total timeout, counted as prompt tokens, in `tenant`'s share and
        token quota like its generations."""
        arrived = time.monotonic()
        ticket = await self._admit(_Admit(1, tenant, 0, self.deadlines.total_s), client_gone)
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
        self.metrics.tenant_tokens.labels(tenant.label, "prompt").inc(result.prompt_tokens)
        self.quotas.charge_tokens(tenant, result.prompt_tokens)
        return result

    async def _admit(self, admit: _Admit, client_gone: Callable[[], Awaitable[None]] | None) -> Ticket:
        """The places at once, waiting in the queue if need be (leaving it if the client goes),
        within the tenant's quota; a refusal is counted by its reason."""
        tenant = admit.tenant
        try:
            self.quotas.check(tenant)
            if self.admission.has_place(admit.places, tenant) or client_gone is None:
                ticket = await self._acquire(admit)
            else:
                ticket = await self._queue(client_gone, admit)
        except RetryLater as error:
            self._refused(error, tenant)
        self.quotas.charge_request(tenant)
        self.metrics.tenant_admitted.labels(tenant.label).inc()
        self.metrics.tenant_queue_wait.labels(tenant.label).observe(ticket.waited)
        if ticket.predicted is not None:
            self.metrics.queue_wait_error.observe(abs(ticket.waited - ticket.predicted))
        return ticket

    def _acquire(self, admit: _Admit) -> Awaitable[Ticket]:
        return self.admission.acquire(admit.places, admit.tenant, admit.priority, admit.max_wait)

    def _refused(self, error: RetryLater, tenant: Tenant = ANONYMOUS_TENANT) -> NoReturn:
        reason = error.code or ("quota" if isinstance(error, QuotaExceeded) else "overloaded")
        self.metrics.rejections.labels(reason).inc()
        self.metrics.tenant_refused.labels(tenant.label, reason).inc()
        raise error

    async def _queue(self, client_gone: Callable[[], Awaitable[None]], admit: _Admit) -> Ticket:
        waiting = asyncio.ensure_future(self._acquire(admit))
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


@dataclass(frozen=True, slots=True)
class _Admit:
    """What admission is asked for: places, whose, at what priority, waiting at most max_wait."""

    places: int
    tenant: Tenant
    priority: int
    max_wait: float


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
        # its tokens are known at its end; until then its quota holds its longest answer, so a
        # key's requests in flight cannot together run far past its tokens per minute
        self._quota_held = params.max_tokens or 0
        serving.quotas.charge_tokens(ticket.tenant, self._quota_held)

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
                    self._count_tokens(event)
                yield event
        except DeadlineExceeded:
            self._abort_reason = "deadline"
            raise
        except Overloaded:
            self._abort_reason = "shutdown"
            raise

    def _count_tokens(self, finished: Finished) -> None:
        metrics, tenant, usage = self._serving.metrics, self._ticket.tenant, finished.usage
        metrics.prompt_tokens.inc(usage.prompt_tokens)
        metrics.generation_tokens.inc(usage.completion_tokens)
        metrics.tenant_tokens.labels(tenant.label, "prompt").inc(usage.prompt_tokens)
        metrics.tenant_tokens.labels(tenant.label, "generated").inc(usage.completion_tokens)
        self._serving.quotas.charge_tokens(tenant, usage.prompt_tokens + usage.completion_tokens - self._quota_held)
        self._quota_held = 0

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
        self._serving.quotas.charge_tokens(self._ticket.tenant, -self._quota_held)  # ended unfinished
