"""The response that carries an admitted generation to its client, and the one owner of its end.

Whatever way the exchange ends (answered, failed with an error event, client gone, or the client
gone before the body ever started), `GenerationResponse` closes the generation exactly once, in one
`finally`. Nothing else closes it: renderers in `streams` only turn events into bytes or bodies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Sequence as Seq
from typing import Any

from fastapi.encoders import jsonable_encoder
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from tokenmill.server.serving import Generation
from tokenmill.server.sse import DONE, EventStreamResponse, with_pings
from tokenmill.server.streams import failure_event

CLIENT_CLOSED_REQUEST = 499  # nginx's code: nobody is listening any more

# (request id, why) -> the end of a stream refused after its headers went out, in its wire format
RefusalFrame = Callable[[str, Exception], bytes]


def openai_refusal(request_id: str, error: Exception) -> bytes:
    return failure_event(request_id, error) + DONE


async def until_disconnected(receive: Receive) -> None:
    """Completes when the client closes the connection (reads and drops any request body left)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class GenerationResponse(Response):
    def __init__(
        self,
        generations: Generation | Seq[Generation],
        *,
        stream: AsyncIterator[bytes] | None = None,
        body: Callable[[], Awaitable[Any]] | None = None,
        ping_interval: float = 0.0,
    ):
        """Exactly one of `stream` (SSE bytes) or `body` (builds the JSON body). `generations`: the
        request's choices (n of them), all closed together when the exchange ends. A stream gets
        a ping after `ping_interval` seconds of silence (0: never)."""
        if (stream is None) == (body is None):
            raise ValueError("a GenerationResponse carries either a stream or a body")
        self.generations = [generations] if isinstance(generations, Generation) else list(generations)
        self._stream = stream if not ping_interval or stream is None else with_pings(stream, ping_interval)
        self._body = body
        self.status_code = 200  # read by nothing but Starlette's type expectations
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client_gone = False
        try:
            if self._stream is not None:
                client_gone = not await self._send_stream(self._stream, scope, receive, send)
            else:
                assert self._body is not None
                client_gone = not await self._send_body(self._body, scope, receive, send)
        except asyncio.CancelledError:  # some servers cancel the app when the client leaves
            client_gone = True
            raise
        finally:
            for generation in self.generations:
                generation.close(client_gone=client_gone)

    @staticmethod
    async def _send_stream(stream: AsyncIterator[bytes], scope: Scope, receive: Receive, send: Send) -> bool:
        """True when the whole stream went out; False when the client left first."""
        completed = False

        async def tracked() -> AsyncIterator[bytes]:
            nonlocal completed
            async for chunk in stream:
                yield chunk
            completed = True

        await EventStreamResponse(tracked())(scope, receive, send)
        return completed

    @staticmethod
    async def _send_body(build: Callable[[], Awaitable[Any]], scope: Scope, receive: Receive, send: Send) -> bool:
        """Build the body while watching the connection: if the client leaves first, generation
        stops at once instead of running to the end for nobody."""
        body_task = asyncio.ensure_future(build())
        gone_task = asyncio.ensure_future(until_disconnected(receive))
        try:
            await asyncio.wait({body_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone_task.cancel()
            if not body_task.done():
                body_task.cancel()
        if not body_task.done() or body_task.cancelled():
            await Response(status_code=CLIENT_CLOSED_REQUEST)(scope, receive, send)
            return False
        body = body_task.result()  # a TokenmillError here is rendered by the app's error handlers
        await JSONResponse(jsonable_encoder(body))(scope, receive, send)
        return True


async def stream_response(
    request_id: str,
    start: Awaitable[list[Generation]],
    render: Callable[[list[Generation]], AsyncIterator[bytes]],
    ping_interval: float,
    refused: RefusalFrame = openai_refusal,
) -> GenerationResponse | QueuedStreamResponse:
    """The response of a streamed request: `start` admits it, `render` turns its generations
    into SSE bytes. A refusal at once is still an HTTP status; a request that waits past one ping
    interval gets its headers and pings while it waits (a proxy would cut a silent connection),
    and a refusal after that is the stream's last event (`refused`, in the stream's format)."""
    if not ping_interval:
        generations = await start
        return GenerationResponse(generations, stream=render(generations))
    starting = asyncio.ensure_future(start)
    try:
        await asyncio.wait({starting}, timeout=ping_interval)
    except asyncio.CancelledError:
        starting.cancel()
        raise
    if not starting.done():
        return QueuedStreamResponse(request_id, starting, render, ping_interval, refused)
    generations = starting.result()
    return GenerationResponse(generations, stream=render(generations), ping_interval=ping_interval)


class QueuedStreamResponse(Response):
    """A streamed request still waiting for a place after one ping interval: its headers go out
    now and pings follow while it waits, so a proxy with an idle timeout keeps the connection;
    then its stream, or its refusal (a queue timeout, a drain) as an error event. Closes the
    generations once, as GenerationResponse does, and leaves the queue if the client goes."""

    def __init__(
        self,
        request_id: str,
        starting: asyncio.Future[list[Generation]],
        render: Callable[[list[Generation]], AsyncIterator[bytes]],
        ping_interval: float,
        refused: RefusalFrame = openai_refusal,
    ):
        self._request_id = request_id
        self._refused = refused
        self._starting = starting
        self._render = render
        self._interval = ping_interval
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def body() -> AsyncIterator[bytes]:
            try:
                generations = await asyncio.shield(self._starting)
            except Exception as error:  # noqa: BLE001 -- refused after it was queued: the stream says so
                yield self._refused(self._request_id, error)
                return
            async for chunk in self._render(generations):  # framed by its renderer, [DONE] included
                yield chunk

        completed = False
        try:
            completed = await GenerationResponse._send_stream(with_pings(body(), self._interval), scope, receive, send)
        finally:
            if not self._starting.done():
                self._starting.cancel()  # the client left while queued: leave the queue
            elif not self._starting.cancelled() and self._starting.exception() is None:
                for generation in self._starting.result():
                    generation.close(client_gone=not completed)
