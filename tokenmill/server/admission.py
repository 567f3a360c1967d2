"""Admission control: a fixed capacity and a bounded wait queue. Excess is refused at once.

A request holds its place from admission until its response ends (stream closed, body sent, or
client gone), so capacity always reflects real work. When every place is taken and the queue is
full, `acquire()` raises Overloaded without waiting: the reject path does no inference work and
costs microseconds. `Retry-After` is estimated from how fast places have been freeing up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from tokenmill.errors import InvalidRequest, Overloaded

_RATE_WINDOW_S = 30.0


class ReleaseRate:
    """Places freed per second over the last `window` seconds, counted in one-second buckets: its
    memory is bounded by the window (at most window + 1 buckets), however many requests pass."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [whole second, releases in it], oldest first

    def record(self) -> None:
        now = self._clock()
        second = math.floor(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([second, 1])
        self._forget_before(now)

    def per_second(self) -> float | None:
        now = self._clock()
        self._forget_before(now)
        if not self._buckets:
            return None
        span = max(now - self._buckets[0][0], 1.0)
        return sum(count for _, count in self._buckets) / span

    @property
    def buckets(self) -> int:
        return len(self._buckets)

    def _forget_before(self, now: float) -> None:
        while self._buckets and now - self._buckets[0][0] > self.window:
            self._buckets.popleft()


class Ticket:
    """An admitted request's places (one per sequence it runs); `release()` is idempotent."""

    def __init__(self, admission: Admission, places: int = 1):
        self._admission = admission
        self._places = places
        self._released = False

    def split(self) -> list[Ticket]:
        """One ticket per place, each released on its own (a request's n choices end apart)."""
        if self._released:
            return []
        self._released = True
        return [Ticket(self._admission) for _ in range(self._places)]

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self._places)


class Admission:
    def __init__(
        self, capacity: int, max_queue: int, queue_timeout: float, clock: Callable[[], float] = time.monotonic
    ):
        self.capacity = capacity
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()  # (waiter, places it needs)
        self._releases = ReleaseRate(_RATE_WINDOW_S, clock)
        self.draining = False

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> float:
        """Seconds until a place is likely free for one more request: queue length over drain rate."""
        rate = self._releases.per_second()
        if not rate:
            return 1.0
        return max(1.0, math.ceil((self.queued + 1) / rate))

    def has_place(self, places: int = 1) -> bool:
        """Whether acquire() would admit at once (no waiting, no refusal)."""
        return not self.draining and self.active + places <= self.capacity and not self._waiters

    async def acquire(self, places: int = 1) -> Ticket:
        """`places`: taken together or not at all (n choices run together; taking them one by one,
        two such requests could each hold part of what the other waits for)."""
        if self.draining:
            raise Overloaded(
                "The server is shutting down; retry on another instance.",
                retry_after=self.retry_after(),
                code="draining",
            )
        if places > self.capacity:
            raise InvalidRequest(
                f"This request needs {places} places at once; this server runs at most {self.capacity}.", param="n"
            )
        if self.has_place(places):
            self.active += places
            return Ticket(self, places)
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(
                f"The server is at capacity ({self.capacity} running, {self.queued} queued); retry later.",
                retry_after=self.retry_after(),
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, places)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=self.queue_timeout)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return Ticket(self, places)  # the places arrived just as the timer fired: keep them
            waiter.cancel()
            raise Overloaded(
                f"The request waited {self.queue_timeout:g}s in the queue without a free place; retry later.",
                retry_after=self.retry_after(),
                code="queue_timeout",
            ) from None
        except asyncio.CancelledError:  # the client left while queued
            if waiter.done() and not waiter.cancelled():
                self._release(places)
            waiter.cancel()
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
                self._admit_waiting()  # a large request leaving the head may unblock smaller ones
        return Ticket(self, places)

    def _release(self, places: int = 1) -> None:
        self._releases.record()
        self.active -= places
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        """First come, first served: the head of the queue gets its places as soon as they are
        free (capacity may have shrunk meanwhile: then nobody enters until it has room again)."""
        while self._waiters:
            waiter, places = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if self.active + places > self.capacity:
                return
            self._waiters.popleft()
            self.active += places
            waiter.set_result(None)

    def set_capacity(self, capacity: int) -> None:
        """The runner can now serve this many at once (a worker died, or came back). Running requests
        keep their places; a larger capacity lets queued ones in at once."""
        self.capacity = capacity
        self._admit_waiting()

    def refuse_new(self) -> None:
        """Drain: new requests are refused; queued ones too (they have done no work yet)."""
        self.draining = True
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(
                    Overloaded(
                        "The server is shutting down; retry on another instance.", retry_after=1.0, code="draining"
                    )
                )
