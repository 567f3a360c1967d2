"""Admission control: a fixed capacity and a bounded wait queue, shared fairly between tenants.

A request holds its place from admission until its response ends (stream closed, body sent, or
client gone), so capacity always reflects real work. Excess is refused at once, without waiting:
the reject path does no inference work and costs microseconds. `Retry-After` is estimated from how
fast places have been freeing up.

Fair share (tenants.py names the tenants): when a place frees, the waiter admitted is the one with
the highest priority, then the one whose tenant holds the fewest places per unit of weight, then
the oldest. An idle tenant's share is simply not claimed, so the others use it; a tenant that
comes back gets the next free places until it holds its share. When the queue is full, a
newcomer whose tenant holds less than its share pushes out the newest waiter of the tenant most
over its share (that one gets the 503), so a flood from one key never fills the queue against the
others. Each tenant named in the key file has one place kept for it from the start (a quarter of
the capacity at most), so even its first request beside a flood starts at once.

Deadline-aware: a newcomer's wait is estimated as the places to be freed before its turn over the
rate at which places free up. When that is past what it may wait (its own deadlines,
`--queue-timeout`), it is refused now, with the estimate as `Retry-After`, instead of queueing
to fail later. The rate needs MIN_RELEASES_FOR_A_RATE releases in its window: at start-up the
first one or two make a rate of almost nothing, and refusing on it set saturating closed-loop
clients retrying at once into a storm that starved the server. Until then no wait is estimated
and `Retry-After` is its 1 s floor, as before any release.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tokenmill.errors import InvalidRequest, Overloaded
from tokenmill.server.shares import Shares
from tokenmill.tenants import ANONYMOUS_TENANT, OTHER, Tenant

_RATE_WINDOW_S = 30.0
MIN_RELEASES_FOR_A_RATE = 8  # releases in the window before their rate counts (waits, Retry-After)


class ReleaseRate:
    """Places freed per second over the last `window` seconds, counted in one-second buckets: its
    memory is bounded by the window (at most window + 1 buckets), however many requests pass.
    Fewer than `least` releases in the window make no rate (at start-up the first one or two
    would say a place frees every few seconds)."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic, least: int = 1):
        self.window = window
        self.least = least
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
        released = sum(count for _, count in self._buckets)
        if released < max(1, self.least):
            return None
        return released / max(now - self._buckets[0][0], 1.0)

    @property
    def buckets(self) -> int:
        return len(self._buckets)

    def _forget_before(self, now: float) -> None:
        while self._buckets and now - self._buckets[0][0] > self.window:
            self._buckets.popleft()


class Ticket:
    """An admitted request's places (one per sequence it runs); `release()` is idempotent.
    `waited`: seconds it spent in the queue; `predicted`: the estimate made when it joined it;
    `queued`: whether it queued at all."""

    def __init__(
        self,
        admission: Admission,
        places: int = 1,
        tenant: Tenant = ANONYMOUS_TENANT,
        waited: float = 0.0,
        predicted: float | None = None,
        queued: bool = False,
    ):
        self._admission = admission
        self._places = places
        self.tenant = tenant
        self.waited = waited
        self.predicted = predicted
        self.queued = queued
        self._released = False

    def split(self) -> list[Ticket]:
        """One ticket per place, each released on its own (a request's n choices end apart)."""
        if self._released:
            return []
        self._released = True
        return [
            Ticket(self._admission, 1, self.tenant, self.waited, self.predicted, self.queued)
            for _ in range(self._places)
        ]

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self._places, self.tenant)


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[None]
    places: int
    tenant: Tenant
    priority: int
    order: int
    queued_at: float = 0.0
    predicted: float | None = None
    at_once: bool = False  # its places were free as it arrived (it passed waiters held back for headroom)


class Admission:
    def __init__(
        self,
        capacity: int,
        max_queue: int,
        queue_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        named: Iterable[Tenant] = (),
    ):
        """`named`: the key file's named tenants; each has a place kept for its first request."""
        self.capacity = capacity
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self._clock = clock
        self._waiters: list[_Waiter] = []
        self._shares = Shares(standing=list({t.group: t for t in named if t.label != OTHER}.values()))
        self._order = itertools.count()
        self._releases = ReleaseRate(_RATE_WINDOW_S, clock, least=MIN_RELEASES_FOR_A_RATE)
        self.draining = False

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def held_by(self, group: str) -> int:
        return self._shares.active[group]

    def retry_after(self) -> float:
        """Seconds until a place is likely free for one more request: queue length over drain rate."""
        rate = self._releases.per_second()
        if not rate:
            return 1.0
        return max(1.0, math.ceil((self.queued + 1) / rate))

    def has_place(self, places: int = 1, tenant: Tenant = ANONYMOUS_TENANT) -> bool:
        """Whether acquire() would admit at once (no waiting, no refusal)."""
        return not self.draining and self._fits(places, tenant) and not self._waiters

    def _fits(self, places: int, tenant: Tenant) -> bool:
        """Whether `tenant` may take `places` now: free places, less the headroom kept for the other
        tenants seen lately. A tenant alone may fill the server (an idle share is lent); one
        flooding it leaves room for the others' next requests, so they are not kept waiting
        for the places it borrowed to come back."""
        reserve = self._shares.reserved_for_others(tenant, self.capacity, self._clock())
        return self.active + places + reserve <= self.capacity

    def predicted_wait(self, places: int = 1, tenant: Tenant = ANONYMOUS_TENANT, priority: int = 0) -> float | None:
        """Seconds a newcomer would likely wait: the places admitted before it (waiters ranked
        ahead of it, and its own) over the rate places have been freeing. None: no rate yet."""
        if self.has_place(places, tenant):
            return 0.0
        rate = self._releases.per_second()
        if not rate:
            return None
        mine = self._shares.claimed(tenant, places)
        ahead = sum(
            w.places
            for w in self._waiters
            if w.priority > priority or (w.priority == priority and self._shares.claimed(w.tenant) <= mine)
        )
        return (ahead + places) / rate

    async def acquire(
        self,
        places: int = 1,
        tenant: Tenant = ANONYMOUS_TENANT,
        priority: int = 0,
        max_wait: float | None = None,
    ) -> Ticket:
        """`places`: taken together or not at all (n choices run together; taking them one by one,
        two such requests could each hold part of what the other waits for). `max_wait`: how long
        this request can afford to queue (its deadlines); `--queue-timeout` bounds it too."""
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
        self._shares.arrived(tenant, places, self._clock())
        if self.has_place(places, tenant):
            self._take(places, tenant)
            return Ticket(self, places, tenant)
        budget = self.queue_timeout if max_wait is None else min(max_wait, self.queue_timeout)
        predicted = self.predicted_wait(places, tenant, priority)
        if predicted is not None and predicted > budget:
            raise Overloaded(
                f"The request would wait about {predicted:.0f}s for a place, longer than it may wait "
                f"({budget:g}s); retry later.",
                retry_after=predicted,
                code="queue_wait_too_long",
            )
        if len(self._waiters) >= self.max_queue:
            self._push_out_for(tenant, places, priority)
        waiter = _Waiter(
            asyncio.get_running_loop().create_future(),
            places,
            tenant,
            priority,
            next(self._order),
            self._clock(),
            predicted,
        )
        self._waiters.append(waiter)
        self._shares.queued[tenant.group] += places
        self._admit_waiting()  # it may fit where the waiters ahead of it do not (their tenant's share is used)
        waiter.at_once = waiter.future.done()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout=self.queue_timeout)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                return self._ticket(waiter)  # the places arrived just as the timer fired: keep them
            waiter.future.cancel()
            raise Overloaded(
                f"The request waited {self.queue_timeout:g}s in the queue without a free place; retry later.",
                retry_after=self.retry_after(),
                code="queue_timeout",
            ) from None
        except asyncio.CancelledError:  # the client left while queued
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._release(places, tenant)
            waiter.future.cancel()
            raise
        finally:
            if waiter in self._waiters:
                self._unqueue(waiter)
                self._admit_waiting()  # a large request leaving the head may unblock smaller ones
        return self._ticket(waiter)

    def _ticket(self, waiter: _Waiter) -> Ticket:
        waited = self._clock() - waiter.queued_at
        return Ticket(self, waiter.places, waiter.tenant, waited, waiter.predicted, queued=not waiter.at_once)

    def _push_out_for(self, tenant: Tenant, places: int, priority: int) -> None:
        """The queue is full: make room for a newcomer by refusing the newest waiter of the tenant
        most over its share, if the newcomer ranks above it; else refuse the newcomer."""
        mine = self._shares.claimed(tenant, places)
        victim = max(
            self._waiters,
            key=lambda w: (-w.priority, self._shares.claimed(w.tenant), w.order),
            default=None,
        )
        outranks = victim is not None and (
            priority > victim.priority
            or (priority == victim.priority and mine < self._shares.claimed(victim.tenant) - 1e-9)
        )
        if victim is None or not outranks:
            raise Overloaded(
                f"The server is at capacity ({self.capacity} running, {self.queued} queued); retry later.",
                retry_after=self.retry_after(),
            )
        self._unqueue(victim)
        victim.future.set_exception(
            Overloaded(
                "The queue is full and this key holds more than its share of the server; retry later.",
                retry_after=self.retry_after(),
                code="over_fair_share",
            )
        )

    def _unqueue(self, waiter: _Waiter) -> None:
        self._waiters.remove(waiter)
        self._shares.queued[waiter.tenant.group] -= waiter.places

    def _take(self, places: int, tenant: Tenant) -> None:
        self.active += places
        self._shares.active[tenant.group] += places

    def _release(self, places: int = 1, tenant: Tenant = ANONYMOUS_TENANT) -> None:
        self._releases.record()
        self.active -= places
        self._shares.active[tenant.group] -= places
        self._admit_waiting()

    def _ranked_waiters(self) -> list[_Waiter]:
        for gone in [w for w in self._waiters if w.future.done()]:
            self._unqueue(gone)
        return sorted(self._waiters, key=lambda w: (-w.priority, self._shares.held(w.tenant), w.order))

    def _admit_waiting(self) -> None:
        """Waiters in rank order get their places as soon as they are free. None passes a waiter
        that waits for free places (a large request is not starved by small ones; capacity may
        have shrunk meanwhile: then nobody enters until it has room again); one held back only by
        the headroom kept for other tenants is passed by those tenants' waiters."""
        admitted = True
        while admitted:
            admitted = False
            for waiter in self._ranked_waiters():
                if self.active + waiter.places > self.capacity:
                    return
                if self._fits(waiter.places, waiter.tenant):
                    self._unqueue(waiter)
                    self._take(waiter.places, waiter.tenant)
                    waiter.future.set_result(None)
                    admitted = True
                    break

    def set_capacity(self, capacity: int) -> None:
        """The runner can now serve this many at once (a worker died, or came back). Running requests
        keep their places; a larger capacity lets queued ones in at once."""
        self.capacity = capacity
        self._admit_waiting()

    def refuse_new(self) -> None:
        """Drain: new requests are refused; queued ones too (they have done no work yet)."""
        self.draining = True
        while self._waiters:
            waiter = self._waiters[0]
            self._unqueue(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(
                    Overloaded(
                        "The server is shutting down; retry on another instance.", retry_after=1.0, code="draining"
                    )
                )
