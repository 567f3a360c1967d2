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


async def test_retry_after_follows_the_drain_rate():
    admission = Admission(capacity=1, max_queue=0, queue_timeout=1)
    for _ in range(5):
        (await admission.acquire()).release()
    assert admission.retry_after() == 1  # five releases in well under a second: places free up fast


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
