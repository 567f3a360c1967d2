"""Admission as a plain object: capacity, bounded queue, immediate rejection, queue timeout, drain."""

from __future__ import annotations

import asyncio
import time

import pytest

from tokenmill.errors import Overloaded
from tokenmill.server.admission import Admission


async def test_admits_up_to_capacity_then_queues_then_refuses_at_once():
    admission = Admission(capacity=2, max_queue=1, queue_timeout=5)
    first, second = await admission.acquire(), await admission.acquire()
    queued = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    assert admission.queued == 1
    started = time.perf_counter()
    with pytest.raises(Overloaded) as refused:
        await admission.acquire()
    assert time.perf_counter() - started < 0.5  # no waiting on the reject path (the queue timeout is 5 s)
    assert refused.value.retry_after >= 1
    first.release()
    third = await asyncio.wait_for(queued, 1)  # the freed place went to the queued request
    assert admission.active == 2 and admission.queued == 0
    for ticket in (second, third):
        ticket.release()
    assert admission.active == 0


async def test_release_is_idempotent():
    admission = Admission(capacity=1, max_queue=0, queue_timeout=1)
    ticket = await admission.acquire()
    ticket.release()
    ticket.release()
    assert admission.active == 0


async def test_queue_timeout_refuses_with_its_own_code():
    admission = Admission(capacity=1, max_queue=4, queue_timeout=0.05)
    holder = await admission.acquire()
    with pytest.raises(Overloaded) as refused:
        await admission.acquire()
    assert refused.value.code == "queue_timeout"
    assert admission.queued == 0
    holder.release()
    assert admission.active == 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_retry_after_is_the_queue_over_the_measured_drain_rate():
    # A constant (or a rate from the wrong window) cannot give these three different answers.
    clock = Clock()
    admission = Admission(capacity=1, max_queue=8, queue_timeout=60, clock=clock)
    assert admission.retry_after() == 1  # nothing measured yet
    for _ in range(10):  # one place freed per second for 10 s
        (await admission.acquire()).release()
        clock.now += 1.0
    holder = await admission.acquire()
    waiters = [asyncio.ensure_future(admission.acquire()) for _ in range(4)]
    await asyncio.sleep(0)
    assert admission.queued == 4
    assert admission.retry_after() == 5  # (4 queued + this one) / 1 per second
    for _ in range(10):  # then twice as fast: 10 more in 5 s, so 20 in the last 15 s
        admission._releases.record()
        clock.now += 0.5
    assert admission.retry_after() == 4  # ceil(5 / (20 / 15))
    clock.now += 31  # the window forgets: nothing measured, the floor again
    assert admission.retry_after() == 1
    for waiter in waiters:
        waiter.cancel()
    holder.release()


async def test_admission_memory_stays_bounded_however_many_requests_pass():
    clock = Clock()
    admission = Admission(capacity=1, max_queue=0, queue_timeout=1, clock=clock)
    for i in range(200_000):  # 2,000 requests a second for 100 s, none refused
        (await admission.acquire()).release()
        if i % 2_000 == 0:
            clock.now += 1.0
    assert admission._releases.buckets <= 32  # one per second of the 30 s window
    assert admission.retry_after() == 1


async def test_draining_refuses_new_and_queued_requests():
    admission = Admission(capacity=1, max_queue=4, queue_timeout=5)
    running = await admission.acquire()
    queued = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    admission.refuse_new()
    with pytest.raises(Overloaded) as queued_refusal:
        await queued
    assert queued_refusal.value.code == "draining"
    with pytest.raises(Overloaded):
        await admission.acquire()
    running.release()
    assert admission.active == 0


async def test_a_cancelled_waiter_gives_its_place_back():
    admission = Admission(capacity=1, max_queue=4, queue_timeout=5)
    holder = await admission.acquire()
    waiter = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    holder.release()  # may hand the place to the waiter before its cancellation lands
    await asyncio.sleep(0.01)
    assert admission.active == 0 and admission.queued == 0
