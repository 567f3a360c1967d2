"""Readiness and graceful drain.

On the first SIGTERM/SIGINT: readiness turns false, admission refuses new and queued requests with
503, and every admitted request runs to its end for up to the drain timeout. Requests still running
then are ended with an explicit error event (never cut silently). A second signal ends them at once.

When the runner gives up (its engine is in a crash loop), `fatal()` records a non-zero exit code and
asks the server to stop, so that an orchestrator replaces this instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from tokenmill.errors import Overloaded
from tokenmill.server.admission import Admission

log = logging.getLogger(__name__)


class Interruptible(Protocol):
    """A running request the server can end early (serving.Generation)."""

    def interrupt(self, error: Overloaded) -> None: ...


class Lifecycle:
    def __init__(self, admission: Admission):
        self._admission = admission
        self._active: set[Interruptible] = set()
        self.ready = False
        self.draining = False
        self.exit_code = 0
        self.on_fatal: Callable[[], None] | None = None  # set by the server that runs the app

    def fatal(self, message: str) -> None:
        self.ready = False
        self.exit_code = 1
        self._admission.refuse_new()  # queued requests get their 503 now, not at their queue timeout
        self.end_all(f"The server is stopping: {message}.")
        if self.on_fatal is not None:
            self.on_fatal()

    def track(self, request: Interruptible) -> None:
        self._active.add(request)

    def untrack(self, request: Interruptible) -> None:
        self._active.discard(request)

    @property
    def in_flight(self) -> int:
        return self._admission.active

    async def drain(self, timeout: float) -> None:
        self.ready = False
        self.draining = True
        self._admission.refuse_new()
        log.info("draining: %d requests in flight, waiting up to %gs", self.in_flight, timeout)
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            self.end_all(f"The server is shutting down: the {timeout:g}s drain timeout ended this request.")
            while self.in_flight and time.monotonic() < deadline + 5:  # let the error events go out
                await asyncio.sleep(0.02)
        log.info("drain complete")

    def end_all(self, message: str) -> None:
        """End every running request with an error event (the consumer sees it before [DONE])."""
        for request in list(self._active):
            request.interrupt(Overloaded(message, retry_after=1.0, code="shutdown"))
