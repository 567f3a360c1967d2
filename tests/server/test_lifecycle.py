"""The lifecycle when the runner gives up: exit code, readiness, queued and running requests."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.errors import Overloaded
from tokenmill.server.admission import Admission
from tokenmill.server.lifecycle import Lifecycle


class Running:
    def __init__(self) -> None:
        self.ended_by: list[Overloaded] = []

    def interrupt(self, error: Overloaded) -> None:
        self.ended_by.append(error)


async def test_fatal_ends_running_and_queued_requests_at_once_and_asks_the_server_to_exit():
    admission = Admission(capacity=1, max_queue=4, queue_timeout=60)
    lifecycle = Lifecycle(admission)
    lifecycle.ready = True
    stopped = []
    lifecycle.on_fatal = lambda: stopped.append(True)
    await admission.acquire()
    running = Running()
    lifecycle.track(running)
    queued = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    lifecycle.fatal("the engine is in a crash loop")
    with pytest.raises(Overloaded) as refused:  # not after its 60 s queue timeout
        await asyncio.wait_for(queued, 1)
    assert refused.value.code == "draining"
    [ended] = running.ended_by
    assert ended.code == "shutdown" and "crash loop" in str(ended)
    assert lifecycle.exit_code == 1 and not lifecycle.ready and stopped == [True]
