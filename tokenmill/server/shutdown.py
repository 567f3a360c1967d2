"""uvicorn with tokenmill's drain: the listener stays up while in-flight work finishes.

uvicorn's own handling closes the listening socket at the first signal, so clients would see
refused connections instead of a 503 telling them to go elsewhere. Here the first SIGTERM/SIGINT
starts `Lifecycle.drain()` (readiness false, new requests 503 + Retry-After, in-flight requests run
up to the drain timeout, then get an error event); uvicorn is told to exit only when that is done.
A second signal ends every request at once (still with an error event) and exits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

from tokenmill.errors import TokenmillError
from tokenmill.server.lifecycle import Lifecycle

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        lifecycle: Lifecycle,
        drain_timeout: float,
        start_runner: Callable[[], Awaitable[None]] | None = None,
    ):
        super().__init__(config)
        self._start_runner = start_runner
        self._lifecycle = lifecycle
        self._drain_timeout = drain_timeout
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._lifecycle.on_fatal = self._exit_now
        if self._start_runner is not None:
            # The model loads (and passes its warm-up) before the port opens: a failure is one log
            # line and a non-zero exit, never a listening server that is not ready.
            try:
                await self._start_runner()
            except Exception as error:  # noqa: BLE001 -- whatever failed, the message says it
                log.critical("tokenmill could not start its model engine: %s", _describe(error))
                self._lifecycle.exit_code = 1
                return
        await super().serve(sockets)

    def _exit_now(self) -> None:
        """The runner gave up (crash loop): the lifecycle has already ended every request; exit once
        their error events are out. The exit code is the lifecycle's."""
        asyncio.ensure_future(self._exit_when_sent())

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): it would record the signal and re-raise it after shutdown, turning
        # a clean drain into a non-zero exit.
        if self._loop is None:
            self.should_exit = True
            return
        if not self._drain_requested:
            self._drain_requested = True
            log.info("signal %d: draining (up to %gs)", sig, self._drain_timeout)
            self._loop.call_soon_threadsafe(self._start_drain)
        else:
            log.warning("second signal %d: ending all requests now", sig)
            self._loop.call_soon_threadsafe(self._stop_now)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self._lifecycle.drain(self._drain_timeout)
        self.should_exit = True

    def _stop_now(self) -> None:
        self._lifecycle.end_all("The server is stopping now.")
        asyncio.ensure_future(self._exit_when_sent())

    async def _exit_when_sent(self) -> None:
        for _ in range(100):  # up to 2 s for the error events to go out
            if not self._lifecycle.in_flight:
                break
            await asyncio.sleep(0.02)
        self.should_exit = True


def _describe(error: BaseException) -> str:
    text = str(error)
    return text if isinstance(error, TokenmillError) and text else f"{type(error).__name__}: {text}"
