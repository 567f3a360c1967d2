"""Server-side timeouts over a request's event stream: first token, gap between tokens, total."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenmill.client.streaming import wait_for_next
from tokenmill.errors import DeadlineExceeded
from tokenmill.generation import TokenEvent
from tokenmill.runners import RequestHandle


@dataclass(frozen=True, slots=True)
class Deadlines:
    first_token_s: float
    between_tokens_s: float
    total_s: float

    def shortened_to(self, total_s: float | None) -> Deadlines:
        """A per-request `timeout` may shorten the total, never extend it."""
        if total_s is None or total_s >= self.total_s:
            return self
        return Deadlines(self.first_token_s, self.between_tokens_s, total_s)


async def within_deadlines(handle: RequestHandle, deadlines: Deadlines, started: float) -> AsyncIterator[TokenEvent]:
    """Yield the handle's events; on a deadline, abort the generation and raise DeadlineExceeded.

    `started` is when the request arrived (time.monotonic()), so queueing counts toward the total.
    """
    first = True
    while True:
        phase, budget = wait_for_next(
            first,
            time.monotonic() - started,
            first_token=deadlines.first_token_s,
            between_tokens=deadlines.between_tokens_s,
            total=deadlines.total_s,
        )
        try:
            async with asyncio.timeout(budget):
                event = await handle.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            handle.abort()
            if phase == "total":
                raise DeadlineExceeded(
                    f"The request did not finish within its {deadlines.total_s:g}s total timeout.",
                    code="request_timeout",
                ) from None
            if phase == "first_token":
                raise DeadlineExceeded(
                    f"No first token within {deadlines.first_token_s:g}s of the request's arrival; the generation was stopped.",
                    code="first_token_timeout",
                ) from None
            raise DeadlineExceeded(
                f"No next token within {deadlines.between_tokens_s:g}s of the previous one; the generation was stopped.",
                code="inter_token_timeout",
            ) from None
        first = False
        yield event
